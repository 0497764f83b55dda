"""Shared code of the record service: settings, models, storage, conversion and HTTP errors."""
