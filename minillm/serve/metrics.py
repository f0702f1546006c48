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
scope under "minillm.log".
"""

from __future__ import annotations

import json
import logging
import time

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics", "/admin/models")
access_log = logging.getLogger("minillm.access")


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (path, status code) -> count
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last = above every bucket
        self.latency_sum = 0.0
        self.client_disconnects = 0
        self.by_version: dict[tuple[str, str, int], int] = {}  # (model, version, code) -> requests

    def observe(self, path: str, code: int, seconds: float, info: dict | None = None) -> None:
        path = "/admin/models" if path.startswith("/admin/models") else path
        path = path if path in KNOWN_PATHS else "other"  # bounded label values
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
            out.extend(f'{name}{{model="{v.name}",version="{v.version}"}} {value(v)}' for v in versions)
        out.extend(["# HELP minillm_model_requests_total Generation requests by model, version and status code.",
                    "# TYPE minillm_model_requests_total counter"])
        for (model, version, code), n in sorted(self.by_version.items()):
            out.append(f'minillm_model_requests_total{{model="{model}",version="{version}",code="{code}"}} {n}')
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Plain ASGI middleware: counts every response by status, times it to its last byte, logs it."""

    def __init__(self, app, metrics: Metrics, log_requests: bool = True):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        scope["minillm.log"] = info = {}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            code = 499 if scope.get("minillm.client_left") else status[0]
            seconds = time.perf_counter() - t0
            self.metrics.observe(scope["path"], code, seconds, info)
            if self.log_requests and access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({"ts": round(time.time(), 3), "method": scope.get("method"),
                                            "path": scope["path"], "status": code, **info,
                                            "latency_ms": round(1000 * seconds, 1)}))


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
