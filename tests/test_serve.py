"""`minillm serve` as a client meets it: a real uvicorn server on a free localhost port, spoken to over HTTP.

One server runs the real command line in a subprocess (API key from $MINILLM_API_KEY); a second,
tiny one (1 batch row, queue of 1) runs in a thread to reach the 429 and disconnect paths quickly.
Greedy completions are compared with minillm.generate.sampling.generate_text on the same checkpoint.
"""

import asyncio
import contextlib
import json
import os
import socket
import string
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from minillm.weights.checkpoint import load_model, save_model
from minillm.cli import main
from minillm.model.config import ModelConfig
from minillm.generate.sampling import generate_text
from minillm.model.transformer import CausalLM
from minillm.data.tokenizer import CharTokenizer

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BLOCK = 512
LONG = 4096  # the small server's context
PROMPTS = ["ROMEO:", "a", "What light through yonder window breaks", "Is this a dagger\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metrics(base: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(base: str, name: str) -> float:
    return metrics(base).get(name, 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # untied, larger-than-usual init: a random model whose greedy text varies (a tied random model
    # just repeats its last token, which would make "same output" a weak test)
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,:;!?'-\n")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                      tie_weights=False, init_std=0.3)
    return save_model(tmp_path_factory.mktemp("ckpt") / "tiny-char", CausalLM(cfg), tok)


@contextlib.contextmanager
def one_thread():
    # on a shared 2-core runner, a tiny model's matmuls on 2 threads spend more time synchronising
    # than computing (5-10x slower here); restore the setting so other tests are unaffected
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, tok, _ = load_model(checkpoint)

    def greedy(prompt: str, max_tokens: int, stop=None) -> str:
        with one_thread():
            return generate_text(model, tok, [prompt], max_tokens, temperature=0, stop=stop)[0]
    return greedy


@pytest.fixture(scope="module")
def server(checkpoint):
    """`minillm serve` in a subprocess, exactly as a user runs it."""
    port = free_port()
    env = {**os.environ, "MINILLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "minillm.cli", "serve", str(checkpoint),
                             f"--port={port}", "--max_batch_size=8", "--max_queue=8", "--log-level=warning",
                             "--threads=1", "--access-log=off"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_until(up, timeout=90, what="the server to start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """The app in a uvicorn thread with one batch row and a queue of one, and an API key.
    Its model has a long context, so one request can hold the only row for a few seconds."""
    import uvicorn

    from minillm.serve.api import build_app
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(string.ascii_letters)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=LONG, n_layer=1, n_head=1,
                                 n_embd=16)).eval()
    app = build_app(model, tok, "tiny", max_batch_size=1, max_queue=1, api_key="s3cret")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        ws="none"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="the threaded server to start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def complete(base: str, headers=AUTH, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)


# --- what a client gets ------------------------------------------------------------------------

def test_greedy_completion_equals_minillm_generate(server, reference):
    for prompt in PROMPTS:
        r = complete(server, prompt=prompt, max_tokens=24, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny-char"
        (choice,) = body["choices"]
        assert choice["text"] == reference(prompt, 24)
        assert choice["finish_reason"] == "length" and choice["index"] == 0
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 24,
                                 "total_tokens": len(prompt) + 24}


def test_prompt_list_and_n_samples(server, reference):
    r = complete(server, prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    texts = [c["text"] for c in r.json()["choices"]]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]  # prompt i, sample j -> i*n + j
    a, b = reference(PROMPTS[0], 8), reference(PROMPTS[1], 8)
    assert texts == [a, a, b, b]
    sampled = [complete(server, prompt="ROMEO:", max_tokens=12, temperature=1.0, n=3, seed=7).json()
               for _ in range(2)]
    first = [c["text"] for c in sampled[0]["choices"]]
    assert first == [c["text"] for c in sampled[1]["choices"]], "same seed, same request -> same text"
    assert len(set(first)) > 1, "the n samples of one prompt should differ"
    assert sampled[0]["usage"]["completion_tokens"] == 36


def test_streaming_sends_the_same_text_as_sse(server, reference):
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) > 1, "tokens should arrive as separate events"
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference("ROMEO:", 20)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_ends_the_completion(server, reference):
    full = reference("ROMEO:", 30)
    stop = full[10:12]  # two characters the model will produce
    r = complete(server, prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop, "never-seen"])
    (choice,) = r.json()["choices"]
    assert choice["text"] == full[:full.index(stop)] == reference("ROMEO:", 30, stop=[stop])
    assert choice["finish_reason"] == "stop"


def test_long_prompt_is_cropped_to_fit_the_context(server, reference):
    prompt = ("To be, or not to be, that is the question. " * 20)[:BLOCK + 40]
    r = complete(server, prompt=prompt, max_tokens=10, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == BLOCK - 10  # the last block_size - max_tokens tokens
    assert r.json()["choices"][0]["text"] == reference(prompt[-(BLOCK - 10):], 10)


def test_concurrent_requests_batch_and_match_alone(server, reference):
    before = metrics(server)
    jobs = [(p, m) for p, m in zip(PROMPTS * 2, [30, 12, 25, 18, 9, 31, 22, 16])]

    async def run_all():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            rs = await asyncio.gather(*[client.post(f"{server}/v1/completions", json={
                "prompt": p, "max_tokens": m, "temperature": 0}) for p, m in jobs])
            return [r.json()["choices"][0]["text"] for r in rs]
    got = asyncio.run(run_all())
    assert got == [reference(p, m) for p, m in jobs]
    after = metrics(server)
    steps = after["minillm_batch_size_count"] - before["minillm_batch_size_count"]
    rows = after["minillm_batch_size_sum"] - before["minillm_batch_size_sum"]
    assert rows / steps > 1.5, \
        f"8 concurrent requests should share decode steps ({rows} rows, {steps} steps)"


def test_models_health_metrics(server):
    assert httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny-char"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # no key needed for probes
    r = httpx.get(f"{server}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("minillm_requests_total", "minillm_generated_tokens_total", "minillm_queue_depth",
                 "minillm_request_duration_seconds_bucket", "minillm_batch_size_bucket",
                 "minillm_active_rows"):
        assert f"\n{name}" in r.text
    assert metric(server, 'minillm_requests_total{path="/v1/completions",code="200"}') >= 1
    r = httpx.get(f"{server}/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --- what a bad client gets --------------------------------------------------------------------

BAD = [  # (id, raw body, status, param, a fragment of the message)
    ("malformed-json", b'{"prompt": "hi", "max_tokens": 4', 400, None, "not valid JSON"),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', 400, None, "not valid UTF-8"),
    ("not-an-object", b'["hi"]', 400, None, "JSON object"),
    ("nan", b'{"prompt": "hi", "temperature": NaN}', 400, None, "NaN"),
    ("unknown-field", {"prompt": "hi", "max_tokenz": 4}, 400, "max_tokenz", "unknown field"),
    ("no-prompt", {"max_tokens": 4}, 400, "prompt", "required"),
    ("prompt-not-text", {"prompt": 42}, 400, "prompt", "string"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt", "non-empty"),
    ("empty-prompt-list", {"prompt": []}, 400, "prompt", "non-empty"),
    ("empty-prompt-in-list", {"prompt": ["a", ""]}, 400, "prompt", "non-empty"),
    ("unencodable-char", {"prompt": "Grüße"}, 400, "prompt", "'ü'"),
    ("max-tokens-negative", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater than"),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("max-tokens-huge", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens", f"at most {BLOCK - 1}"),
    ("max-tokens-string", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("temperature-negative", {"prompt": "hi", "temperature": -0.1}, 400, "temperature", "greater than"),
    ("temperature-too-hot", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "less than"),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than"),
    ("top-p-above-one", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "less than"),
    ("top-k-zero", {"prompt": "hi", "top_k": 0}, 400, "top_k", "greater than"),
    ("n-zero", {"prompt": "hi", "n": 0}, 400, "n", "greater than"),
    ("n-past-batch", {"prompt": ["a", "b"], "n": 5}, 400, "n", "max_batch_size=8"),
    ("empty-stop", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("wrong-model", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "not served here"),
    ("too-big", b'{"prompt": "' + b"a" * 1_000_001 + b'"}', 413, None, "the limit is"),
    # numbers no field can hold: 400 from validation, not a crash in torch.Generator.manual_seed
    ("seed-2**64", {"prompt": "hi", "seed": 2**64}, 400, "seed", "less than or equal"),
    ("seed-below-int64", {"prompt": "hi", "seed": -2**63 - 1}, 400, "seed", "greater than"),
    ("top-k-huge", {"prompt": "hi", "top_k": 10**30}, 400, "top_k", "less than or equal"),
    ("n-huge", {"prompt": "hi", "n": 2**64}, 400, "n", "less than or equal"),
    ("max-tokens-2**64", {"prompt": "hi", "max_tokens": 2**64}, 400, "max_tokens", "less than or equal"),
    ("int-5000-digits", b'{"prompt": "hi", "seed": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
    # nesting: too deep for the JSON parser, and deep but parseable inside a field
    ("nested-100000", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "too deeply"),
    ("nested-900", b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}", 400, "prompt", "string"),
]


@pytest.mark.parametrize("body,status,param,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error(server, body, status, param, fragment):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert fragment in err["message"], err["message"]


def test_server_keeps_serving_after_bad_input(server, reference):
    for raw in (b"\xff", b"{", b'{"prompt": "x", "max_tokens": -5}'):
        httpx.post(f"{server}/v1/completions", headers=AUTH, content=raw)
    assert complete(server, prompt="a", max_tokens=5, temperature=0).json()["choices"][0]["text"] \
        == reference("a", 5)


def test_api_key_from_env_is_required(server):
    assert complete(server, headers={}, prompt="a").status_code == 401
    r = complete(server, headers={"Authorization": "Bearer wrong"}, prompt="a")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_disconnect_mid_stream_frees_the_row(server):
    before = metrics(server)
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "a", "max_tokens": BLOCK - 1, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))  # generation has started
    # leaving the block closed the connection mid-stream
    wait_until(lambda: metric(server, "minillm_active_rows") == 0, what="the row to be freed")
    after = metrics(server)
    assert after["minillm_client_disconnects_total"] == before["minillm_client_disconnects_total"] + 1
    assert after.get('minillm_requests_total{path="/v1/completions",code="499"}', 0) == \
        before.get('minillm_requests_total{path="/v1/completions",code="499"}', 0) + 1
    made = after["minillm_generated_tokens_total"] - before["minillm_generated_tokens_total"]
    assert made < BLOCK - 1, f"the request ran to the end ({made} tokens) instead of being cancelled"


def test_full_queue_answers_429_and_waiting_clients_can_leave(small_server):
    base, auth = small_server, {"Authorization": "Bearer s3cret"}
    assert complete(base, headers={}, prompt="a").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    long = {"prompt": "a", "max_tokens": LONG - 1}

    async def scenario():
        async with httpx.AsyncClient(headers=auth, timeout=60) as client:
            async def gauge(name):
                text = (await client.get(f"{base}/metrics")).text
                return float(next(line.split()[1] for line in text.splitlines()
                                  if line.startswith(name + " ")))

            # A takes the only batch row ...
            async with client.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}) as a:
                lines = a.aiter_lines()  # keep a reference: a collected iterator closes the connection
                await lines.__anext__()
                # ... B waits in the queue of one ...
                b = asyncio.create_task(client.post(f"{base}/v1/completions", json=long))
                while await gauge("minillm_queue_depth") != 1:
                    assert not b.done(), "B was not queued: A finished too soon"
                    await asyncio.sleep(0.02)
                # ... so C is refused instead of growing the queue
                c = await client.post(f"{base}/v1/completions", json=long)
                assert c.status_code == 429 and c.headers["retry-after"] == "1"
                assert c.json()["error"]["code"] == "queue_full"
                b.cancel()  # a waiting client that gives up leaves the queue
                while await gauge("minillm_queue_depth") != 0:
                    await asyncio.sleep(0.05)
                assert await gauge("minillm_active_rows") == 1  # A is still being decoded
            while await gauge("minillm_active_rows") != 0:  # and its row is free once it hangs up
                await asyncio.sleep(0.05)
            assert await gauge("minillm_client_disconnects_total") == 2
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    r = complete(base, headers=auth, prompt="a", max_tokens=3)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_cli_errors_on_a_missing_checkpoint(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and ("not a minillm checkpoint" in err or "does not exist" in err), err
