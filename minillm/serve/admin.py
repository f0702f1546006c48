"""The model update service of `minillm serve`: /admin/*, one named function per endpoint.

    GET  /admin/models/NAME            current and previous version
    POST /admin/models/NAME            {"path": CHECKPOINT}: load, warm up and switch NAME to it;
                                       {"path": ..., "create": true} to add a new NAME
    POST /admin/models/NAME/rollback   back to the previous version

The versions themselves (loading, warm-up, switching without downtime, retiring an old version once
its last request ends) are serve/registry.py's work; these handlers check the admin key
(serve/auth.py), read the body, and turn the registry's refusals into HTTP answers. build_app
(serve/api.py) wires them, and only if the server was started with an admin key do they answer.

What an admin key does NOT unlock, so that a leaked key is not a way into the machine:
  - names: a new model name must match MODEL_NAME ([A-Za-z0-9._-]{1,64}) and be asked for with
    "create": true (a typo in NAME is a 404, not a new model); at most the registry's max_models;
  - paths: only checkpoints inside the server's models root (`app.state.models_root`, the CLI's
    --models_root) are loaded. The real path (symlinks and ".." resolved) must stay inside it, and
    so must every file in the checkpoint folder. A path outside the root and a path that does not
    exist get the same answer, so the endpoint cannot be used to probe the file system.
  - errors: a checkpoint that fails to load, whatever the reason (bad file, absurd config, NaN
    weights, out of memory), is a one-line 422 and the current version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from minillm.serve.auth import check_admin_key
from minillm.serve.protocol import APIError, SwitchRequest, parse, read_body
from minillm.serve.registry import TooManyModels

try:
    from fastapi import Request as HTTPRequest
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # safe in URLs, logs and Prometheus labels
log = logging.getLogger("minillm.admin")


def known(request: HTTPRequest, name: str) -> None:
    """404 unless this server serves a model called `name`."""
    names = request.app.state.registry.names()
    if name not in names:
        raise APIError(404, f"model {name[:64]!r} is not served here; models: {', '.join(names)}",
                       param="model", code="model_not_found")


def new_name(request: HTTPRequest, name: str, create: bool) -> None:
    """Nothing for a served name; for a new one, 400 unless it is a valid name, 404 unless create."""
    if name in request.app.state.registry.names():
        return
    if not MODEL_NAME.fullmatch(name):
        raise APIError(400, f"model names are 1-64 characters of A-Z a-z 0-9 . _ -; got {name[:80]!r}",
                       param="model", code="invalid_model_name")
    if not create:
        known(request, name)  # 404, naming the models there are


def checkpoint_in_root(root: Path | None, path: str) -> Path:
    """The checkpoint folder `path` names (a run folder: its newest checkpoint), confined to `root`.

    Both the path given and the folder it leads to must be inside the root (see `confine`). None as
    the root means no confinement (an in-process server whose caller chose the paths itself)."""
    if root is None:
        return Path(path)
    from minillm.weights.checkpoint import find_checkpoint
    from minillm.weights.huggingface import is_hf_folder

    real = confine(root, path)
    folder = real if is_hf_folder(real) else find_checkpoint(real)  # CheckpointError: a 422 below
    return confine(root, str(folder)) if folder != real else real


def confine(root: Path, path: str) -> Path:
    """`path` (relative to the root, or absolute) as a real path inside `root`; 422 otherwise."""
    refused = APIError(422, f"no checkpoint {path[:200]!r} under the server's models root", param="path",
                       code="bad_checkpoint")
    if "\x00" in path:
        raise refused
    real = Path(os.path.realpath(root / path))  # symlinks and ".." resolved; absolute paths kept
    if not real.is_relative_to(root) or not real.exists():  # one answer for both: nothing leaks
        raise refused
    if real.is_dir():  # a file linked out from inside the folder would be read too
        for entry in os.scandir(real):
            if not Path(os.path.realpath(entry.path)).is_relative_to(root):
                raise refused
    return real


def refusal(e: Exception) -> str:
    """Why a checkpoint was refused, in one line of at most 500 characters. Our own errors
    (CheckpointError, FileNotFoundError, ...) are written for users; others (a KeyError 'n_embd',
    torch's RuntimeError for a shape or an allocation) need their type to make sense."""
    text = str(e) if isinstance(e, (ValueError, OSError)) and str(e) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


async def admin_info(name: str, request: HTTPRequest):
    """GET /admin/models/NAME: the version served now and the one a rollback would return to."""
    check_admin_key(request)
    known(request, name)
    return request.app.state.registry.info(name)


async def admin_switch(name: str, request: HTTPRequest):
    """POST /admin/models/NAME: serve the checkpoint at body.path as NAME's new version.

    An existing NAME switches once the new version has loaded and warmed up; a new one is added only
    with "create": true. A checkpoint that does not load is a 422 and the current version keeps
    serving; past the server's max_models, 409."""
    check_admin_key(request)
    req = parse(await read_body(request), SwitchRequest)
    registry = request.app.state.registry
    if registry._load is None:
        raise APIError(400, "this server was built around an in-memory model and cannot load checkpoints")
    new_name(request, name, req.create)
    try:  # loading and warming up take seconds: off the event loop, which keeps serving meanwhile
        path = checkpoint_in_root(request.app.state.models_root, req.path)
        old, new = await asyncio.to_thread(registry.switch, name, str(path), req.create)
    except APIError:
        raise
    except TooManyModels as e:
        raise APIError(409, str(e), param="model", code="too_many_models")
    except Exception as e:  # the checkpoint's fault, whatever it is: the server is fine
        reason = refusal(e)
        log.warning("admin: %s refused %s: %s", name, req.path[:200], reason)
        raise APIError(422, f"version refused, {name!r} keeps serving its current one: {reason}",
                       param="path", code="bad_checkpoint")
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
