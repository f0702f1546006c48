"""Load test for `minillm serve`: N concurrent clients send a fixed number of completions; no errors allowed.

    python -m bench.loadgen                                  random "tiny" model, 1..16 clients
    python -m bench.loadgen --checkpoint out/shakespeare --concurrency 1,4,16 --requests 128
    python -m bench.loadgen --url http://host:8000 --api-key KEY     an already-running server
    python -m bench.loadgen --out /tmp/load.json --plot /tmp/load.png
    python -m bench.loadgen --scenario heavy     12 normal clients, alone and beside one heavy client
    python -m bench.loadgen --scenario slow      12 normal clients, alone and beside 5,000 slow connections

Needs the serve extra (pip install 'minillm[serve]'). A load generator, not a test module: the
benchmark that uses it under pytest is bench/test_serve_load.py.

Each level runs `--requests` completions of `--max-tokens` tokens through `--concurrency` clients
(asyncio + httpx, one connection each; a client sends its next request when the last one returns)
and reports requests/s, generated tokens/s, p50/p99 latency and errors. With continuous batching
the server decodes the concurrent requests together, so throughput should grow with the number of
clients until the batch (or the CPU) is full. The target: with the tiny model on a CPU,
requests/s at 16 clients ≥ 4× requests/s at 1 client.

Client and server share the machine: on a small CPU the client's own work is part of the result.
A figure is only worth keeping from a quiet machine; the JSON records the load average around the run.

`--scenario heavy|slow` replays issue 29's reliability probe instead (bench/probe.py): 12 normal
clients alone and beside one heavy client, or beside 5,000 slow connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx
except ImportError as e:  # an optional extra: say which one
    raise ImportError("bench/loadgen.py needs httpx: pip install 'minillm[serve]'") from e

PROMPT = "ROMEO:\nShall I"


def tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised model of the "tiny" preset (4 layers × 128 wide, block 64) with a
    character tokenizer: the speed of serving does not depend on what the weights have learned."""
    import torch

    from minillm.weights.checkpoint import save_model
    from minillm.model.config import ModelConfig
    from minillm.model.transformer import CausalLM
    from minillm.data.tokenizer import CharTokenizer

    torch.manual_seed(seed)
    tok = CharTokenizer.from_text(string.ascii_letters + string.digits + string.punctuation + " \n")
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    return save_model(out_dir, model, tok, note="random weights, for load tests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoint: str | Path, max_batch_size: int = 16, max_queue: int = 256,
          extra_args: tuple[str, ...] = (), startup_timeout: float = 120.0, log_stats: dict | None = None):
    """Run `minillm serve` in a subprocess on a free port; yields its base URL, stops it after.
    `log_stats`, if given, receives the size of the server's log and its count of tracebacks."""
    port = _free_port()
    cmd = [sys.executable, "-m", "minillm.cli", "serve", str(checkpoint), f"--port={port}",
           f"--max_batch_size={max_batch_size}", f"--max_queue={max_queue}", "--log-level=warning",
           *extra_args]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"minillm serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"minillm serve did not answer /health within {startup_timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log_stats is not None:
            log.seek(0)
            text = log.read()
            log_stats.update(log_bytes=len(text.encode()), log_lines=text.count("\n"),
                             tracebacks=text.count("Traceback (most recent call last)"))
        log.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q of the data at or below it."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def _load(url: str, concurrency: int, n_requests: int, body: dict, headers: dict,
                seconds: float | None = None, keep_latencies: bool = False) -> dict:
    """`n_requests` completions through `concurrency` clients; or, given `seconds`, as many as they
    send in that time."""
    latencies: list[float] = []
    tokens, errors, messages = 0, 0, []
    deadline = time.perf_counter() + seconds if seconds else None
    # shared: each client takes the next one when free
    next_request = iter(range(n_requests)) if deadline is None else \
        itertools.takewhile(lambda _: time.perf_counter() < deadline, itertools.count())

    async def client(http: httpx.AsyncClient):
        nonlocal tokens, errors
        for _ in next_request:
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/completions", json=body, headers=headers)
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - t0)
                    continue
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            errors += 1
            if len(messages) < 5:
                messages.append(problem)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        seconds = time.perf_counter() - t0
    latencies.sort()
    return {
        **({"_latencies": latencies} if keep_latencies else {}),
        "concurrency": concurrency, "requests": len(latencies) + errors, "ok": len(latencies), "errors": errors,
        "error_messages": messages, "seconds": seconds,
        "requests_per_s": len(latencies) / seconds, "tokens_per_s": tokens / seconds,
        "latency_p50_s": _percentile(latencies, 0.50) if latencies else None,
        "latency_p99_s": _percentile(latencies, 0.99) if latencies else None,
    }


def run_load(url: str, concurrency: int, n_requests: int, max_tokens: int = 32, prompt: str = PROMPT,
             temperature: float = 0.8, api_key: str | None = None) -> dict:
    """One level: `n_requests` completions through `concurrency` clients. Returns the figures."""
    if concurrency < 1 or n_requests < 1:
        raise ValueError("concurrency and requests must be at least 1")
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_load(url, concurrency, n_requests, body, headers))


