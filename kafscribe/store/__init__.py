"""Cassandra: one module per group of tables (jobs, blobs, chunks, callbacks, keys, secrets)."""
