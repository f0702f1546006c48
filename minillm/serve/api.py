"""The HTTP API behind `minillm serve`: OpenAI-compatible completions over the batching engine.

Endpoints (the subset of OpenAI's legacy Completions API that a from-scratch model can honour):
    POST /v1/completions   prompt (string or list), max_tokens, temperature, top_p, top_k, stop, n,
                           seed, stream (server-sent events: `data: {...}` chunks, then `data: [DONE]`)
    GET  /v1/models        the one model served
    GET  /health           200 while the decode loop runs (a load balancer's readiness probe)
    GET  /metrics          Prometheus text format: requests by status, tokens, latency, queue, batch

How a request flows: the event loop validates it, tokenizes it and puts it in the engine's queue
(minillm.generate.batching). A background thread runs the model; it hands text back through
`loop.call_soon_threadsafe`, so the event loop never waits on a forward pass and keeps accepting
requests, streaming tokens, and noticing clients that hang up (their rows leave the batch at once).

Input rules. Unknown fields, bad types and out-of-range values are 400 with OpenAI's error shape
{"error": {"message", "type", "param", "code"}}, and so is everything else a client can get wrong:
bodies that are not UTF-8 or not JSON, JSON nested too deep to parse, integers beyond 64 bits.
max_tokens is 1 .. block_size-1. A temperature below MIN_TEMPERATURE is greedy, like 0 (vLLM does
the same below 1e-5): softmax(z / τ) is the argmax's one-hot long before τ reaches 0. A prompt longer
than block_size - max_tokens tokens is CROPPED to its last block_size - max_tokens tokens (as nanoGPT
crops to the context), so prompt + completion always fits the KV cache; usage.prompt_tokens reports
the tokens actually used. A full queue answers 429 with Retry-After.

Hostile clients. The body is read in pieces and reading stops past MAX_BODY_BYTES (413, connection
closed), whether or not it declared a Content-Length, so an endless upload costs no memory. POST
bodies must be declared JSON (application/json or application/*+json; 415 otherwise): a web page can
send a cross-site text/plain or form POST without asking the user, but not a JSON one. With an API
key, /v1/* and /openapi.json need `Authorization: Bearer KEY` (any string is a key: it is compared
as UTF-8 bytes, in constant time); /health and /metrics stay open for probes and scrapers. Browsers
get CORS headers only for the origins given in `cors_origins`. A request that fails while its rows
are being sampled fails alone (minillm.generate.batching), never its neighbours in the batch.

    app = build_app(model, tokenizer, "shakespeare", max_batch_size=16, max_queue=64)
    uvicorn.run(app, port=8000)          # what `minillm serve` does
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid

from minillm.generate.batching import BatchEngine, Event, QueueFull, Request, SamplingParams
from minillm.serve.metrics import Metrics, MetricsMiddleware
from minillm.serve.protocol import (MAX_BODY_BYTES, MAX_STOP, MIN_TEMPERATURE, RETRY_AFTER_S, APIError,  # noqa: F401
                                    CompletionRequest, _is_json, parse, read_body)

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


def build_app(model, tokenizer, model_name: str = "minillm", max_batch_size: int = 16,
              max_queue: int = 64, api_key: str | None = None, seed: int = 0,
              cors_origins: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app around a loaded model; the engine thread starts and stops with the app.

    api_key: if given, /v1/* and /openapi.json need `Authorization: Bearer KEY`.
    cors_origins: web origins whose pages may call the API from a browser ("*" for any); none by
    default, so a browser only lets pages served by this same origin read the answers.
    """
    if tokenizer is None:
        raise ValueError("serving needs the checkpoint's tokenizer.json (text in, text out)")
    if api_key is not None and api_key == "":
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    cors_origins = _check_origins(list(cors_origins))
    # the end-of-text token of GPT-2, Llama 2/Mistral, BERT-style, Llama 3 and Qwen2/SmolLM2 vocabularies
    eos = next((tokenizer.special_tokens[s] for s in ("<|endoftext|>", "</s>", "[EOS]", "<|end_of_text|>",
                                                      "<|im_end|>")
                if s in getattr(tokenizer, "special_tokens", {})), None)
    engine = BatchEngine(model, tokenizer, max_batch_size, max_queue, eos_id=eos, seed=seed)
    metrics = Metrics()
    block_size, created = model.cfg.block_size, int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    # /docs and /redoc stay off (their pages load scripts from a CDN); /openapi.json is a route
    # below, so that it can ask for the API key like /v1/*
    app = FastAPI(title="minillm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    if cors_origins:
        # answers preflight OPTIONS itself (browsers send them without the Authorization header),
        # and adds Access-Control-Allow-Origin to answers for the allowed origins only. No
        # credentials: the key travels in a header the page sets, not in a cookie.
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: counts everything

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

    key = api_key.encode("utf-8") if api_key is not None else None

    def check_auth(request: HTTPRequest) -> None:
        if key is None:
            return
        # Starlette decodes header bytes as latin-1, so encoding back gives the bytes that were
        # sent: a UTF-8 key arrives as its UTF-8 bytes. The scheme is case-insensitive (RFC 9110).
        scheme, _, given = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
        # compare_digest: the time taken does not reveal how many leading bytes were right
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.lstrip(b" "), key)):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: HTTPRequest):
        check_auth(request)
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the decode loop is not running", type="server_error")
        return {"status": "ok", "model": model_name, "active_rows": engine.active_rows,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minillm", "max_model_len": block_size}]}

    def prepare(req: CompletionRequest) -> tuple[list[list[int]], SamplingParams]:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server has {model_name!r}",
                           param="model", code="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(p == "" for p in prompts):
            raise APIError(400, "prompt must be a non-empty string (or list of them): an empty prompt "
                           "gives the model nothing to continue", param="prompt")
        if req.max_tokens > block_size - 1:
            raise APIError(400, f"max_tokens={req.max_tokens} is more than this model's context allows "
                           f"(block_size {block_size}, at least one prompt token): use at most "
                           f"{block_size - 1}", param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP or any(s == "" for s in stops):
            raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop")
        if len(prompts) * req.n > max_batch_size:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={req.n} completions exceed this server's "
                           f"max_batch_size={max_batch_size}", param="n")
        ids = []
        for p in prompts:
            try:
                tokens = tokenizer.encode(p)
            except ValueError as e:  # e.g. a character outside a CharTokenizer's vocabulary
                raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt")
            ids.append(tokens[-(block_size - req.max_tokens):])  # crop: keep the most recent tokens
        temperature = 0.0 if req.temperature < MIN_TEMPERATURE else req.temperature  # greedy
        params = SamplingParams(req.max_tokens, temperature, req.top_k, req.top_p, tuple(stops), req.seed)
        return ids, params

    async def watch_disconnect(request: HTTPRequest, queue: asyncio.Queue) -> None:
        """Put None in the request's event queue when its client hangs up.

        With the body read, the server's receive() has nothing more to say until the client
        disconnects (or the response is complete), so this task just waits for that message."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        check_auth(request)  # before reading anything: strangers cannot make us read bodies
        content_type = request.headers.get("content-type", "")
        if not _is_json(content_type):
            raise APIError(415, f"Content-Type must be application/json (UTF-8), got "
                           f"{content_type[:100]!r}", code="unsupported_media_type")
        body = parse(await read_body(request), CompletionRequest)
        # tokenizing a long prompt (pure-Python BPE) would stall every stream: do it off the loop
        prompt_ids, params = await asyncio.to_thread(prepare, body)
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
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        n_prompt = sum(len(p) for p in prompt_ids)
        state = {"over": False}  # set once the request has ended, for whatever reason

        def end(client_left: bool) -> None:
            watcher.cancel()
            if client_left and not state["over"]:
                engine.cancel(job)  # queued: dropped now; decoding: its rows leave before the next step
                metrics.client_disconnects += 1
                request.scope["minillm.client_left"] = True  # MetricsMiddleware records a 499
            state["over"] = True

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
                        finished += event.finish_reason is not None
                        choice = {"text": event.text, "index": event.index, "logprobs": None,
                                  "finish_reason": event.finish_reason}
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                    end(client_left=False)
                    yield "data: [DONE]\n\n"
                finally:  # still running here = cancelled by Starlette because the client went away
                    end(client_left=True)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, ends, tokens = [""] * job.n_rows, [None] * job.n_rows, [0] * job.n_rows
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
        return {**head, "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                                    for i, (t, f) in enumerate(zip(texts, ends))],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                          "total_tokens": n_prompt + n_new}}

    return app


