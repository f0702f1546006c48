"""The wire format of minillm's HTTP API: request bodies, their validation, and OpenAI's error shape.

Everything a client sends passes through here before the model sees it. A body is read in pieces up
to MAX_BODY_BYTES (413 past it) within a body timeout (408 past it), must be declared JSON (415
otherwise), must be UTF-8 JSON without NaN/Infinity and not nested absurdly deep, may hold at most
MAX_MESSAGES chat messages (413), and is then validated strictly against a pydantic model whose
extra="forbid" makes a misspelt field an error instead of a silently ignored one; the error names the
exact key ('messages[0].foo'). Every refusal is an APIError, answered as OpenAI answers:
{"error": {"message", "type", "param", "code"}}. A client that hangs up mid-upload is a ClientGone.

What a request may cost is bounded before the work is done, because on one Python process every
parse and every tokenizer call holds the GIL that the decode loop needs: a chat of 29,000 messages
took 1.7 s of pydantic validation and cut twelve other clients' throughput by 6× in a probe. So the
message count is checked on the parsed JSON before validation, and a prompt's length in characters
before it is tokenized (serve/handlers.py); bodies of LARGE_BODY_BYTES or more also share a byte
budget (serve/limits.py) and are parsed on a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Annotated

try:
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_BODY_BYTES = 1_000_000  # far more than any context holds; refuses to tokenize megabytes
RETRY_AFTER_S = 1  # what a 429 tells clients to wait
MIN_TEMPERATURE = 1e-2  # 0 < temperature < this is greedy: at τ = 0.01 a logit gap of 0.1 is e^-10
# 0 < top_p < this is read as MIN_TOP_P. The nucleus of any p this small is the most likely token
# alone (the top token's probability is at least 1/V ≫ 1e-8), so nothing changes but the float:
# 1e-45 is a denormal in float32 and 1e-46 rounds to 0, which the nucleus filter refuses.
MIN_TOP_P = 1e-8
INT64 = 2**63 - 1  # bound for integer fields: the JSON number 10**100 is a 400, not a crash later
MAX_MESSAGES = 256  # per chat; more is 413 (checked before validation, which costs ~7 µs a message)
MAX_PROMPT_TOKENS = 32_768  # per prompt (a completion's, or a chat in its template), before cropping
# ... and, so that nobody makes us tokenize a megabyte to count, at most this many characters
# (4 per token: about what English BPE averages; a character tokenizer meets the token limit first)
MAX_PROMPT_CHARS = 4 * MAX_PROMPT_TOKENS
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this (408 past it): slow uploads end
LARGE_BODY_BYTES = 16_384  # bodies this big or bigger share a byte budget and parse on a thread


class APIError(Exception):
    """Answered as {"error": {...}} with `status`; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """OpenAI's error body, with this error's status and headers."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class CompletionRequest(BaseModel):
    """The accepted body. extra="forbid": a misspelt field is an error, not silently ignored."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # optional: there is only one model; if given it must be its id
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=INT64)  # OpenAI's default; the real bound is block_size - 1
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy (and so is 0 < τ < MIN_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=INT64)  # not in OpenAI's API; vLLM and llama.cpp accept it
    n: int = Field(1, ge=1, le=INT64)  # the real bound is max_batch_size
    stop: str | list[str] | None = None
    stream: bool = False
    # same seed, same request -> same text, whatever else is being served; the range is what
    # torch.Generator.manual_seed takes (negative seeds wrap around, so llama.cpp's -1 works too)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None  # accepted for client compatibility, not used


def join_text_parts(content):
    """OpenAI's content-part array [{"type": "text", "text": ...}, ...] as one string (joined by
    newlines, as vLLM does); a plain string passes. Other part types (images, audio, files) are a
    ValueError: this model reads text only."""
    if not isinstance(content, list):
        return content  # a string, or something strict validation will refuse with its own message
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"part [{i}] must be an object {{\"type\": \"text\", \"text\": ...}}")
        if part.get("type") != "text":
            raise ValueError(f"part [{i}] has type {part.get('type')!r}: only text parts are read "
                             f"(this model reads text, not images, audio or files)")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise ValueError(f"part [{i}] has unknown field {extra[0]!r} (accepted: type, text)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part [{i}] needs \"text\": a string")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str  # system | developer | user | assistant (serve/chat.py checks, with a clearer message)
    content: Annotated[str, BeforeValidator(join_text_parts)]  # a string, or text parts (joined)
    name: str | None = None  # accepted for client compatibility, not used


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's chat shape; sampling fields as for completions."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, le=INT64)  # None: up to the context
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=INT64)
    n: int = Field(1, ge=1, le=INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # accepted ({"include_usage": ...}), not used
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None


class SwitchRequest(BaseModel):
    """POST /admin/models/NAME: the checkpoint (folder or run folder) to serve as NAME's new version."""
    model_config = ConfigDict(extra="forbid")
    path: str  # inside the server's models root (serve/admin.py)
    create: bool = False  # true: NAME may be a new model (up to the server's max_models)


def _field_path(loc: tuple, schema: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """pydantic's error location as the client wrote it, 'messages[0].content', and the model class
    the last key belongs to. A union's member names in the location ('str', 'list[str]') are dropped:
    the client wrote no such key."""
    path, cls = "", schema
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif cls is not None and item in cls.model_fields:
            path += f".{item}" if path else item
            cls = _inner_model(cls.model_fields[item].annotation)
    return path, cls


def _inner_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (list[ChatMessage] -> ChatMessage), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in getattr(annotation, "__args__", ()) if (m := _inner_model(a))), None)


