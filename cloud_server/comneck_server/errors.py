"""The gateway's refusals: one error body for every failure, its HTTP status from the code."""

from __future__ import annotations

from comneck.errors import ComneckInputError, ErrorCode


class ApiError(ComneckInputError):
    """A request the gateway refuses; the status follows from ``code``."""

    def __init__(self, code: ErrorCode, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


def status_of(code: ErrorCode | str) -> int:
    """The HTTP status of a code (422 for a code this build does not know)."""
    return code.status if isinstance(code, ErrorCode) else 422


def error_body(code: ErrorCode | str, message: str) -> dict:
    return {"error": {"code": str(code), "message": message}}
