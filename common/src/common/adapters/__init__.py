"""The outside systems: PostgreSQL (engine, schema) and the S3-compatible object store."""
