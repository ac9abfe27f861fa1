"""Whisper weights that work offline: assembling packaged models, converting formats."""
