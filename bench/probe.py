"""Issue 29's reliability probe as a load test: normal clients beside one heavy client, or beside
thousands of slow connections, against a real `minillm serve` (run through bench/loadgen.py).

    python -m bench.loadgen --scenario heavy     12 normal clients, alone and beside one heavy client
    python -m bench.loadgen --scenario slow      12 normal clients, alone and beside 5,000 slow connections
    pytest bench/test_serve_load.py -k probe     both, small (500 slow connections, 4 s)

Each scenario measures `--normal` clients (12) for `--seconds` alone (half before the attack, half
after: the baseline), and for `--seconds` beside the attacker, in the same run against the same
server, while a probe sends GET /health on a fresh connection every 0.25 s. The attacker runs in a
process of its own, so that its own work does not stall the normal clients' event loop:

    heavy   one client posting the probe's chat body (29,000 messages, ~986 KB) back to back.
            Goal: the normal clients keep ≥ 80% of their baseline requests/s.
    slow    5,000 connections that send a request's headers and then a body byte every few seconds,
            reopened whenever the server answers or closes them. Goal: /health answers in < 1 s
            throughout, and the normal clients' p50 latency stays within 2× the baseline's.

Client and server share the machine: on a shared 2-core CPU, run each scenario twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import time

try:
    import httpx
except ImportError as e:  # an optional extra: say which one
    raise ImportError("bench/probe.py needs httpx: pip install 'minillm[serve]'") from e

from bench.loadgen import PROMPT, _load, _percentile, run_load


def heavy_chat_body(n_messages: int = 29_000) -> bytes:
    """The probe's heavy body: a chat of `n_messages` short messages, ~986 KB of compact JSON for 29,000."""
    messages = [{"role": "user", "content": "hello"}] * n_messages
    return json.dumps({"messages": messages, "max_tokens": 1}, separators=(",", ":")).encode()


async def _heavy_client(url: str, stop: asyncio.Event, headers: dict) -> dict:
    """Post the heavy body back to back until `stop`; count the answers by status."""
    body, statuses = heavy_chat_body(), {}
    async with httpx.AsyncClient(timeout=60) as http:
        while not stop.is_set():
            try:
                r = await http.post(f"{url}/v1/chat/completions", content=body,
                                    headers={**headers, "Content-Type": "application/json"})
                key = str(r.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
    return {"heavy_body_bytes": len(body), "heavy_answers": statuses}


async def _slow_connections(url: str, n: int, stop: asyncio.Event, trickle_s: float = 5.0) -> dict:
    """`n` connections that send a chat request's headers (Content-Length 100,000), then one body
    byte every ~`trickle_s` seconds; each is reopened when the server answers or closes it."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n{{").encode()
    stats = {"slow_opened": 0, "slow_failed_to_open": 0, "slow_answers": {}}

    async def one():
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                stats["slow_failed_to_open"] += 1
                await asyncio.sleep(1.0)
                continue
            stats["slow_opened"] += 1
            try:
                writer.write(head)
                while not stop.is_set():
                    try:  # the server's answer (a 408, 503 ...) or its closing, else one more byte
                        data = await asyncio.wait_for(reader.read(64), trickle_s * random.uniform(0.5, 1.5))
                    except asyncio.TimeoutError:
                        writer.write(b" ")
                        continue
                    key = data[9:12].decode("latin-1") if data.startswith(b"HTTP/") else "closed"
                    stats["slow_answers"][key] = stats["slow_answers"].get(key, 0) + 1
                    break
            except OSError:
                stats["slow_answers"]["reset"] = stats["slow_answers"].get("reset", 0) + 1
            finally:
                writer.close()

    tasks = []
    for i in range(n):  # opened in steps of 250: a burst of 5,000 SYNs overflows the listen backlog
        tasks.append(asyncio.create_task(one()))
        if i % 250 == 249:
            await asyncio.sleep(0.05)
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stats


async def _health_once(url: str, timeout_s: float) -> bool:
    """One GET /health on a fresh connection, written by hand: what a load balancer's probe costs
    the server, without an HTTP client's own set-up (an httpx client builds an SSL context)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    try:
        writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), timeout_s)  # until the server closes
        return answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def _health_probe(url: str, stop: asyncio.Event, every_s: float = 0.25, timeout_s: float = 5.0) -> dict:
    """GET /health on a fresh connection every `every_s` until `stop`: the latencies (a timeout or
    an error counts as `timeout_s`) and how many were not 200."""
    latencies, failures, slow, start = [], 0, [], time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            ok = await _health_once(url, timeout_s)
            latencies.append(time.perf_counter() - t0)
        except (OSError, asyncio.TimeoutError):
            ok = False
            latencies.append(timeout_s)
        failures += not ok
        if latencies[-1] > 1.0 and len(slow) < 20:  # when (s into the run) /health took over 1 s, and how long
            slow.append((round(t0 - start, 1), round(latencies[-1], 2)))
        await asyncio.sleep(every_s)
    latencies.sort()
    return {"_health": latencies, "health_checks": len(latencies), "health_failures": failures, "health_over_1s": slow,
            "health_p50_s": _percentile(latencies, 0.5) if latencies else None,
            "health_max_s": latencies[-1] if latencies else None}


