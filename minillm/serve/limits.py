"""What keeps one client from slowing every other: timeouts, a connection cap, a parse budget, quiet logs.

A server on one Python process shares two things among all its clients: the event loop (one thread
that accepts connections, reads bodies and streams answers) and the GIL (which the decode loop needs
between its matmuls). A client that holds either holds everyone. A reliability probe found four ways:

    slow connections   5,000 clients that open a connection and send their body a byte at a time:
                       uvicorn has no header timeout and no body timeout, so each is held forever.
                       → header_deadline_protocol closes a connection whose request headers have not
                         arrived HEADER_TIMEOUT_S after it opened (or after its previous answer);
                         ReadBodyFirst reads bodies before routing, so a waiting upload holds little,
                         and answers 408 to a body not in after BODY_TIMEOUT_S; a cap on connections
                         (uvicorn's limit_concurrency: 503 past it) bounds the rest. Deadlines are
                         jittered, so connections opened together do not all end together.
    heavy bodies       one client sending 1 MB chat bodies back to back: every parse holds the GIL.
                       → BodyBudget: bodies of LARGE_BODY_BYTES or more share a budget of bytes per
                         second (a token bucket); past it they wait, and past MAX_WAIT_S they get 429.
    log floods         10,006 tracebacks (23 MB) from clients that hung up mid-upload.
                       → those are one access-log line now (protocol.ClientGone); RateLimitFilter
                         passes at most `per_key` lines per second of any one kind and counts the rest.
    open files         a process past its file-descriptor limit cannot accept even /health.
                       → raise_open_file_limit lifts the soft limit to the hard one at start-up.
    GC pauses          a full garbage-collection pass walks every object the process holds: with
                       thousands of connections open, over a second during which nothing answers.
                       → freeze_startup_heap moves what start-up loaded out of the collector's way;
                         ReadBodyFirst keeps what each waiting connection holds small.

`server_options` puts these together for uvicorn; `minillm serve` (minillm/cli/serve.py) uses it.
"""

from __future__ import annotations

import gc
import logging
import random
import time

from minillm.serve.auth import bearer_matches
from minillm.serve.protocol import MAX_BODY_BYTES, APIError, _is_json, receive_body

try:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
except ImportError as e:
    raise ImportError(f"minillm serve needs FastAPI and uvicorn: pip install 'minillm[serve]'. "
                      f"Import failed with: {e}") from e

HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this of the connection opening (5-10 s)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
MAX_CONNECTIONS = 8192  # open connections (uvicorn's limit_concurrency): past it, 503 + close
LARGE_BODY_BYTES_PER_S = 1_000_000  # the budget large bodies share: ~1% of a core in json + pydantic
MAX_WAIT_S = 10.0  # a large body that would wait longer for the budget is refused (429)
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: 25\r\nconnection: close\r\n\r\nrequest headers too slow\n")


# --- connections -----------------------------------------------------------------------------------

