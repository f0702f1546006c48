"""The HTTP API behind `minillm serve`: OpenAI-compatible completions and chat over the batching engine.

Endpoints (the subset of OpenAI's API that a from-scratch model can honour):
    POST /v1/completions        prompt (string or list), max_tokens, temperature, top_p, top_k, stop, n,
                                seed, stream (server-sent events: `data: {...}` chunks, then `data: [DONE]`)
    POST /v1/chat/completions   messages (system/user/assistant), the same sampling fields; the messages
                                become one prompt in the model's own template (serve/chat.py)
    GET  /v1/models             every model served, with its current version (step, sha256, creation time)
    POST /admin/models/NAME     {"path": CHECKPOINT}: load, warm up and switch NAME to a new version
                                ({"path": ..., "create": true} adds a new NAME; see serve/admin.py)
    POST /admin/models/NAME/rollback   back to the previous version (serve/registry.py)
    GET  /admin/models/NAME     current and previous version
    GET  /health                200 while every decode loop runs (a load balancer's readiness probe)
    GET  /metrics               Prometheus text format: totals, and per model and version

A request names its model with "model"; without one it gets the first model the server was started
with. An unknown name is a 404 that lists the names served.

How a request flows: the event loop validates it, tokenizes it and puts it in the queue of its model
version's engine (minillm.generate.batching); a background thread per version runs the model and
hands the text back, so the event loop never waits on a forward pass. A request holds its version
until it ends, so a switch never cuts it short. The phases are named functions in serve/handlers.py.

Input rules. Unknown fields, bad types and out-of-range values are 400 with OpenAI's error shape
{"error": {"message", "type", "param", "code"}}, and so is everything else a client can get wrong:
bodies that are not UTF-8 or not JSON, JSON nested too deep to parse, integers beyond 64 bits, chat
roles other than system/developer/user/assistant, content parts other than text (text parts,
[{"type": "text", "text": ...}], are joined by newlines). An unknown key is named where it is
('messages[0].foo'). max_tokens is 1 .. block_size-1. A temperature below MIN_TEMPERATURE is greedy,
like 0 (vLLM does the same below 1e-5): softmax(z / τ) is the argmax's one-hot long before τ reaches
0; a top_p below MIN_TOP_P (1e-8) is read as MIN_TOP_P, whose nucleus is the top token alone. A chat
holds at most MAX_MESSAGES messages and a prompt at most MAX_PROMPT_TOKENS tokens (and 4× as many
characters, checked before tokenizing): 413 past either. A prompt longer than block_size -
max_tokens tokens is CROPPED to its last block_size - max_tokens tokens (as nanoGPT crops to the
context), so prompt + completion always fits the KV cache; usage.prompt_tokens reports the tokens
actually used. A full queue answers 429 with Retry-After.

Hostile clients. The body is read in pieces and reading stops past MAX_BODY_BYTES (413, connection
closed), whether or not it declared a Content-Length, so an endless upload costs no memory. It is
read before routing (limits.ReadBodyFirst: a waiting upload holds little); a body not in within
body_timeout_s is a 408, and a client that hangs up mid-upload is one access-log line (499), not a
traceback. Bodies of LARGE_BODY_BYTES or more share a parse budget (serve/limits.py), so one client
posting megabytes cannot take the GIL from everyone else. POST bodies must be declared JSON
(application/json or application/*+json; 415 otherwise): a web page can send a cross-site
text/plain or form POST without asking the user, but not a JSON one. With an API
key, /v1/* and /openapi.json need `Authorization: Bearer KEY` (any string is a key: it is compared
as UTF-8 bytes, in constant time); /health and /metrics stay open for probes and scrapers. /admin/*
needs the admin key, and is off without one. Browsers get CORS headers only for the origins given in
`cors_origins`. A request that fails while its rows are being sampled fails alone
(minillm.generate.batching), never its neighbours in the batch.

    app = build_app(model, tokenizer, "shakespeare", max_batch_size=16, max_queue=64)
    uvicorn.run(app, port=8000, **server_options())   # what `minillm serve` does: header deadline,
                                                      # connection cap (serve/limits.py)

Where the code is: this module builds the app and wires each path to a named handler, which reads
what the server holds from `request.app.state` (registry, metrics, default_model, api_key,
admin_key, models_root, body_timeout_s, body_budget); serve/handlers.py holds the OpenAI endpoints
and the phases of a generation request, serve/admin.py the model update service, serve/auth.py the
API keys, serve/limits.py what keeps one client from slowing the others.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from minillm.serve import admin, handlers
from minillm.serve.auth import key_bytes
from minillm.serve.limits import BodyBudget, ReadBodyFirst
from minillm.serve.metrics import Metrics, MetricsMiddleware
# the limits are re-exported: callers and tests read them from here (serve.api.MAX_BODY_BYTES)
from minillm.serve.protocol import (BODY_TIMEOUT_S, MAX_BODY_BYTES, MAX_MESSAGES, MAX_PROMPT_CHARS,  # noqa: F401
                                    MAX_PROMPT_TOKENS, MAX_STOP, MIN_TEMPERATURE, MIN_TOP_P, RETRY_AFTER_S,
                                    APIError)
from minillm.serve.registry import Registry

try:
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e


# --- what build_app assembles ----------------------------------------------------------------------

def _check_origins(origins: list[str]) -> list[str]:
    """CORS origins as browsers send them: scheme://host[:port], no path, no trailing slash; or *."""
    for o in origins:
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
            raise ValueError(f"CORS origin {o!r} is not scheme://host[:port] (e.g. "
                             f"'http://localhost:3000', no trailing slash) or '*'")
    return origins


