"""One error hierarchy carrying HTTP statuses, rendered as RFC 9457 problem details.

Each error has a fixed, human-written title and a ``type`` URN; the ``detail`` tells the caller
what to change. Nothing here leaks internals: dependency errors say which dependency, not why.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:record-service:problem:"


class ServiceError(Exception):
    """Base of every error the service answers with a problem document."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # Seconds after which a repeat may succeed (an outage, a request still running), or
        # None; common.http.responses turns this and the fields below into headers.
        self.retry_after = retry_after

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        return body


class BadRequest(ServiceError):
    status = 400
    slug = "bad-request"
    title = "Bad Request"


class IdempotencyKeyRequired(BadRequest):
    """A request whose answer can't be repeated without a key (the token rotation)."""

    slug = "idempotency-key-required"
    title = "Idempotency Key Required"


class ClientDisconnected(BadRequest):
    slug = "incomplete-body"
    title = "Incomplete Request Body"


class Unauthorized(ServiceError):
    status = 401
    slug = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str = "A valid user id and access token are required.") -> None:
        super().__init__(detail)  # answered with a Bearer challenge


class NotFound(ServiceError):
    status = 404
    slug = "not-found"
    title = "Not Found"


class Forbidden(ServiceError):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class OriginNotVerified(Forbidden):
    """A request that did not come through the deployment's edge (AWS: CloudFront + WAF)."""

    slug = "origin-not-verified"

    def __init__(self) -> None:
        super().__init__("This service answers only requests that come through its public URL.")


class MethodNotAllowed(ServiceError):
    status = 405
    slug = "method-not-allowed"
    title = "Method Not Allowed"

    def __init__(self, method: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"{method} is not supported here; use {' or '.join(allowed)}.")
        self.allowed = allowed


class RequestTimeout(ServiceError):
    status = 408
    slug = "request-timeout"
    title = "Request Timeout"


class Conflict(ServiceError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class RequestInProgress(Conflict):
    """The same request (Idempotency-Key) is still being answered: repeat it after Retry-After."""

    slug = "in-progress"
    title = "Request In Progress"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, retry_after=retry_after)


class UploadNotReceived(Conflict):
    """Completion of a direct upload whose file is not in the bucket (yet)."""

    slug = "upload-not-received"
    title = "Upload Not Received"


class ConversionInProgress(Conflict):
    """A repeated completion while the first one's job is still queued or converting."""

    slug = "conversion-in-progress"
    title = "Conversion In Progress"

    def __init__(self, detail: str, *, retry_after: int, status_url: str | None = None) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.status_url = status_url  # where the job's progress is (the http layer names it)


class PayloadTooLarge(ServiceError):
    status = 413
    slug = "payload-too-large"
    title = "Content Too Large"


class RangeNotSatisfiable(ServiceError):
    status = 416
    slug = "range-not-satisfiable"
    title = "Range Not Satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"The requested range is outside the record's {size} bytes.")
        self.size = size


class UnsupportedMediaType(ServiceError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported Media Type"


class UnprocessableContent(ServiceError):
    status = 422
    slug = "unprocessable-content"
    title = "Unprocessable Content"


class InvalidField(UnprocessableContent):
    slug = "invalid-field"
    title = "Invalid Field"


class FieldAfterFile(InvalidField):
    """A form part after the WAV's: the conversion starts at the file, without it."""

    slug = "field-after-file"
    title = "Field After File"

    def __init__(self, field_name: str) -> None:
        super().__init__(
            f"Form field '{field_name}' comes after 'file': send every field before the file "
            "(the conversion starts as the file arrives)."
        )
        self.field = field_name

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        return {**super().to_problem(instance), "field": self.field}


class IdempotencyKeyReused(UnprocessableContent):
    slug = "idempotency-key-reused"
    title = "Idempotency Key Reused"


class InvalidCursor(UnprocessableContent):
    slug = "invalid-cursor"
    title = "Invalid Cursor"


class UndecodableAudio(UnprocessableContent):
    slug = "undecodable-audio"
    title = "Undecodable Audio"


class TooManyPendingUploads(ServiceError):
    """A user already has MAX_PENDING_UPLOADS_PER_USER direct uploads waiting or converting."""

    status = 429
    slug = "too-many-pending-uploads"
    title = "Too Many Pending Uploads"

    def __init__(self, limit: int, *, retry_after: int) -> None:
        super().__init__(
            f"This user already has {limit} direct uploads waiting to be sent or converted; "
            "complete or let some finish first.",
            retry_after=retry_after,
        )


class DependencyUnavailable(ServiceError):
    """Postgres or the object store cannot be reached: retry later."""

    status = 503
    slug = "dependency-unavailable"
    title = "Service Unavailable"

    def __init__(
        self, dependency: str, retry_after: int = 5, *, outcome_unknown: bool = False
    ) -> None:
        super().__init__(
            f"The {dependency} is unavailable right now; retry in a few seconds.",
            retry_after=retry_after,
        )
        self.dependency = dependency
        # True when a write may have taken effect before the dependency went away (a reply
        # lost after the statement reached the server): the caller must keep what goes with it.
        self.outcome_unknown = outcome_unknown


class ServerStopping(ServiceError):
    """The server was asked to stop (SIGTERM) and this request could not finish in its grace."""

    status = 503
    slug = "server-stopping"
    title = "Service Unavailable"

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(
            "The server stopped before this request could finish; nothing of it was kept. "
            "Repeat it (with the same Idempotency-Key, if it had one).",
            retry_after=retry_after,
        )


class StoredProblem(ServiceError):
    """A problem document kept from earlier (a failed conversion job), answered again as it was."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", "")))
        self.problem = dict(problem)
        self.status = int(problem.get("status", 500))  # type: ignore[misc]

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        return dict(self.problem)


class InternalError(ServiceError):
    """A bug: the generic body, never the exception text."""

    def __init__(self) -> None:
        super().__init__("An unexpected error occurred; it has been logged.")
