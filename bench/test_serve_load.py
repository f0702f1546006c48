"""`minillm serve` under load: 1 client, then 16 at once, against a real server (see bench/loadgen.py);
and issue 29's probe in small: 12 clients beside one heavy client, and beside slow connections.

    pytest bench/test_serve_load.py                         timed once; figures in extra_info
    python -m bench.loadgen                                 the full sweep, table, JSON and plot
    python -m bench.loadgen --scenario heavy|slow           the probe at full size (bench/probe.py)

Zero errors is asserted; the batching gain (requests/s at 16 clients over 1 client; target ≥ 4×
with the tiny model on a CPU) is recorded, not asserted: speed goals live in reports, not in tests.
So it is for the probe: zero errors for the normal clients and every /health answered are asserted;
the ratios to the baseline (goals: ≥ 0.8× requests/s beside the heavy client, ≤ 2× p50 and /health
under 1 s beside slow connections) are recorded.
Needs the serve extra (httpx for the clients, FastAPI and uvicorn for the server); without it the
suite is skipped, saying what to install.
"""

from __future__ import annotations

import pytest

for _module in ("httpx", "fastapi", "uvicorn"):
    pytest.importorskip(_module, reason=f"needs {_module}: pip install 'minillm[serve]'")

from bench import common  # noqa: E402
from bench.loadgen import run_load, serve, tiny_checkpoint  # noqa: E402
from bench.probe import scenario  # noqa: E402

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


@pytest.mark.parametrize("kind", ["heavy", "slow"])
def test_serve_beside_the_probe(benchmark, tmp_path, kind):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    seconds, n_slow = (4.0, 500) if QUICK else (20.0, 5000)
    if kind == "slow":  # the attacker's process inherits the limit: one descriptor per connection
        from minillm.serve.limits import raise_open_file_limit
        raise_open_file_limit(n_slow + 256)
    results = {}
    with serve(ckpt, max_batch_size=16, extra_args=("--threads=1",)) as url:
        benchmark.pedantic(lambda: results.update(scenario(url, kind, 12, seconds, MAX_TOKENS, n_slow,
                                                           progress=lambda line: None)),
                           rounds=1, iterations=1)
    for r in (results["baseline"], results["attacked"]):
        assert r["errors"] == 0, r["error_messages"]
        assert r["health_failures"] == 0
    if kind == "heavy":  # every heavy body was refused (too many messages), none crashed anything
        assert set(results["attacked"]["heavy_answers"]) == {"413"}
    benchmark.extra_info.update(common.machine_info())
    benchmark.extra_info.update(
        scenario=kind, seconds=seconds, slow_connections=n_slow if kind == "slow" else 0,
        requests_per_s_ratio=results["requests_per_s_ratio"], p50_ratio=results["p50_ratio"],
        health_max_s=results["attacked"]["health_max_s"],
        **{f"{k}_{part}": results[part][k] for part in ("baseline", "attacked")
           for k in ("requests_per_s", "latency_p50_s", "latency_p99_s")})
