"""What the server tells its operators: Prometheus metrics and structured access logs.

Metrics are in Prometheus' text exposition format, written out (prometheus.io/docs/instrumenting/
exposition_formats): server-wide totals (requests by path and status, latency, tokens, batch sizes,
queue) and the same per model and version (`model`, `version` labels), so a dashboard shows a new
version taking over from the old one. sky/grafana-dashboard.json charts them.

Access logs: one JSON object per request on the `minillm.access` logger (stderr by default):

    {"ts": ..., "request_id": "cmpl-…", "method": "POST", "path": "/v1/chat/completions", "status": 200,
     "model": "shakespeare", "version": "step-500-1f3a…", "prompt_tokens": 12, "completion_tokens": 50,
     "latency_ms": 412.3, "stream": false}

Both are recorded by one ASGI middleware, which sees every response (errors and 404s included) and
times it to its last byte; a handler adds what only it knows (model, version, tokens) to the ASGI
scope under "minillm.log". The access-log line is written just before that last byte is sent, so a
client that has its answer can already find the line; a request that never completes its answer
(the client left) is written when it ends. Error lines (status ≥ 400) are rate-limited per path and
status (serve/limits.py): past ERROR_LINES_PER_S a second they are counted, and the next line
written carries "suppressed": N, so 5,000 clients timing out cannot flood the log.

Label values are escaped as the text format requires (backslash, double quote, newline), so no
model name can write a line of its own into /metrics.
"""

from __future__ import annotations

import json
import logging
import time

from minillm.serve.limits import RateLimitFilter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics", "/admin/models")
ERROR_LINES_PER_S = 50  # access-log lines per second for one (path, error status); more are counted
access_log = logging.getLogger("minillm.access")


