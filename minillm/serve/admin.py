"""The model update service of `minillm serve`: /admin/*, one named function per endpoint.

    GET  /admin/models/NAME            current and previous version
    POST /admin/models/NAME            {"path": CHECKPOINT}: load, warm up and switch NAME to it
    POST /admin/models/NAME/rollback   back to the previous version

The versions themselves (loading, warm-up, switching without downtime, retiring an old version once
its last request ends) are serve/registry.py's work; these handlers check the admin key
(serve/auth.py), read the body, and turn the registry's refusals into HTTP answers. build_app
(serve/api.py) wires them, and only if the server was started with an admin key do they answer.
"""

from __future__ import annotations

import asyncio

from minillm.serve.auth import check_admin_key
from minillm.serve.protocol import APIError, SwitchRequest, parse, read_body

try:
    from fastapi import Request as HTTPRequest
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e


def known(request: HTTPRequest, name: str) -> None:
    """404 unless this server serves a model called `name`."""
    names = request.app.state.registry.names()
    if name not in names:
        raise APIError(404, f"model {name!r} is not served here; models: {', '.join(names)}",
                       param="model", code="model_not_found")


async def admin_info(name: str, request: HTTPRequest):
    """GET /admin/models/NAME: the version served now and the one a rollback would return to."""
    check_admin_key(request)
    known(request, name)
    return request.app.state.registry.info(name)


async def admin_switch(name: str, request: HTTPRequest):
    """POST /admin/models/NAME: serve the checkpoint at body.path as NAME's new version.

    A new NAME is added; an existing one switches once the new version has loaded and warmed up.
    A checkpoint that does not load is a 422 and the current version keeps serving."""
    check_admin_key(request)
    req = parse(await read_body(request), SwitchRequest)
    registry = request.app.state.registry
    if registry._load is None:
        raise APIError(400, "this server was built around an in-memory model and cannot load checkpoints")
    try:  # loading and warming up take seconds: off the event loop, which keeps serving meanwhile
        old, new = await asyncio.to_thread(registry.switch, name, req.path)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:  # CheckpointError is a ValueError
        raise APIError(422, f"version refused, {name!r} keeps serving its current one: {e}", param="path",
                       code="bad_checkpoint")
    return {"model": name, "current": new.describe(), "previous": old.describe() if old else None}


async def admin_rollback(name: str, request: HTTPRequest):
    """POST /admin/models/NAME/rollback: back to the previous version (409 if there is none)."""
    check_admin_key(request)
    known(request, name)
    try:
        frm, to = request.app.state.registry.rollback(name)
    except ValueError as e:
        raise APIError(409, str(e), code="no_previous_version")
    return {"model": name, "current": to.describe(), "previous": frm.describe()}