def make_registry(model, tokenizer, model_name: str, max_batch_size: int, max_queue: int,
                  seed: int) -> Registry:
    """`model` itself if it is a Registry; otherwise a Registry serving that one model as `model_name`."""
    if isinstance(model, Registry):
        return model
    if tokenizer is None:
        raise ValueError("serving needs the checkpoint's tokenizer.json (text in, text out)")
    registry = Registry(None, max_batch_size, max_queue, seed)
    registry.add(registry.make_version(model_name, model, tokenizer, start=False))  # started by the lifespan
    return registry


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """The engine threads start with the app and stop with it."""
    app.state.registry.start()
    yield
    app.state.registry.shutdown()


async def api_error(request, exc: APIError):
    """Every refusal a handler raises, in OpenAI's error shape."""
    return exc.response()


async def server_error(request, exc: Exception):
    """A bug is still a JSON error; uvicorn logs the traceback."""
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


async def http_error(request, exc: StarletteHTTPException):
    """Starlette's own 404 (no such path) and 405 (wrong method), in the same shape as every other error."""
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                    else None).response()


# --- the app ---------------------------------------------------------------------------------------

def build_app(model, tokenizer=None, model_name: str = "minillm", max_batch_size: int = 16,
              max_queue: int = 64, api_key: str | None = None, seed: int = 0,
              cors_origins: list[str] | tuple[str, ...] = (), admin_key: str | None = None,
              log_requests: bool = True, models_root: str | Path | None = None,
              body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app around a loaded model, or around a Registry of several (serve/registry.py).

    api_key: if given, /v1/* and /openapi.json need `Authorization: Bearer KEY`.
    admin_key: if given, /admin/* is on and needs `Authorization: Bearer ADMIN_KEY`; off otherwise.
    cors_origins: web origins whose pages may call the API from a browser ("*" for any); none by
    default, so a browser only lets pages served by this same origin read the answers.
    models_root: the folder the admin API may load checkpoints from (serve/admin.py); None leaves
    paths unconfined, for in-process servers whose caller picks them (`minillm serve` always sets one).
    body_timeout_s: a request body must arrive within this many seconds of its headers (408).
    """
    keys = key_bytes("api_key", api_key), key_bytes("admin_key", admin_key)
    cors_origins = _check_origins(list(cors_origins))
    registry = make_registry(model, tokenizer, model_name, max_batch_size, max_queue, seed)
    # /docs and /redoc stay off (their pages load scripts from a CDN); /openapi.json is a route
    # below, so that it can ask for the API key like /v1/*
    app = FastAPI(title="minillm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics, app.state.default_model = registry, Metrics(), registry.names()[0]
    app.state.api_key, app.state.admin_key = keys
    app.state.models_root = Path(os.path.realpath(models_root)) if models_root is not None else None
    app.state.body_timeout_s, app.state.body_budget = body_timeout_s, BodyBudget()
    if cors_origins:
        # answers preflight OPTIONS itself (browsers send them without the Authorization header),
        # and adds Access-Control-Allow-Origin to answers for the allowed origins only. No
        # credentials: the key travels in a header the page sets, not in a cookie.
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    app.add_middleware(ReadBodyFirst, state=app.state)  # slow uploads wait here, holding little
    # added last = outermost: counts and logs everything
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, log_requests=log_requests)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, server_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    route = app.add_api_route
    route("/openapi.json", handlers.openapi, methods=["GET"], include_in_schema=False)
    route("/health", handlers.health, methods=["GET"])
    route("/metrics", handlers.prometheus, methods=["GET"])
    route("/v1/models", handlers.models, methods=["GET"])
    route("/admin/models/{name}", admin.admin_info, methods=["GET"])
    route("/admin/models/{name}", admin.admin_switch, methods=["POST"])
    route("/admin/models/{name}/rollback", admin.admin_rollback, methods=["POST"])
    route("/v1/completions", handlers.completions, methods=["POST"])
    route("/v1/chat/completions", handlers.chat_completions, methods=["POST"])
    return app