def _validation_message(err: ValidationError, schema: type[BaseModel]) -> tuple[str, str | None]:
    """pydantic's first complaint as (message, the request field it is about: 'messages[0].foo')."""
    e = err.errors()[0]
    if e["type"] == "extra_forbidden":
        path, owner = _field_path(e["loc"][:-1], schema)  # where the unknown key sits, and its model
        param = f"{path}.{e['loc'][-1]}" if path else str(e["loc"][-1])
        accepted = f" (accepted: {', '.join(owner.model_fields)})" if owner else ""
        return f"unknown field {param!r}{accepted}", param
    param = _field_path(e["loc"], schema)[0] or None
    msg = e["msg"].removeprefix("Value error, ")  # a validator's own ValueError
    return f"{param}: {msg}", param


def _no_nan(constant: str):
    """json.loads accepts NaN and Infinity, which are not JSON (and would slip past range checks)."""
    raise ValueError(f"{constant} is not a JSON value")


def _is_json(content_type: str) -> bool:
    """application/json or application/<something>+json, with no charset but UTF-8 (RFC 8259 §8.1)."""
    media, *params = [part.strip().lower() for part in content_type.split(";")]
    if not (media == "application/json" or re.fullmatch(r"application/[\w.+-]+\+json", media)):
        return False
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    return all(c in ("utf-8", "utf8") for c in charsets)


class ClientGone(APIError):
    """The client hung up before its request was read: nobody will read the answer. The access
    log's one line (status 499) is all that is written, never a traceback."""

    def __init__(self):
        super().__init__(499, "client closed the connection while sending its request")


async def read_body(request: HTTPRequest, limit: int = MAX_BODY_BYTES,
                    timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body of a Starlette request, by `receive_body` (immediate if limits.ReadBodyFirst has
    read it already, as it does in the app that build_app makes)."""
    return await receive_body(request.scope, request.receive, limit, timeout_s)


async def receive_body(scope, receive, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """A request's body from the ASGI `receive`, piece by piece, refusing (413) as soon as it passes
    `limit` bytes, and (408) if it has not all arrived `timeout_s` after the headers (at the latest).

    Checking len(await request.body()) would come too late: that reads the whole body into memory
    first, and a chunked upload (no Content-Length) can be any size. A declared Content-Length is
    refused before reading anything. Connection: close, because the rest of the upload is unread
    and the connection cannot carry another request until it is. The timeout bounds how long a
    slow (or stalled) upload holds a connection and a task: a slowloris client sends a byte now
    and then to keep thousands of them open. A client that disconnects mid-upload is ClientGone.

    Each deadline is drawn between timeout_s/2 and timeout_s (jitter): an attacker opens its
    connections together, and equal deadlines would end them together, 5,000 answers and 5,000
    reconnections in one instant; spread out, they are a trickle."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"request body is {size} bytes; the limit is {limit:,}",
                        headers={"Connection": "close"})

    declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{int(declared):,}")
    deadline = timeout_s * random.uniform(0.5, 1.0)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope["minillm.client_left"] = True  # MetricsMiddleware records a 499
                    raise ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large(f"more than {limit:,}")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive in time ({deadline:.1f} s; this server waits "
                       f"{timeout_s / 2:g}-{timeout_s:g} s)", code="request_timeout",
                       headers={"Connection": "close"}) from None


def parse(body: bytes, schema: type[BaseModel]):
    """A request body as `schema`, or the APIError (400) that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = body[e.start:e.start + 1]
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start}: {bad!r})")
    try:  # ValueError includes integers of more than 4300 digits (sys.int_info)
        obj = json.loads(text, parse_constant=_no_nan)
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}")
    except RecursionError:  # [[[[...]]]]: the parser recurses once per level
        raise APIError(400, "request body nests JSON arrays/objects too deeply")
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    messages = obj.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:  # before validating each one
        raise APIError(413, f"messages holds {len(messages):,} messages; the limit is {MAX_MESSAGES}",
                       param="messages", code="too_many_messages")
    try:  # strict: "5" is not an integer and true is not 1 (no silent coercion)
        return schema.model_validate(obj, strict=True)
    except ValidationError as e:
        message, param = _validation_message(e, schema)
        raise APIError(400, message, param=param)
    except RecursionError:  # deep, but not too deep for json.loads: {"prompt": [[[...]]]}
        raise APIError(400, "request body nests JSON arrays/objects too deeply")
