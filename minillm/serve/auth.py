"""API keys for `minillm serve`: `Authorization: Bearer KEY`, compared in constant time.

build_app (serve/api.py) puts the keys on `app.state` as UTF-8 bytes, or None for no key:
    app.state.api_key    guards /v1/* and /openapi.json; None leaves them open
    app.state.admin_key  guards /admin/*; None turns the admin API off (403), it never leaves it open
/health and /metrics never ask for a key: load balancers and Prometheus scrapers have none.

Any string is a key, non-ASCII included: it is compared as the UTF-8 bytes the client sent.
"""

from __future__ import annotations

import hmac

from minillm.serve.protocol import APIError

try:
    from fastapi import Request as HTTPRequest
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e


def key_bytes(what: str, key: str | None) -> bytes | None:
    """A key as the bytes a client sends for it; ValueError for "" (which would match a bare 'Bearer')."""
    if key is not None and key == "":
        raise ValueError(f"{what} must be a non-empty string (or None for none)")
    return key.encode("utf-8") if key is not None else None


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an Authorization header's value (the bytes sent) is `Bearer KEY`.

    The scheme is case-insensitive (RFC 9110), and compare_digest takes the same time however many
    leading bytes are right, so the time taken does not reveal the key."""
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.lstrip(b" "), key)


def check_bearer(request: HTTPRequest, key: bytes | None, what: str = "API key") -> None:
    """Nothing if `key` is None or the request carries it; 401 otherwise."""
    if key is None:
        return
    # Starlette decodes header bytes as latin-1, so encoding back gives the bytes that were
    # sent: a UTF-8 key arrives as its UTF-8 bytes
    if not bearer_matches(request.headers.get("authorization", "").encode("latin-1"), key):
        raise APIError(401, f"missing or wrong {what}: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


def check_api_key(request: HTTPRequest) -> None:
    """The guard of /v1/* and /openapi.json."""
    check_bearer(request, request.app.state.api_key)


def check_admin_key(request: HTTPRequest) -> None:
    """The guard of /admin/*: off (403) without an admin key, 401 with a wrong one."""
    key = request.app.state.admin_key
    if key is None:
        raise APIError(403, "the admin API is off: start the server with --admin-key (or $MINILLM_ADMIN_KEY)",
                       code="admin_disabled")
    check_bearer(request, key, "admin key")
