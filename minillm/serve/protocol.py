"""The wire format of minillm's HTTP API: request bodies, their validation, and OpenAI's error shape.

Everything a client sends passes through here before the model sees it. A body is read in pieces up
to MAX_BODY_BYTES (413 past it), must be declared JSON (415 otherwise), must be UTF-8 JSON without
NaN/Infinity and not nested absurdly deep, and is then validated strictly against a pydantic model
whose extra="forbid" makes a misspelt field an error instead of a silently ignored one. Every refusal
is an APIError, answered as OpenAI answers: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import re

try:
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_BODY_BYTES = 1_000_000  # far more than any context holds; refuses to tokenize megabytes
RETRY_AFTER_S = 1  # what a 429 tells clients to wait
MIN_TEMPERATURE = 1e-2  # 0 < temperature < this is greedy: at τ = 0.01 a logit gap of 0.1 is e^-10
INT64 = 2**63 - 1  # bound for integer fields: the JSON number 10**100 is a 400, not a crash later


class APIError(Exception):
    """Answered as {"error": {...}} with `status`; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str  # system | developer | user | assistant (serve/chat.py checks, with a clearer message)
    content: str
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
    path: str


def _validation_message(err: ValidationError, schema: type[BaseModel]) -> tuple[str, str | None]:
    """pydantic's first complaint as (message, the request field it is about)."""
    e = err.errors()[0]
    param = str(e["loc"][0]) if e["loc"] else None
    if e["type"] == "extra_forbidden":
        return f"unknown field {param!r} (accepted: {', '.join(schema.model_fields)})", param
    return f"{param}: {e['msg']}", param


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


async def read_body(request: HTTPRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read piece by piece, refusing (413) as soon as it passes `limit` bytes.

    Checking len(await request.body()) would come too late: that reads the whole body into memory
    first, and a chunked upload (no Content-Length) can be any size. A declared Content-Length is
    refused before reading anything. Connection: close, because the rest of the upload is unread
    and the connection cannot carry another request until it is."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"request body is {size} bytes; the limit is {limit:,}",
                        headers={"Connection": "close"})

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"{int(declared):,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit:,}")
        chunks.append(chunk)
    return b"".join(chunks)


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
    try:  # strict: "5" is not an integer and true is not 1 (no silent coercion)
        return schema.model_validate(obj, strict=True)
    except ValidationError as e:
        message, param = _validation_message(e, schema)
        raise APIError(400, message, param=param)
    except RecursionError:  # deep, but not too deep for json.loads: {"prompt": [[[...]]]}
        raise APIError(400, "request body nests JSON arrays/objects too deeply")
