"""The HTTP edge: request parsing, authentication, problem responses, downloads.

Handlers take and return werkzeug's Request and Response: functions-framework hands them
Flask's subclasses, the Lambda adapter werkzeug's own (no Flask at a cold start).
"""

from werkzeug.wrappers import Request, Response

__all__ = ["Request", "Response"]
