"""The service's own rules: users, tokens, records, uploads, WAV parsing and conversion."""
