"""The HTTP edge: request parsing, authentication, problem responses, downloads."""