def _attack(kind: str, url: str, n_slow: int, headers: dict, stop, results) -> None:
    """The attacker's process: run it until `stop` (a multiprocessing.Event) is set; its figures go
    to `results` (a multiprocessing.Queue). A process of its own, so that its work (5,000 sockets
    reopened at once) does not stall the normal clients' and the /health probe's event loop."""
    async def main():
        done = asyncio.Event()
        if kind == "heavy":
            task = asyncio.create_task(_heavy_client(url, done, headers))
        else:
            task = asyncio.create_task(_slow_connections(url, n_slow, done))
        await asyncio.to_thread(stop.wait)
        done.set()
        return await task
    results.put(asyncio.run(main()))


@contextlib.contextmanager
def attacker(kind: str, url: str, n_slow: int, headers: dict, ramp_s: float):
    """The attacker of `kind` in a child process, given `ramp_s` to start; yields a dict that holds
    its figures once the block ends."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no event loop, no threads
    stop, results, figures = ctx.Event(), ctx.Queue(), {}
    proc = ctx.Process(target=_attack, args=(kind, url, n_slow, headers, stop, results), daemon=True)
    proc.start()
    time.sleep(ramp_s)
    try:
        yield figures
    finally:
        stop.set()
        for _ in range(120):  # its figures, unless it died (then its traceback is on stderr)
            with contextlib.suppress(queue.Empty):
                figures.update(results.get(timeout=1.0))
                break
            if not proc.is_alive():
                raise RuntimeError(f"the {kind} attacker's process ended with exit code {proc.exitcode}")
        proc.join(timeout=30)


async def _with_health(url: str, normal: int, seconds: float, body: dict, headers: dict) -> dict:
    """The normal clients for `seconds`, while /health is probed; the figures of both (and, under
    "_latencies" and "_health", the raw latencies, for `_merge`)."""
    stop = asyncio.Event()
    health = asyncio.create_task(_health_probe(url, stop))
    result = await _load(url, normal, 0, body, headers, seconds=seconds, keep_latencies=True)
    stop.set()
    result.update(await health)
    return result


def _merge(a: dict, b: dict) -> dict:
    """Two runs of the same clients as one: requests/s over both, latency percentiles of both."""
    lat = sorted(a.pop("_latencies") + b.pop("_latencies"))
    ok, seconds = a["ok"] + b["ok"], a["seconds"] + b["seconds"]
    health = sorted(a.pop("_health") + b.pop("_health"))
    return {"requests": a["requests"] + b["requests"], "ok": ok, "errors": a["errors"] + b["errors"],
            "error_messages": a["error_messages"] + b["error_messages"], "seconds": seconds,
            "requests_per_s": ok / seconds, "tokens_per_s": (a["tokens_per_s"] * a["seconds"] +
                                                             b["tokens_per_s"] * b["seconds"]) / seconds,
            "latency_p50_s": _percentile(lat, 0.5), "latency_p99_s": _percentile(lat, 0.99),
            "health_checks": len(health), "health_failures": a["health_failures"] + b["health_failures"],
            "health_over_1s": a["health_over_1s"] + b["health_over_1s"],
            "health_p50_s": _percentile(health, 0.5), "health_max_s": health[-1], "runs": [a, b]}


def scenario(url: str, kind: str, normal: int = 12, seconds: float = 20.0, max_tokens: int = 32,
             n_slow: int = 5000, api_key: str | None = None, progress=print) -> dict:
    """Issue 29's probe: `normal` clients alone (the baseline), beside the attacker of `kind`
    ("heavy" or "slow"), and alone again, in one run; the baseline is both runs alone together, so
    that a machine whose other load drifts during the run does not pass for the attacker's doing.
    Returns all figures and the ratios the goals are about."""
    if kind not in ("heavy", "slow"):
        raise ValueError(f"scenario {kind!r}: use heavy or slow")
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    run_load(url, 1, 1, max_tokens, api_key=api_key)  # warm-up
    before = asyncio.run(_with_health(url, normal, seconds / 2, body, headers))
    with attacker(kind, url, n_slow, headers, ramp_s=2.0 if kind == "heavy" else 8.0) as figures:
        under = asyncio.run(_with_health(url, normal, seconds, body, headers))
    time.sleep(2.0)  # the attacker's connections closing
    after = asyncio.run(_with_health(url, normal, seconds / 2, body, headers))
    base = _merge(before, after)
    under.update(figures)
    for key in ("_latencies", "_health"):
        under.pop(key)
    out = {"scenario": kind, "normal_clients": normal, "seconds": seconds, "baseline": base, "attacked": under,
           "requests_per_s_ratio": under["requests_per_s"] / base["requests_per_s"],
           "p50_ratio": under["latency_p50_s"] / base["latency_p50_s"]}
    for name, r in (("alone", base), (f"beside {kind}", under)):
        progress(f"{normal} clients {name:>12}: {r['requests_per_s']:6.2f} req/s  p50 "
                 f"{r['latency_p50_s'] * 1e3:7.1f} ms  p99 {r['latency_p99_s'] * 1e3:7.1f} ms  errors "
                 f"{r['errors']}  /health p50 {r['health_p50_s'] * 1e3:6.1f} ms, max "
                 f"{r['health_max_s'] * 1e3:6.1f} ms ({r['health_failures']} failed)")
    progress(f"ratio: {out['requests_per_s_ratio']:.2f}× req/s, {out['p50_ratio']:.2f}× p50 (alone: "
             f"{base['runs'][0]['requests_per_s']:.2f} req/s before, {base['runs'][1]['requests_per_s']:.2f} after); "
             f"attacker: {figures}")
    return out