def sweep(url: str, levels: list[int], n_requests: int, max_tokens: int, api_key: str | None = None,
          progress=print) -> dict:
    """Every concurrency level in turn (after one warm-up request); speedup of each over the first."""
    run_load(url, 1, 1, max_tokens, api_key=api_key)  # warm-up: first-call allocations, lazy imports
    results = []
    for c in levels:
        r = run_load(url, c, n_requests, max_tokens, api_key=api_key)
        results.append(r)
        progress(f"{c:>4} clients  {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                 f"p50 {r['latency_p50_s'] * 1e3:7.1f} ms  p99 {r['latency_p99_s'] * 1e3:7.1f} ms  "
                 f"errors {r['errors']}")
    base = results[0]["requests_per_s"]
    for r in results:
        r["speedup_vs_first"] = r["requests_per_s"] / base
    return {"results": results, "max_tokens": max_tokens, "requests_per_level": n_requests}


def plot(summary: dict, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = summary["results"]
    c = [r["concurrency"] for r in rs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(c, [r["tokens_per_s"] for r in rs], "o-", label="measured")
    ax1.plot(c, [rs[0]["tokens_per_s"] * x / c[0] for x in c], "--", color="gray", label="linear")
    ax1.set(xlabel="concurrent clients", ylabel="generated tokens / s", xscale="log", yscale="log",
            title="throughput")
    ax1.legend()
    ax2.plot(c, [r["latency_p50_s"] * 1e3 for r in rs], "o-", label="p50")
    ax2.plot(c, [r["latency_p99_s"] * 1e3 for r in rs], "s-", label="p99")
    ax2.set(xlabel="concurrent clients", ylabel="latency per request (ms)", xscale="log",
            title=f"latency ({summary['max_tokens']} tokens per request)")
    ax2.legend()
    for ax in (ax1, ax2):  # ticks at the measured client counts, not at powers of ten
        ax.set_xticks(c, [str(x) for x in c])
        ax.minorticks_off()
    fig.suptitle(f"minillm serve: {summary.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint to serve (default: a random 'tiny' model)")
    p.add_argument("--url", help="test this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("MINILLM_API_KEY"))
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=64, help="completions per level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--max-batch-size", type=int, default=16, help="server's batch rows (when started here)")
    p.add_argument("--threads", type=int, default=None, help="server's torch threads (when started here)")
    p.add_argument("--scenario", default="sweep", choices=["sweep", "heavy", "slow"],
                   help="sweep the concurrency levels, or replay issue 29's probe (bench/probe.py)")
    p.add_argument("--normal", type=int, default=12, help="normal clients in a scenario")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds beside the attacker, and as long alone (half before, half after)")
    p.add_argument("--slow", type=int, default=5000, help="slow connections in the 'slow' scenario")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--plot", help="save a throughput / latency plot (PNG) here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    from bench.common import machine_info
    summary = {"machine": machine_info(), "load_average_before": os.getloadavg()}
    summary["device"] = summary["machine"]["device"]
    if args.scenario == "slow":  # this process holds the 5,000 connections: one descriptor each
        from minillm.serve.limits import raise_open_file_limit
        raise_open_file_limit(args.slow + 256)
    log_stats: dict = {}
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            ckpt = args.checkpoint or tiny_checkpoint(stack.enter_context(tempfile.TemporaryDirectory()))
            extra = (f"--threads={args.threads}",) if args.threads else ()
            url = stack.enter_context(serve(ckpt, args.max_batch_size, extra_args=extra, log_stats=log_stats))
            summary["server"] = {"checkpoint": str(args.checkpoint or "random tiny preset"),
                                 "max_batch_size": args.max_batch_size, "threads": args.threads}
        if args.scenario != "sweep":
            print(f"scenario {args.scenario} against {url}: {args.normal} clients, {args.seconds:g} s alone, "
                  f"then {args.seconds:g} s beside the attacker")
            from bench.probe import scenario
            summary.update(scenario(url, args.scenario, args.normal, args.seconds, args.max_tokens, args.slow,
                                    args.api_key))
        else:
            print(f"load test against {url}: {args.requests} requests × {args.max_tokens} tokens per level")
            summary.update(sweep(url, levels, args.requests, args.max_tokens, args.api_key))
    summary["server_log"] = log_stats
    summary["load_average_after"] = os.getloadavg()
    if args.scenario != "sweep":
        print(f"server log: {log_stats}; load average {summary['load_average_before'][0]:.1f} -> "
              f"{summary['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=2))
            print(f"wrote {args.out}")
        return 1 if summary["baseline"]["errors"] or summary["attacked"]["errors"] else 0
    errors = sum(r["errors"] for r in summary["results"])
    last = summary["results"][-1]
    print(f"{last['concurrency']} clients vs {levels[0]}: {last['speedup_vs_first']:.2f}× requests/s; "
          f"errors {errors}; load average {summary['load_average_before'][0]:.1f} -> "
          f"{summary['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
