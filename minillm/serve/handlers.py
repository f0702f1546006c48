"""The OpenAI endpoints of `minillm serve`: one named function per endpoint and per request phase.

build_app (serve/api.py) wires these functions to their paths; they keep no state of their own.
What the server holds lives on `request.app.state`: `registry` (the models and their versions),
`metrics`, `default_model` (the name a request without "model" gets), and the API keys
(serve/auth.py).

A generation request, completion or chat, takes one road through these phases:

    read_request    API key, Content-Type, the body (read by limits.ReadBodyFirst already, within its
                    timeout) validated; a large body first waits for the shared parse budget and
                    is parsed on a worker thread                   (serve/protocol.py, limits.py)
    acquire         the model version this request holds until it ends, whatever switches happen
    prepare_*       prompts tokenized and cropped to the context, sampling parameters checked
    submit          into the version's engine queue (429 when full) → a Generation
    stream/collect  server-sent events as the text arrives, or one JSON answer at the end
    finish          the end, whatever caused it: rows cancelled if the client left, log, release

The event loop never waits on a forward pass: tokenizing runs on a worker thread, and a background
thread per version runs the model and hands its Events back with `loop.call_soon_threadsafe`, so
the loop keeps accepting requests, streaming tokens and noticing clients that hang up (their rows
leave the batch at once).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from minillm.generate.batching import Event, QueueFull, Request, SamplingParams
from minillm.serve.auth import check_api_key
from minillm.serve.chat import chat_prompt
from minillm.serve.protocol import (LARGE_BODY_BYTES, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_STOP,
                                    MIN_TEMPERATURE, MIN_TOP_P, RETRY_AFTER_S, APIError, ChatRequest,
                                    CompletionRequest, _is_json, parse, read_body)
from minillm.serve.registry import ModelVersion

try:
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e


# --- the small endpoints ---------------------------------------------------------------------------

async def openapi(request: HTTPRequest):
    """GET /openapi.json: the schema, behind the API key like /v1/* (it lists what a key unlocks)."""
    check_api_key(request)
    return JSONResponse(request.app.openapi())


async def health(request: HTTPRequest):
    """GET /health: 200 while every decode loop runs, 503 otherwise (a load balancer's probe)."""
    registry = request.app.state.registry
    versions = registry.versions()
    if not all(v.engine.alive for v in versions):
        raise APIError(503, "a decode loop is not running", type="server_error")
    return {"status": "ok", "model": request.app.state.default_model, "models": registry.names(),
            "active_rows": sum(v.engine.active_rows for v in versions),
            "queue_depth": sum(v.engine.queue_depth for v in versions)}


async def prometheus(request: HTTPRequest):
    """GET /metrics: Prometheus's text format (serve/metrics.py)."""
    state = request.app.state
    return PlainTextResponse(state.metrics.render(state.registry), media_type="text/plain; version=0.0.4")


async def models(request: HTTPRequest):
    """GET /v1/models: every model served, with its current version."""
    check_api_key(request)
    registry, data = request.app.state.registry, []
    for name in registry.names():
        v = registry.current(name)
        data.append({"id": name, "object": "model", "created": v.created, "owned_by": "minillm",
                     "max_model_len": v.block_size, **v.describe()})
    return {"object": "list", "data": data}


# --- generation: the endpoints ---------------------------------------------------------------------

async def completions(request: HTTPRequest):
    """POST /v1/completions: text to continue, `prompt` (a string or a list of them)."""
    return await generate(request, CompletionRequest, prepare_completion, chat=False)


async def chat_completions(request: HTTPRequest):
    """POST /v1/chat/completions: `messages`, put in the model's template (serve/chat.py)."""
    return await generate(request, ChatRequest, prepare_chat, chat=True)


async def generate(request: HTTPRequest, schema, prepare, chat: bool):
    """One generation request through its phases: the same road for both endpoints."""
    body = await read_request(request, schema)
    v = acquire(request, body)
    registry = request.app.state.registry
    try:
        # tokenizing a long prompt (pure-Python BPE) would stall every stream: do it off the loop
        prompt_ids, params = await asyncio.to_thread(prepare, v, body, registry.max_batch_size)
        gen = submit(request, v, body, prompt_ids, params, chat)
    except BaseException:  # refused before the engine took it: the version is free again
        registry.release(v)
        raise
    # from here on `gen.finish` releases the version, however the request ends
    return stream(gen) if body.stream else await collect(gen)


# --- generation: the phases before the engine ------------------------------------------------------

async def read_request(request: HTTPRequest, schema):
    """The body as `schema`: 401, 415, 413, 408 or 400 (serve/protocol.py) for what a client got wrong.

    A body of LARGE_BODY_BYTES or more first takes its size from the server's BodyBudget (waiting,
    or 429 if the wait would be too long: serve/limits.py), then parses on a worker thread, so the
    event loop keeps streaming other answers while it does."""
    check_api_key(request)  # before reading anything: strangers cannot make us read bodies
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise APIError(415, f"Content-Type must be application/json (UTF-8), got "
                       f"{content_type[:100]!r}", code="unsupported_media_type")
    body = await read_body(request, timeout_s=request.app.state.body_timeout_s)
    if len(body) < LARGE_BODY_BYTES:
        return parse(body, schema)  # ~0.1 ms: a thread hop would cost more than it saves
    wait = request.app.state.body_budget.reserve(len(body))
    if wait is None:
        raise APIError(429, "too many large request bodies at once; retry later", type="rate_limit_error",
                       code="body_budget", headers={"Retry-After": str(RETRY_AFTER_S)})
    await asyncio.sleep(wait)
    return await asyncio.to_thread(parse, body, schema)


def acquire(request: HTTPRequest, body) -> ModelVersion:
    """The version of the requested model that serves this request until it ends (404 if unknown)."""
    registry = request.app.state.registry
    name = body.model if body.model is not None else request.app.state.default_model
    log = request.scope.setdefault("minillm.log", {})  # MetricsMiddleware writes it out at the end
    log.update(model=name, stream=body.stream)
    try:
        v = registry.acquire(name)  # this request's version, whatever switches happen meanwhile
    except KeyError:
        raise APIError(404, f"model {name!r} is not served here; this server has "
                       f"{', '.join(repr(n) for n in registry.names())}", param="model", code="model_not_found")
    log["version"] = v.version
    return v


def prepare_completion(v: ModelVersion, req: CompletionRequest, max_batch_size: int):
    """(token ids per prompt, SamplingParams) for a completion request; APIError on bad values."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or any(p == "" for p in prompts):
        raise APIError(400, "prompt must be a non-empty string (or list of them): an empty prompt "
                       "gives the model nothing to continue", param="prompt")
    return fit(v, req, prompts, req.max_tokens, user_stops(req.stop), max_batch_size)


def prepare_chat(v: ModelVersion, req: ChatRequest, max_batch_size: int):
    """The same for a chat: the messages become one prompt, and the template adds its stop strings."""
    try:
        prompt, template_stops = chat_prompt([m.model_dump() for m in req.messages], v.meta.get("instruct"), v.tokenizer)
    except ValueError as e:
        raise APIError(400, str(e), param="messages")
    return fit(v, req, [prompt], req.max_completion_tokens or req.max_tokens,
               user_stops(req.stop) + template_stops, max_batch_size, param="messages")


def user_stops(stop) -> list[str]:
    """A request's `stop` (a string, a list, or nothing) as a list of up to MAX_STOP strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop")
    return stops


def fit(v: ModelVersion, req, prompts: list[str], max_tokens: int | None, stops: list[str],
        max_batch_size: int, param: str = "prompt") -> tuple[list[list[int]], SamplingParams]:
    """Token ids cropped to the context, and the sampling parameters; APIError on bad values.

    A prompt longer than block_size - max_tokens tokens keeps its last block_size - max_tokens
    tokens (as nanoGPT crops to the context), so prompt + completion always fits the KV cache."""
    block_size = v.block_size
    if max_tokens is not None and max_tokens > block_size - 1:
        raise APIError(400, f"max_tokens={max_tokens} is more than this model's context allows "
                       f"(block_size {block_size}, at least one prompt token): use at most "
                       f"{block_size - 1}", param="max_tokens")
    if len(stops) > MAX_STOP + 1 or any(s == "" for s in stops):  # + 1: a chat template's own stop
        raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", param="stop")
    if len(prompts) * req.n > max_batch_size:
        raise APIError(400, f"{len(prompts)} prompt(s) × n={req.n} completions exceed this server's "
                       f"max_batch_size={max_batch_size}", param="n")
    ids = [tokenize(v, p, param) for p in prompts]
    if max_tokens is None:  # chat without max_tokens: whatever the context leaves, at least one token
        max_tokens = max(1, min(block_size - 1, block_size - max(len(t) for t in ids)))
    ids = [t[-(block_size - max_tokens):] for t in ids]  # crop: keep the most recent tokens
    temperature = 0.0 if req.temperature < MIN_TEMPERATURE else req.temperature  # greedy
    top_p = max(req.top_p, MIN_TOP_P)  # below it, the nucleus is the top token anyway (protocol.py)
    return ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k,
                               top_p=top_p, stop=tuple(stops), seed=req.seed)


def tokenize(v: ModelVersion, prompt: str, param: str = "prompt") -> list[int]:
    """A prompt's token ids; 413 past MAX_PROMPT_TOKENS (or MAX_PROMPT_CHARS, checked before the
    tokenizer runs, so that counting costs nothing), 400 if the tokenizer cannot encode it."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise APIError(413, f"{param} is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,} "
                       f"(and {MAX_PROMPT_TOKENS:,} tokens)", param=param, code="prompt_too_long")
    try:
        tokens = v.tokenizer.encode(prompt)
    except ValueError as e:  # e.g. a character outside a CharTokenizer's vocabulary
        raise APIError(400, f"{param} cannot be tokenized: {e}", param=param)
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise APIError(413, f"{param} is {len(tokens):,} tokens; the limit is {MAX_PROMPT_TOKENS:,}",
                       param=param, code="prompt_too_long")
    return tokens


# --- generation: in the engine ---------------------------------------------------------------------

@dataclass
class Generation:
    """One generation request in flight, from its submission to the engine until it ends."""
    request: HTTPRequest
    version: ModelVersion  # held (registry.acquire) until `finish`
    job: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # the engine's Events, and None once the client has hung up
    head: dict  # id, object, created, model, system_fingerprint: the fields every answer starts with
    chat: bool
    n_prompt: int  # prompt tokens, after cropping
    tokens: list[int] = field(default_factory=list)  # completion tokens so far, per row
    watcher: asyncio.Task | None = None  # watch_disconnect
    over: bool = False  # set once the request has ended, for whatever reason

    def __post_init__(self):
        self.tokens = [0] * self.job.n_rows

    def emit(self, event: Event) -> None:
        """The engine's callback, on the engine thread: hand the event to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): stop this job
            self.job.cancelled = True

    def finish(self, client_left: bool) -> None:
        """The last phase, once, whatever ended the request; later calls do nothing."""
        if self.watcher is not None:
            self.watcher.cancel()
        if self.over:
            return
        self.over = True
        if client_left:
            self.version.engine.cancel(self.job)  # queued: dropped now; decoding: its rows leave before the next step
            self.request.app.state.metrics.client_disconnects += 1
            self.request.scope["minillm.client_left"] = True  # MetricsMiddleware records a 499
        self.request.scope["minillm.log"]["completion_tokens"] = sum(self.tokens)
        self.request.app.state.registry.release(self.version)  # may retire it, if it was its last request


def submit(request: HTTPRequest, v: ModelVersion, body, prompt_ids: list[list[int]],
           params: SamplingParams, chat: bool) -> Generation:
    """Into the engine's queue (429 with Retry-After when it is full); then watch for a hang-up."""
    job = Request(prompt_ids, params, body.n, stream=body.stream)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model or request.app.state.default_model,
            "system_fingerprint": v.version}  # OpenAI's field for "which backend version answered"
    gen = Generation(request, v, job, asyncio.get_running_loop(), asyncio.Queue(), head, chat,
                     n_prompt=sum(len(p) for p in prompt_ids))
    job.emit = gen.emit
    try:
        v.engine.submit(job)
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    gen.watcher = asyncio.create_task(watch_disconnect(request, gen.queue))
    request.scope["minillm.log"].update(request_id=head["id"], prompt_tokens=gen.n_prompt)
    return gen


async def watch_disconnect(request: HTTPRequest, queue: asyncio.Queue) -> None:
    """Put None in the request's event queue when its client hangs up.

    With the body read, the server's receive() has nothing more to say until the client
    disconnects (or the response is complete), so this task just waits for that message."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


# --- generation: the answer ------------------------------------------------------------------------

def stream(gen: Generation) -> StreamingResponse:
    """The answer as server-sent events: `data: {chunk}` as text arrives, then `data: [DONE]`."""
    return StreamingResponse(sse_events(gen), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_events(gen: Generation):
    """The SSE lines of one request; an engine error is a last `data: {"error": ...}` line."""
    try:
        finished = 0
        while finished < gen.job.n_rows:
            event = await gen.queue.get()
            if event is None:
                gen.finish(client_left=True)
                return
            if event.error:
                err = {"message": event.error, "type": "server_error", "param": None, "code": None}
                gen.finish(client_left=False)
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            gen.tokens[event.index] = event.tokens
            finished += event.finish_reason is not None
            yield f"data: {json.dumps(chunk(gen, event))}\n\n"
        gen.finish(client_left=False)
        yield "data: [DONE]\n\n"
    finally:  # still running here = cancelled by Starlette because the client went away
        gen.finish(client_left=True)


def chunk(gen: Generation, event: Event) -> dict:
    """One streamed event in OpenAI's shape: a text_completion or a chat.completion.chunk."""
    if gen.chat:
        delta = {"role": "assistant", "content": event.text} if event.text or event.finish_reason is None else {}
        return {**gen.head, "object": "chat.completion.chunk",
                "choices": [{"index": event.index, "delta": delta, "logprobs": None,
                             "finish_reason": event.finish_reason}]}
    return {**gen.head, "choices": [{"text": event.text, "index": event.index, "logprobs": None,
                                     "finish_reason": event.finish_reason}]}


async def collect(gen: Generation):
    """The answer as one JSON body, once every row has ended (500 if the engine failed it)."""
    texts, ends = [""] * gen.job.n_rows, [None] * gen.job.n_rows
    try:
        while any(e is None for e in ends):
            event = await gen.queue.get()
            if event is None:
                gen.finish(client_left=True)
                return JSONResponse({}, status_code=499)  # nobody reads it; recorded in /metrics
            if event.error:
                gen.finish(client_left=False)
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            texts[event.index] += event.text
            ends[event.index], gen.tokens[event.index] = event.finish_reason, event.tokens
        gen.finish(client_left=False)
    finally:
        gen.finish(client_left=True)  # a no-op unless we are being cancelled mid-request
    return completion(gen, texts, ends)


def completion(gen: Generation, texts: list[str], ends: list[str]) -> dict:
    """The whole answer in OpenAI's shape, with usage counted in tokens."""
    if gen.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(texts, ends))]
    else:
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, ends))]
    n_prompt, n_new = gen.n_prompt, sum(gen.tokens)
    return {**gen.head, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}
