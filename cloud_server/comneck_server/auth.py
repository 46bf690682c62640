"""API keys: which keys a request presents, the check that every one is configured, and the route
dependency that runs it (declared so OpenAPI lists both schemes for the Authorize button of /docs)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from comneck.errors import ErrorCode

from .errors import ApiError


def bearer_token(authorization: str) -> str | None:
    """KEY of ``Bearer KEY`` (the scheme in any case), or None for any other form."""
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def presented_keys(request: Request) -> list[str | None]:
    """Every key a request presents: each Authorization header's bearer token (None where it is no
    ``Bearer KEY``) and each X-API-Key value (an empty one counts, as a wrong key)."""
    return [*map(bearer_token, request.headers.getlist("authorization")), *request.headers.getlist("x-api-key")]


def key_check(api_keys: Sequence[str]) -> Callable[[Request], None]:
    """The check of a request against ``api_keys`` (none configured: every request passes)."""

    def known(key: str | None) -> bool:
        return key is not None and any(secrets.compare_digest(key.encode(), k.encode()) for k in api_keys)

    def check_key(request: Request) -> None:
        """Every key the request presents must be a configured one, and it must present one."""
        if not api_keys:
            return
        presented = presented_keys(request)
        if not presented or not all(known(key) for key in presented):
            raise ApiError(ErrorCode.UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY")

    return check_key


def key_dependency(check: Callable[[Request], None]) -> Callable[..., None]:
    """A route dependency running ``check``; it declares both schemes, though ``check`` reads the headers itself."""
    bearer, api_key_header = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

    def authorized(request: Request, _bearer: Any = Depends(bearer), _key: Any = Depends(api_key_header)) -> None:
        check(request)

    return authorized
