"""Shared code of the record service: settings, models, storage, conversion and HTTP errors."""

from common.memory import tune_malloc

# Before any thread or large buffer exists: keeps the servers' resident size flat (see memory).
tune_malloc()
