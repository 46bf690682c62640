"""HTTP status of each error code, and the one error body every failure uses."""

from __future__ import annotations

from comneck.errors import ComneckInputError

#: Error code -> HTTP status. Codes not listed (input the models reject) answer 422.
STATUS: dict[str, int] = {
    # container (comneck.bitstream)
    "bad_magic": 400,
    "truncated": 400,
    "corrupted": 400,
    "crc_mismatch": 400,
    "unsupported_version": 400,
    "unknown_codec": 400,
    "bad_rate": 400,
    "bad_size": 400,
    "codec_mismatch": 409,
    # request
    "bad_request": 400,
    "unknown_backend": 400,
    "unknown_task": 400,
    "unsupported_task": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "empty_prompt": 422,
    "prompt_too_long": 422,
    "invalid_request": 422,
    "busy": 503,
    "not_ready": 503,
    "load_failed": 503,
    "internal_error": 500,
}


class ApiError(ComneckInputError):
    """A request the gateway refuses; the status follows from ``code``."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


def status_of(code: str) -> int:
    return STATUS.get(code, 422)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
