"""Speech: audio decoding and probing, chunking, engines, models, decoding options, memory estimates."""
