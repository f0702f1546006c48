"""The HTTP API behind `minillm serve`: OpenAI-compatible completions and chat over the batching engine.

Endpoints (the subset of OpenAI's API that a from-scratch model can honour):
    POST /v1/completions        prompt (string or list), max_tokens, temperature, top_p, top_k, stop, n,
                                seed, stream (server-sent events: `data: {...}` chunks, then `data: [DONE]`)
    POST /v1/chat/completions   messages (system/user/assistant), the same sampling fields; the messages
                                become one prompt in the model's own template (serve/chat.py)
    GET  /v1/models             every model served, with its current version (step, sha256, creation time)
    POST /admin/models/NAME     {"path": CHECKPOINT}: load, warm up and switch NAME to a new version
    POST /admin/models/NAME/rollback   back to the previous version (serve/registry.py)
    GET  /admin/models/NAME     current and previous version
    GET  /health                200 while every decode loop runs (a load balancer's readiness probe)
    GET  /metrics               Prometheus text format: totals, and per model and version

A request names its model with "model"; without one it gets the first model the server was started
with. An unknown name is a 404 that lists the names served.

How a request flows: the event loop validates it, tokenizes it and puts it in the queue of its model
version's engine (minillm.generate.batching). A background thread per version runs the model; it
hands text back through `loop.call_soon_threadsafe`, so the event loop never waits on a forward pass
and keeps accepting requests, streaming tokens, and noticing clients that hang up (their rows leave
the batch at once). A request holds its version until it ends, so a switch never cuts it short.

Input rules. Unknown fields, bad types and out-of-range values are 400 with OpenAI's error shape
{"error": {"message", "type", "param", "code"}}, and so is everything else a client can get wrong:
bodies that are not UTF-8 or not JSON, JSON nested too deep to parse, integers beyond 64 bits, chat
roles other than system/developer/user/assistant. max_tokens is 1 .. block_size-1. A temperature
below MIN_TEMPERATURE is greedy, like 0 (vLLM does the same below 1e-5): softmax(z / τ) is the
argmax's one-hot long before τ reaches 0. A prompt longer than block_size - max_tokens tokens is
CROPPED to its last block_size - max_tokens tokens (as nanoGPT crops to the context), so prompt +
completion always fits the KV cache; usage.prompt_tokens reports the tokens actually used. A full
queue answers 429 with Retry-After.

Hostile clients. The body is read in pieces and reading stops past MAX_BODY_BYTES (413, connection
closed), whether or not it declared a Content-Length, so an endless upload costs no memory. POST
bodies must be declared JSON (application/json or application/*+json; 415 otherwise): a web page can
send a cross-site text/plain or form POST without asking the user, but not a JSON one. With an API
key, /v1/* and /openapi.json need `Authorization: Bearer KEY` (any string is a key: it is compared
as UTF-8 bytes, in constant time); /health and /metrics stay open for probes and scrapers. /admin/*
needs the admin key, and is off without one. Browsers get CORS headers only for the origins given in
`cors_origins`. A request that fails while its rows are being sampled fails alone
(minillm.generate.batching), never its neighbours in the batch.

    app = build_app(model, tokenizer, "shakespeare", max_batch_size=16, max_queue=64)
    uvicorn.run(app, port=8000)          # what `minillm serve` does (several models: a Registry)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid

from minillm.generate.batching import Event, QueueFull, Request, SamplingParams
from minillm.serve.chat import chat_prompt
from minillm.serve.metrics import Metrics, MetricsMiddleware
from minillm.serve.protocol import (MAX_BODY_BYTES, MAX_STOP, MIN_TEMPERATURE, RETRY_AFTER_S, APIError,  # noqa: F401
                                    ChatRequest, CompletionRequest, SwitchRequest, _is_json, parse, read_body)
from minillm.serve.registry import Registry

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e


# --- the app ---------------------------------------------------------------------------------------

def _check_origins(origins: list[str]) -> list[str]:
    """CORS origins as browsers send them: scheme://host[:port], no path, no trailing slash; or *."""
    for o in origins:
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
            raise ValueError(f"CORS origin {o!r} is not scheme://host[:port] (e.g. "
                             f"'http://localhost:3000', no trailing slash) or '*'")
    return origins