def header_deadline_protocol(header_timeout_s: float = HEADER_TIMEOUT_S, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class (httptools or h11) with a deadline for each request's headers.

    uvicorn closes idle keep-alive connections (timeout_keep_alive), but not one that sends its
    headers a byte at a time, or nothing at all after connecting. The deadline is armed when the
    connection opens and again when an answer is complete, for between header_timeout_s/2 and
    header_timeout_s; when it fires, the connection is closed (with a 408) unless a new request's
    headers have arrived since (uvicorn then has a new `cycle`)."""

    class HeaderDeadline(base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self):  # jittered, as protocol.read_body's deadline is, and for the same reason
            self.loop.call_later(header_timeout_s * random.uniform(0.5, 1.0), self._headers_late, self.cycle)

        def _headers_late(self, cycle_then):
            idle = self.cycle is None or self.cycle.response_complete  # no request being served
            if self.cycle is cycle_then and idle and not self.transport.is_closing():
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

    HeaderDeadline.__qualname__ = HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now (the models, torch, FastAPI, pydantic: a few
    hundred thousand) to the collector's permanent generation (gc.freeze, made for long-running
    servers). They live as long as the process anyway; from now on no full pass walks them."""
    gc.collect()
    gc.freeze()


def raise_open_file_limit(want: int) -> int:
    """Lift the soft limit on open files toward `want` (at most the hard limit); the limit now.

    Every connection is a file descriptor; at the limit, accept() fails and asyncio stops accepting
    for a second at a time, /health included. 1024 is a common soft default."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def server_options(max_connections: int = MAX_CONNECTIONS, header_timeout_s: float = HEADER_TIMEOUT_S,
                   keep_alive_s: int = KEEP_ALIVE_S) -> dict:
    """uvicorn's settings for the limits above, as keywords for uvicorn.run / uvicorn.Config: the
    header deadline, the keep-alive timeout, and a connection cap that fits under the open-file
    limit (64 descriptors kept for files and logs)."""
    files = raise_open_file_limit(max_connections + 64)
    return dict(
        http=header_deadline_protocol(header_timeout_s),
        limit_concurrency=max(1, min(max_connections, files - 64)),  # past it: 503, connection closed
        timeout_keep_alive=keep_alive_s,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers (when h11 parses HTTP)
        ws="none",  # no websockets endpoint here
        access_log=False)  # minillm.access writes one structured line per request instead


# --- bodies ----------------------------------------------------------------------------------------

class ReadBodyFirst:
    """ASGI middleware: the body of a POST that its endpoint will read is read whole before routing.

    What a slow upload costs the server is what it holds while it waits, and the garbage collector
    walks all of it on every full pass: waiting inside the endpoint, a request holds the whole
    Starlette/FastAPI call stack (156 tracked objects); waiting here, 73. Under 5,000 slow
    connections that is the difference between full GC passes of over a second and of a third of
    that (measured on our 2-core CPU), and a pass stops every other request. nginx does the same
    (proxy_request_buffering) for the same reason.

    Only bodies the endpoint would read are read early: a JSON POST carrying the key its path needs
    (serve/auth.py). Anything else goes on unread, and the endpoint refuses it (401, 403, 415)
    without reading a byte, as before. Refusals here (413 too large, 408 too slow, 499 client gone:
    protocol.receive_body) are answered here, inside MetricsMiddleware, which counts and logs them.
    `state` is the app's state (api_key, admin_key, body_timeout_s)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    def reads_body(self, scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        headers = dict(scope["headers"])  # lower-case names, raw bytes
        if not _is_json(headers.get(b"content-type", b"").decode("latin-1")):
            return False
        admin = scope["path"].startswith("/admin/")
        key = self.state.admin_key if admin else self.state.api_key
        if key is None:
            return not admin  # the admin API is off without its key: refused unread
        return bearer_matches(headers.get(b"authorization", b""), key)

    async def __call__(self, scope, receive, send):
        if not self.reads_body(scope):
            return await self.app(scope, receive, send)
        try:
            body = await receive_body(scope, receive, MAX_BODY_BYTES, self.state.body_timeout_s)
        except APIError as e:
            return await e.response()(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the server's own messages (http.disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)



class BodyBudget:
    """A token bucket of bytes that large request bodies share before they are parsed.

    The bucket holds up to `burst` bytes and refills at `bytes_per_s`. A body takes its size from it;
    if the bucket is short, the body waits until the refill covers it (the wait is its debt), and a
    body that would wait more than `max_wait_s` is refused instead. One client sending 1 MB bodies
    back to back thus gets about one parse a second, and the time it spends parsing (json, pydantic,
    the tokenizer after) stays a small share of the GIL that the decode loop and small requests need.
    Small bodies never touch it. Used from the event loop only, so it needs no lock."""

    def __init__(self, bytes_per_s: float = LARGE_BODY_BYTES_PER_S, burst: int = MAX_BODY_BYTES,
                 max_wait_s: float = MAX_WAIT_S, clock=time.monotonic):
        self.rate, self.burst, self.max_wait_s, self.clock = bytes_per_s, burst, max_wait_s, clock
        self.level, self.t = float(burst), clock()  # bytes available now (negative: owed)

    def reserve(self, n: int) -> float | None:
        """Seconds to wait before a body of `n` bytes may be parsed (its bytes now taken), or None
        if that wait would pass max_wait_s (nothing taken: the caller refuses the request)."""
        now = self.clock()
        self.level, self.t = min(self.burst, self.level + (now - self.t) * self.rate), now
        wait = max(0.0, (n - self.level) / self.rate)
        if wait > self.max_wait_s:
            return None
        self.level -= n
        return wait


# --- logs ------------------------------------------------------------------------------------------

class RateLimitFilter(logging.Filter):
    """At most `per_key` log lines of one kind per `period_s`; the rest are counted, not written.

    A line's kind is its `limit_key` attribute if it has one (the access log sets (path, status) for
    errors), else its logger and message template, so "Exceeded concurrency limit." or one
    exception's traceback 5,000 times becomes `per_key` lines a second. The next line of that kind
    to pass says how many were dropped: the access log adds a "suppressed" field (see
    `take_suppressed`), other loggers get " [N similar lines suppressed]" appended."""

    def __init__(self, per_key: int = 10, period_s: float = 1.0, clock=time.monotonic, max_keys: int = 1000):
        super().__init__()
        self.per_key, self.period_s, self.clock, self.max_keys = per_key, period_s, clock, max_keys
        self.window, self.counts, self.suppressed = clock(), {}, {}

    def key(self, record: logging.LogRecord):
        return getattr(record, "limit_key", None) or (record.name, str(record.msg)[:200])

    def allow(self, key) -> bool:
        """Count one line of kind `key`; False if its kind has used up this period's lines."""
        now = self.clock()
        if now - self.window >= self.period_s or len(self.counts) > self.max_keys:
            self.window, self.counts = now, {}  # a new period (or too many kinds: start over)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= self.per_key:
            return True
        if key in self.suppressed or len(self.suppressed) < self.max_keys:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
        return False

    def take_suppressed(self, key) -> int:
        """How many lines of kind `key` were dropped since the last one written (and reset it)."""
        return self.suppressed.pop(key, 0)

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key(record)
        if not self.allow(key):
            return False
        dropped = self.take_suppressed(key)
        if dropped and not hasattr(record, "limit_key"):  # (the access log reports it in its JSON)
            record.msg = f"{record.msg} [{dropped} similar lines suppressed]"
        return True


def quiet_server_logs(per_key: int = 10) -> RateLimitFilter:
    """Rate-limit uvicorn's and asyncio's own error logs (tracebacks, "Exceeded concurrency limit.",
    "socket.accept() out of system resource"), so that no client can fill a disk with them.
    (uvicorn's logging set-up replaces handlers, not filters: this may run before uvicorn.run.)"""
    limiter = RateLimitFilter(per_key)
    for name in ("uvicorn.error", "asyncio"):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(old)  # once per logger, however often this runs
        logger.addFilter(limiter)
    return limiter
