"""Prometheus metrics of the server, in the text exposition format written out
(prometheus.io/docs/instrumenting/exposition_formats), and the middleware that counts every response.
"""

from __future__ import annotations

import time

from minillm.generate.batching import BatchEngine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KNOWN_PATHS = ("/v1/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (path, status code) -> count
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last = above every bucket
        self.latency_sum = 0.0
        self.client_disconnects = 0

    def observe(self, path: str, code: int, seconds: float) -> None:
        path = path if path in KNOWN_PATHS else "other"  # bounded label values
        self.requests[(path, code)] = self.requests.get((path, code), 0) + 1
        if path == "/v1/completions" and code == 200:
            i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.latency_counts[i] += 1
            self.latency_sum += seconds

    def render(self, engine: BatchEngine) -> str:
        s = engine.stats
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
        rows = s.batch_rows  # rows[b] = decode steps that ran with b rows
        bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < len(rows)} | {len(rows) - 1})
        counts = [sum(rows[lo + 1:hi + 1]) for lo, hi in zip([0] + bounds[:-1], bounds)]
        histogram("minillm_batch_size", "Active rows in each decode step.", bounds, counts,
                  sum(b * n for b, n in enumerate(rows)))
        for name, kind, help, value in (
            ("minillm_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens),
            ("minillm_generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
            ("minillm_client_disconnects_total", "counter", "Requests whose client left before the end.",
             self.client_disconnects),
            ("minillm_queue_depth", "gauge", "Requests waiting for a batch slot.", engine.queue_depth),
            ("minillm_active_rows", "gauge", "Batch rows (completions) being decoded.", engine.active_rows),
            ("minillm_max_batch_size", "gauge", "Batch rows available.", engine.max_batch_size),
        ):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Plain ASGI middleware: counts every response by status and times it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            code = 499 if scope.get("minillm.client_left") else status[0]
            self.metrics.observe(scope["path"], code, time.perf_counter() - t0)