def build_app(model, tokenizer=None, model_name: str = "minillm", max_batch_size: int = 16,
              max_queue: int = 64, api_key: str | None = None, seed: int = 0,
              cors_origins: list[str] | tuple[str, ...] = (), admin_key: str | None = None,
              log_requests: bool = True) -> FastAPI:
    """The FastAPI app around a loaded model, or around a Registry of several (serve/registry.py).
    The engine threads start and stop with the app.

    api_key: if given, /v1/* and /openapi.json need `Authorization: Bearer KEY`.
    admin_key: if given, /admin/* is on and needs `Authorization: Bearer ADMIN_KEY`; off otherwise.
    cors_origins: web origins whose pages may call the API from a browser ("*" for any); none by
    default, so a browser only lets pages served by this same origin read the answers.
    """
    for what, k in (("api_key", api_key), ("admin_key", admin_key)):
        if k is not None and k == "":
            raise ValueError(f"{what} must be a non-empty string (or None for none)")
    cors_origins = _check_origins(list(cors_origins))
    if isinstance(model, Registry):
        registry = model
    else:
        if tokenizer is None:
            raise ValueError("serving needs the checkpoint's tokenizer.json (text in, text out)")
        registry = Registry(None, max_batch_size, max_queue, seed)
        registry.add(registry.make_version(model_name, model, tokenizer, start=False))  # started by the lifespan
    default = registry.names()[0]
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        registry.start()
        yield
        registry.shutdown()

    # /docs and /redoc stay off (their pages load scripts from a CDN); /openapi.json is a route
    # below, so that it can ask for the API key like /v1/*
    app = FastAPI(title="minillm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics = registry, metrics
    if cors_origins:
        # answers preflight OPTIONS itself (browsers send them without the Authorization header),
        # and adds Access-Control-Allow-Origin to answers for the allowed origins only. No
        # credentials: the key travels in a header the page sets, not in a cookie.
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])
    # added last = outermost: counts and logs everything
    app.add_middleware(MetricsMiddleware, metrics=metrics, log_requests=log_requests)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)  # a bug is still a JSON error; uvicorn logs the traceback
    async def server_error(request, exc):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @app.exception_handler(StarletteHTTPException)  # 404 / 405 in the same shape as every other error
    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                        else None).response()

    def bearer(key: str | None):
        raw = key.encode("utf-8") if key is not None else None

        def check(request: HTTPRequest, what: str = "API key") -> None:
            if raw is None:
                return
            # Starlette decodes header bytes as latin-1, so encoding back gives the bytes that were
            # sent: a UTF-8 key arrives as its UTF-8 bytes. The scheme is case-insensitive (RFC 9110).
            scheme, _, given = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
            # compare_digest: the time taken does not reveal how many leading bytes were right
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.lstrip(b" "), raw)):
                raise APIError(401, f"missing or wrong {what}: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        return check

    check_auth, check_admin = bearer(api_key), bearer(admin_key)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: HTTPRequest):
        check_auth(request)
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health():
        versions = registry.versions()
        if not all(v.engine.alive for v in versions):
            raise APIError(503, "a decode loop is not running", type="server_error")
        return {"status": "ok", "model": default, "models": registry.names(),
                "active_rows": sum(v.engine.active_rows for v in versions),
                "queue_depth": sum(v.engine.queue_depth for v in versions)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_auth(request)
        data = []
        for name in registry.names():
            v = registry.current(name)
            data.append({"id": name, "object": "model", "created": v.created, "owned_by": "minillm",
                         "max_model_len": v.block_size, **v.describe()})
        return {"object": "list", "data": data}

    # --- the model update service (serve/registry.py) -----------------------------------------------
    def admin(request: HTTPRequest) -> None:
        if admin_key is None:
            raise APIError(403, "the admin API is off: start the server with --admin-key (or $MINILLM_ADMIN_KEY)",
                           code="admin_disabled")
        check_admin(request, "admin key")

    def known(name: str) -> None:
        if name not in registry.names():
            raise APIError(404, f"model {name!r} is not served here; models: {', '.join(registry.names())}",
                           param="model", code="model_not_found")

    @app.get("/admin/models/{name}")
    async def admin_info(name: str, request: HTTPRequest):
        admin(request)
        known(name)
        return registry.info(name)

    @app.post("/admin/models/{name}")
    async def admin_switch(name: str, request: HTTPRequest):
        admin(request)
        req = parse(await read_body(request), SwitchRequest)
        if registry._load is None:
            raise APIError(400, "this server was built around an in-memory model and cannot load checkpoints")
        try:  # loading and warming up take seconds: off the event loop, which keeps serving meanwhile
            old, new = await asyncio.to_thread(registry.switch, name, req.path)
        except (ValueError, FileNotFoundError, KeyError, OSError) as e:  # CheckpointError is a ValueError
            raise APIError(422, f"version refused, {name!r} keeps serving its current one: {e}", param="path",
                           code="bad_checkpoint")
        return {"model": name, "current": new.describe(), "previous": old.describe() if old else None}

    @app.post("/admin/models/{name}/rollback")
    async def admin_rollback(name: str, request: HTTPRequest):
        admin(request)
        known(name)
        try:
            frm, to = registry.rollback(name)
        except ValueError as e:
            raise APIError(409, str(e), code="no_previous_version")
        return {"model": name, "current": to.describe(), "previous": frm.describe()}

    # --- generation ------------------------------------------------------------------------------------
    def fit(v, prompts: list[str], max_tokens: int | None, stops: list[str], n: int, temperature: float,
            top_k, top_p, seed, param: str = "prompt") -> tuple[list[list[int]], SamplingParams]:
        """Token ids cropped to the context, and the sampling parameters; APIError on bad values."""
        block_size = v.block_size
        if max_tokens is None:  # chat without max_tokens: whatever the context leaves, at least one token
            longest = max(len(v.tokenizer.encode(p)) for p in prompts)
            max_tokens = max(1, min(block_size - 1, block_size - longest))
        if max_tokens > block_size - 1:
            raise APIError(400, f"max_tokens={max_tokens} is more than this model's context allows "
                           f"(block_size {block_size}, at least one prompt token): use at most "
                           f"{block_size - 1}", param="max_tokens")
        if len(stops) > MAX_STOP + 1 or any(s == "" for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop")
        if len(prompts) * n > registry.max_batch_size:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={n} completions exceed this server's "
                           f"max_batch_size={registry.max_batch_size}", param="n")
        ids = []
        for p in prompts:
            try:
                tokens = v.tokenizer.encode(p)
            except ValueError as e:  # e.g. a character outside a CharTokenizer's vocabulary
                raise APIError(400, f"{param} cannot be tokenized: {e}", param=param)
            ids.append(tokens[-(block_size - max_tokens):])  # crop: keep the most recent tokens
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature  # greedy
        return ids, SamplingParams(max_tokens, temperature, top_k, top_p, tuple(stops), seed)

    def user_stops(stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(s == "" for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop")
        return stops

    def prepare_completion(v, req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(p == "" for p in prompts):
            raise APIError(400, "prompt must be a non-empty string (or list of them): an empty prompt "
                           "gives the model nothing to continue", param="prompt")
        return fit(v, prompts, req.max_tokens, user_stops(req.stop), req.n, req.temperature, req.top_k,
                   req.top_p, req.seed)

    def prepare_chat(v, req: ChatRequest):
        try:
            prompt, template_stops = chat_prompt([m.model_dump() for m in req.messages], v.meta.get("instruct"))
        except ValueError as e:
            raise APIError(400, str(e), param="messages")
        return fit(v, [prompt], req.max_completion_tokens or req.max_tokens, user_stops(req.stop) + template_stops,
                   req.n, req.temperature, req.top_k, req.top_p, req.seed, param="messages")

    async def watch_disconnect(request: HTTPRequest, queue: asyncio.Queue) -> None:
        """Put None in the request's event queue when its client hangs up.

        With the body read, the server's receive() has nothing more to say until the client
        disconnects (or the response is complete), so this task just waits for that message."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    async def generate(request: HTTPRequest, schema, prepare, chat: bool):
        """One generation request, completion or chat: the same flow, two response shapes."""
        check_auth(request)  # before reading anything: strangers cannot make us read bodies
        content_type = request.headers.get("content-type", "")
        if not _is_json(content_type):
            raise APIError(415, f"Content-Type must be application/json (UTF-8), got "
                           f"{content_type[:100]!r}", code="unsupported_media_type")
        body = parse(await read_body(request), schema)
        name = body.model if body.model is not None else default
        log = request.scope.setdefault("minillm.log", {})
        log.update(model=name, stream=body.stream)
        try:
            v = registry.acquire(name)  # this request's version, whatever switches happen meanwhile
        except KeyError:
            raise APIError(404, f"model {name!r} is not served here; this server has "
                           f"{', '.join(repr(n) for n in registry.names())}", param="model", code="model_not_found")
        log["version"] = v.version
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                registry.release(v)

        try:
            # tokenizing a long prompt (pure-Python BPE) would stall every stream: do it off the loop
            prompt_ids, params = await asyncio.to_thread(prepare, v, body)
            return await run(request, v, body, prompt_ids, params, chat, log, release)
        except BaseException:
            release()
            raise

    async def run(request, v, body, prompt_ids, params, chat: bool, log: dict, release):
        engine = v.engine
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()  # Event | None (client left)
        job = Request(prompt_ids, params, body.n, stream=body.stream)

        def emit(event: Event) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutting down): stop this job
                job.cancelled = True

        job.emit = emit
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        watcher = asyncio.create_task(watch_disconnect(request, queue))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.model or default,
                "system_fingerprint": v.version}  # OpenAI's field for "which backend version answered"
        n_prompt = sum(len(p) for p in prompt_ids)
        log.update(request_id=rid, prompt_tokens=n_prompt)
        state = {"over": False}  # set once the request has ended, for whatever reason
        tokens = [0] * job.n_rows

        def end(client_left: bool) -> None:
            watcher.cancel()
            if client_left and not state["over"]:
                engine.cancel(job)  # queued: dropped now; decoding: its rows leave before the next step
                metrics.client_disconnects += 1
                request.scope["minillm.client_left"] = True  # MetricsMiddleware records a 499
            if not state["over"]:
                log["completion_tokens"] = sum(tokens)
                release()  # the version may be retired once its last request has ended
            state["over"] = True

        def chunk(event: Event) -> dict:
            if chat:
                delta = {"role": "assistant", "content": event.text} if event.text or event.finish_reason is None \
                    else {}
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": event.index, "delta": delta, "logprobs": None,
                                     "finish_reason": event.finish_reason}]}
            return {**head, "choices": [{"text": event.text, "index": event.index, "logprobs": None,
                                         "finish_reason": event.finish_reason}]}

        if body.stream:
            async def sse():
                try:
                    finished = 0
                    while finished < job.n_rows:
                        event = await queue.get()
                        if event is None:
                            end(client_left=True)
                            return
                        if event.error:
                            err = {"message": event.error, "type": "server_error", "param": None,
                                   "code": None}
                            end(client_left=False)
                            yield f"data: {json.dumps({'error': err})}\n\n"
                            return
                        tokens[event.index] = event.tokens
                        finished += event.finish_reason is not None
                        yield f"data: {json.dumps(chunk(event))}\n\n"
                    end(client_left=False)
                    yield "data: [DONE]\n\n"
                finally:  # still running here = cancelled by Starlette because the client went away
                    end(client_left=True)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, ends = [""] * job.n_rows, [None] * job.n_rows
        try:
            while any(e is None for e in ends):
                event = await queue.get()
                if event is None:
                    end(client_left=True)
                    return JSONResponse({}, status_code=499)  # nobody reads it; recorded in /metrics
                if event.error:
                    end(client_left=False)
                    raise APIError(500, f"generation failed: {event.error}", type="server_error")
                texts[event.index] += event.text
                ends[event.index], tokens[event.index] = event.finish_reason, event.tokens
            end(client_left=False)
        finally:
            end(client_left=True)  # a no-op unless we are being cancelled mid-request
        n_new = sum(tokens)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, ends))]
        else:
            choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, ends))]
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await generate(request, CompletionRequest, prepare_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await generate(request, ChatRequest, prepare_chat, chat=True)

    return app