def label(value) -> str:
    """A Prometheus label value, escaped: \\ → \\\\, " → \\", newline → \\n (the text format's rules)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def path_label(path: str) -> str:
    """A request path as one of a bounded set of labels: the known paths, and "other"."""
    path = "/admin/models" if path.startswith("/admin/models") else path
    return path if path in KNOWN_PATHS else "other"


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (path, status code) -> count
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last = above every bucket
        self.latency_sum = 0.0
        self.client_disconnects = 0
        self.by_version: dict[tuple[str, str, int], int] = {}  # (model, version, code) -> requests

    def observe(self, path: str, code: int, seconds: float, info: dict | None = None) -> None:
        path = path_label(path)
        self.requests[(path, code)] = self.requests.get((path, code), 0) + 1
        if path in GENERATION_PATHS and code == 200:
            i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.latency_counts[i] += 1
            self.latency_sum += seconds
        if info and "version" in info:
            key = (info["model"], info["version"], code)
            self.by_version[key] = self.by_version.get(key, 0) + 1

    def render(self, registry) -> str:
        versions = registry.versions()
        out = ["# HELP minillm_requests_total HTTP requests by path and status code "
               "(499 = client closed the connection first).", "# TYPE minillm_requests_total counter"]
        for (path, code), n in sorted(self.requests.items()):
            out.append(f'minillm_requests_total{{path="{path}",code="{code}"}} {n}')

        def histogram(name: str, help: str, bounds, counts, total):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} histogram"])
            cumulative = 0
            for b, c in zip(bounds, counts):
                cumulative += c
                out.append(f'{name}_bucket{{le="{b}"}} {cumulative}')
            out.append(f'{name}_bucket{{le="+Inf"}} {sum(counts)}')  # Prometheus wants cumulative counts
            out.extend([f"{name}_sum {total}", f"{name}_count {sum(counts)}"])

        histogram("minillm_request_duration_seconds", "Time from request to last byte of successful "
                  "completions.", LATENCY_BUCKETS, self.latency_counts, round(self.latency_sum, 6))
        # server-wide: every loaded engine plus the ones already retired, so counters never go back
        rows = list(registry.retired.batch_rows)
        for v in versions:
            rows = [a + b for a, b in zip(rows, v.engine.stats.batch_rows)]  # rows[b] = steps run with b rows
        bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < len(rows)} | {len(rows) - 1})
        counts = [sum(rows[lo + 1:hi + 1]) for lo, hi in zip([0] + bounds[:-1], bounds)]
        histogram("minillm_batch_size", "Active rows in each decode step.", bounds, counts,
                  sum(b * n for b, n in enumerate(rows)))
        for name, kind, help, value in (
            ("minillm_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
             registry.retired.prompt_tokens + sum(v.engine.stats.prompt_tokens for v in versions)),
            ("minillm_generated_tokens_total", "counter", "Tokens generated.",
             registry.retired.generated_tokens + sum(v.engine.stats.generated_tokens for v in versions)),
            ("minillm_client_disconnects_total", "counter", "Requests whose client left before the end.",
             self.client_disconnects),
            ("minillm_queue_depth", "gauge", "Requests waiting for a batch slot.",
             sum(v.engine.queue_depth for v in versions)),
            ("minillm_active_rows", "gauge", "Batch rows (completions) being decoded.",
             sum(v.engine.active_rows for v in versions)),
            ("minillm_max_batch_size", "gauge", "Batch rows available per model version.", registry.max_batch_size),
        ):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])
        # per model and version: which one is current, and what each is doing
        current = {id(registry.current(n)) for n in registry.names()}
        per_version = (
            ("minillm_model_current", "gauge", "1 for the version new requests of a model get, 0 for the previous.",
             lambda v: int(id(v) in current)),
            ("minillm_model_generated_tokens_total", "counter", "Tokens generated by this version.",
             lambda v: v.engine.stats.generated_tokens),
            ("minillm_model_active_rows", "gauge", "Rows this version is decoding.", lambda v: v.engine.active_rows),
            ("minillm_model_queue_depth", "gauge", "Requests waiting for this version.", lambda v: v.engine.queue_depth),
            ("minillm_model_in_flight", "gauge", "Requests admitted to this version and not finished.",
             lambda v: v.in_flight),
        )
        for name, kind, help, value in per_version:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            out.extend(f'{name}{{model="{label(v.name)}",version="{label(v.version)}"}} {value(v)}' for v in versions)
        out.extend(["# HELP minillm_model_requests_total Generation requests by model, version and status code.",
                    "# TYPE minillm_model_requests_total counter"])
        for (model, version, code), n in sorted(self.by_version.items()):
            out.append(f'minillm_model_requests_total{{model="{label(model)}",version="{label(version)}",'
                       f'code="{code}"}} {n}')
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Plain ASGI middleware: counts every response by status, times it to its last byte, logs it."""

    def __init__(self, app, metrics: Metrics, log_requests: bool = True, limiter: RateLimitFilter | None = None):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests
        self.limiter = limiter or RateLimitFilter(per_key=ERROR_LINES_PER_S)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, done = time.perf_counter(), [500], [False]
        scope["minillm.log"] = info = {}

        def record():  # once per request: metrics, then the access-log line
            done[0] = True
            code = 499 if scope.get("minillm.client_left") else status[0]
            seconds = time.perf_counter() - t0
            self.metrics.observe(scope["path"], code, seconds, info)
            self.log(scope, code, seconds, info)

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last byte leaves: whoever has the answer can find the line
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if not done[0]:  # the answer never completed (client gone, or an error before it)
                record()

    def log(self, scope, code: int, seconds: float, info: dict) -> None:
        """The request's one JSON line on minillm.access; error lines are rate-limited per path and status."""
        if not (self.log_requests and access_log.isEnabledFor(logging.INFO)):
            return
        line = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": scope["path"],
                "status": code, **info, "latency_ms": round(1000 * seconds, 1)}
        if code >= 400:
            key = (path_label(scope["path"]), code)
            if not self.limiter.allow(key):
                return
            dropped = self.limiter.take_suppressed(key)
            if dropped:
                line["suppressed"] = dropped  # lines of this path and status not written since the last
        access_log.info(json.dumps(line))


def setup_access_log(fmt: str = "json") -> None:
    """Send minillm.access to stderr: "json" (one object per line, for log pipelines), "off"."""
    access_log.handlers.clear()
    access_log.propagate = False
    if fmt == "off":
        access_log.setLevel(logging.WARNING)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
