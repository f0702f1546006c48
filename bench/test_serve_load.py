"""`minillm serve` under load: 1 client, then 16 at once, against a real server (see bench/loadgen.py).

    pytest bench/test_serve_load.py                         timed once; figures in extra_info
    python -m bench.loadgen                                 the full sweep, table, JSON and plot

Zero errors is asserted; the batching gain (requests/s at 16 clients over 1 client; target ≥ 4×
with the tiny model on a CPU) is recorded, not asserted: speed goals live in reports, not in tests.
Needs the serve extra (httpx for the clients, FastAPI and uvicorn for the server); without it the
suite is skipped, saying what to install.
"""

from __future__ import annotations

import pytest

for _module in ("httpx", "fastapi", "uvicorn"):
    pytest.importorskip(_module, reason=f"needs {_module}: pip install 'minillm[serve]'")

from bench import common  # noqa: E402
from bench.loadgen import run_load, serve, tiny_checkpoint  # noqa: E402

QUICK = common.SIZE == "quick"
N_REQUESTS = 16 if QUICK else 128
MAX_TOKENS = 16 if QUICK else 32
LEVELS = (1, 16)


def test_serve_load(benchmark, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    results = {}
    with serve(ckpt, max_batch_size=16) as url:
        run_load(url, 1, 1, MAX_TOKENS)  # warm-up

        def sweep():
            for c in LEVELS:
                results[c] = run_load(url, c, N_REQUESTS, MAX_TOKENS)

        benchmark.pedantic(sweep, rounds=1, iterations=1)
    for c, r in results.items():
        assert r["errors"] == 0, r["error_messages"]
        assert r["ok"] == N_REQUESTS
    gain = results[16]["requests_per_s"] / results[1]["requests_per_s"]
    benchmark.extra_info.update(common.machine_info())
    benchmark.extra_info.update(
        requests=N_REQUESTS, max_tokens=MAX_TOKENS, gain_16_vs_1=gain,
        **{f"{k}_c{c}": r[k] for c, r in results.items()
           for k in ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s")})
