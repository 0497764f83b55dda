"""The request being handled, for what runs under it without being handed it (the logs)."""

from __future__ import annotations

from contextvars import ContextVar

from werkzeug.datastructures import Headers

# The headers of the request the current thread handles (set by function_handler), or None.
REQUEST_HEADERS: ContextVar[Headers | None] = ContextVar("request_headers", default=None)
