"""Domain errors. The API layer maps each to a status code and the IDSync error body."""

from __future__ import annotations


class IdmeshError(Exception):
    """An error the client caused or must see; `code` is the IDSync error code."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(IdmeshError):
    pass


class LookupFailed(IdmeshError):
    code = "LOOKUP_ERROR"


class NotFound(IdmeshError):
    status = 404
    code = "NOT_FOUND_ERROR"


class Unauthorized(IdmeshError):
    status = 401
    code = "UNAUTHORIZED"


class Forbidden(IdmeshError):
    status = 403
    code = "FORBIDDEN"


class Throttled(IdmeshError):
    status = 429
    code = "THROTTLED"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(IdmeshError):
    """The durable write failed (disk full, read-only file): nothing was acknowledged."""

    status = 503
    code = "SERVICE_UNAVAILABLE"


class PayloadTooLarge(IdmeshError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class Conflict(IdmeshError):
    status = 409
    code = "CONFLICT"
