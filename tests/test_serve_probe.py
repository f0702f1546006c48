"""The server against the reliability probe of issue 29: each case it found, as it was found.

A table-free companion of tests/test_serve_hostile.py, in the style of tests/test_corrupt_inputs.py:
each test sends what the probe sent and asserts what a client (and the operator reading the logs)
must see now. The cases, by the probe's numbers:

    1  heavy bodies: a chat of more than MAX_MESSAGES messages, a prompt past MAX_PROMPT_TOKENS /
       MAX_PROMPT_CHARS: 413 before the expensive part; large bodies parse on a worker thread and
       share a byte budget (429 past it)
    2  slow and vanishing clients: a body not in within the body timeout is 408; headers not in
       within the header deadline close the connection; a client gone mid-upload is one access-log
       line (499), no traceback; repeated log lines are rate-limited; a connection cap answers 503
    4  a checkpoint whose weights are NaN: refused at start-up (one line, exit 2) and by the admin
       switch (422)
    6  a checkpoint that fails to load for any reason (shapes, memory, a missing key): 422, one line
    7  top_p far below 1e-8 (1e-45, 5e-324): greedy-equivalent, not a 500
    8  admin model names: checked, unknown ones 404 without "create", capped; /metrics escapes labels
    9  admin paths: confined to the models root, symlinks and ".." included, one answer for
       "outside" and "missing"
    13 OpenAI content-part arrays accepted (text), other parts a clear 400; unknown keys named exactly
and two left-overs: `serve --help` (every endpoint, each default once) and the access-log line that
is written before the client has its answer.

Checks that need no socket talk to the app in-process (httpx.ASGITransport, engine threads started
by hand); timeouts and connection handling need a real uvicorn in a thread on a free port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import string
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from minillm.cli import main  # noqa: E402
from minillm.data.tokenizer import CharTokenizer  # noqa: E402
from minillm.generate.sampling import generate_text  # noqa: E402
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.model.transformer import CausalLM  # noqa: E402
from minillm.serve import limits  # noqa: E402
from minillm.serve.api import (MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, build_app)  # noqa: E402
from minillm.serve.metrics import Metrics, MetricsMiddleware  # noqa: E402
from minillm.serve.registry import Registry  # noqa: E402
from minillm.weights.checkpoint import load_model, save_model, write_manifest  # noqa: E402
from tests.helpers import running  # noqa: E402

ADMIN = "adm1n"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
TOK = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,:;!?'-\n")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16,
                      tie_weights=False, init_std=0.3)
    return CausalLM(cfg).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(app, method: str, path: str, **kw) -> httpx.Response:
    """One request to `app` in-process (no socket)."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=60) as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The models root: two good checkpoints inside; one outside, beside it."""
    base = tmp_path_factory.mktemp("probe")
    inside = base / "models"
    return {"root": inside, "a": save_model(inside / "a", tiny_model(0), TOK, step=1),
            "b": save_model(inside / "b", tiny_model(1), TOK, step=2),
            "outside": save_model(base / "outside", tiny_model(2), TOK, step=3)}


@pytest.fixture
def served(root):
    """An app serving "alpha" (checkpoint a) with its engine running, admin on, confined to the root,
    at most 2 models; yields (app, registry)."""
    registry = Registry(lambda folder: load_model(folder), max_batch_size=4, max_queue=16, max_models=2)
    registry.add(registry.make_version("alpha", *load_model(root["a"]), path=str(root["a"]), start=False))
    app = build_app(registry, admin_key=ADMIN, models_root=root["root"])
    registry.start()  # (ASGITransport does not run the lifespan)
    yield app, registry
    registry.shutdown()


def greedy(checkpoint, prompt: str, n: int) -> str:
    model, tok, _ = load_model(checkpoint)
    return generate_text(model, tok, [prompt], n, temperature=0)[0]


# --- 1. heavy bodies -------------------------------------------------------------------------------

def test_a_chat_of_29000_messages_is_413_before_validation(served, monkeypatch):
    app, _ = served
    from minillm.serve import protocol

    validated = []
    monkeypatch.setattr(protocol.ChatRequest, "model_validate",
                        classmethod(lambda cls, *a, **k: validated.append(1)))
    body = {"messages": [{"role": "user", "content": "hi"}] * 29_000}  # ~986 KB, as in the probe
    r = call(app, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_messages" and err["param"] == "messages"
    assert f"the limit is {MAX_MESSAGES}" in err["message"] and "29,000" in err["message"]
    assert validated == []  # refused on the parsed JSON: pydantic never saw 29,000 messages


def test_the_message_limit_is_inclusive(served):
    app, _ = served
    msgs = [{"role": "user", "content": "a"}] * MAX_MESSAGES
    r = call(app, "POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
    assert r.status_code == 200, r.text  # cropped to the context like any long prompt


@pytest.mark.parametrize("n,unit", [(MAX_PROMPT_TOKENS + 1, "tokens"), (MAX_PROMPT_CHARS + 1, "characters")])
def test_a_prompt_past_the_limits_is_413(served, monkeypatch, n, unit):
    app, registry = served
    encoded, tok = [], registry.current("alpha").tokenizer
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda s: encoded.append(len(s)) or encode(s))
    r = call(app, "POST", "/v1/completions", json={"prompt": "a" * n, "max_tokens": 2})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and err["param"] == "prompt" and f"{n:,} {unit}" in err["message"]
    if unit == "characters":
        assert encoded == []  # refused before the tokenizer ran


def test_a_large_body_parses_on_a_worker_thread_and_a_small_one_on_the_loop(served, monkeypatch):
    app, _ = served
    from minillm.serve import handlers

    threads = []
    parse = handlers.parse
    monkeypatch.setattr(handlers, "parse", lambda *a: threads.append(threading.current_thread()) or parse(*a))
    for prompt in ("hi", "a" * 20_000):  # 20 KB >= LARGE_BODY_BYTES
        assert call(app, "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code == 200
    small, large = threads
    assert small is threading.main_thread() and large is not threading.main_thread()


def test_the_body_budget_waits_then_refuses():
    now = [0.0]
    budget = limits.BodyBudget(bytes_per_s=1000, burst=2000, max_wait_s=3.0, clock=lambda: now[0])
    assert budget.reserve(1500) == 0.0  # within the burst: at once
    assert budget.reserve(1500) == pytest.approx(1.0)  # 500 left, 1000 short: one second at 1000 B/s
    assert budget.reserve(5000) is None  # would wait 6 s > 3 s: refused, nothing taken
    now[0] = 4.0  # the debt (-1000) refills to 2000 (the burst) in 3 s
    assert budget.reserve(2000) == 0.0


def test_large_bodies_past_the_budget_get_429_and_small_ones_pass(served):
    app, _ = served
    app.state.body_budget = limits.BodyBudget(bytes_per_s=1000, burst=30_000, max_wait_s=0.5)
    big = {"prompt": "a" * 20_000, "max_tokens": 1}
    assert call(app, "POST", "/v1/completions", json=big).status_code == 200
    r = call(app, "POST", "/v1/completions", json=big)  # 10 KB short at 1 KB/s: 10 s > 0.5 s
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "body_budget"
    assert call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


# --- 2. slow and vanishing clients (a real socket) --------------------------------------------------

class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def real_server(root):
    """alpha in a uvicorn thread with the CLI's limits, made short: header deadline 1 s, body
    timeout 0.5 s, at most 6 connections. Yields (host, port, access records, uvicorn.error records)."""
    model, tok, meta = load_model(root["a"])
    app = build_app(model, tok, "alpha", max_batch_size=2, body_timeout_s=0.5)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                            **limits.server_options(max_connections=6, header_timeout_s=1.0))
    srv = uvicorn.Server(config)
    access, errors = Records(), Records()
    logging.getLogger("minillm.access").addHandler(access)
    logging.getLogger("minillm.access").setLevel(logging.INFO)
    logging.getLogger("uvicorn.error").addHandler(errors)  # (after the Config: it sets uvicorn's loggers up)
    try:
        with running(srv):
            yield "127.0.0.1", config.port, access.records, errors.records
    finally:
        logging.getLogger("minillm.access").removeHandler(access)
        logging.getLogger("uvicorn.error").removeHandler(errors)


def raw(host, port, data: bytes, read_timeout: float = 5.0) -> tuple[bytes, float]:
    """Send `data` on a new connection and read until the server closes it: (what came back, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, time.monotonic() - t0


POST_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n")


def test_a_body_that_does_not_arrive_in_time_is_408(real_server):
    host, port, access, _ = real_server
    out, seconds = raw(host, port, POST_HEAD + b'{"messages": [')
    assert out.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in out
    assert 0.2 < seconds < 4  # between 0.25 and 0.5 s (jittered), plus the machine's delays
    assert any(json.loads(r.getMessage())["status"] == 408 for r in access)


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHo"], ids=["nothing", "half-headers"])
def test_headers_that_do_not_arrive_in_time_close_the_connection(real_server, sent):
    host, port, _, _ = real_server
    out, seconds = raw(host, port, sent)
    assert out.startswith(b"HTTP/1.1 408") and 0.45 < seconds < 5  # 0.5-1 s, jittered


def test_a_keep_alive_connection_serves_requests_slower_than_the_header_deadline(real_server):
    host, port, _, _ = real_server
    with httpx.Client(base_url=f"http://{host}:{port}") as c:  # one connection, reused
        for _ in range(3):
            assert c.get("/health").status_code == 200
            time.sleep(0.6)  # 3 × 0.6 s > the 1 s deadline, which re-arms after each answer


def test_a_client_gone_mid_upload_is_one_log_line_and_no_traceback(real_server):
    host, port, access, errors = real_server
    for _ in range(3):
        with socket.create_connection((host, port)) as s:
            s.sendall(POST_HEAD + b'{"messages": [{"role": "user", ')
            time.sleep(0.1)  # the handler is reading the body now
    deadline = time.monotonic() + 5
    while sum(json.loads(r.getMessage())["status"] == 499 for r in access) < 3:
        assert time.monotonic() < deadline, [r.getMessage() for r in access]
        time.sleep(0.05)
    assert [r for r in errors if r.levelno >= logging.ERROR or r.exc_info] == []
    assert httpx.get(f"http://{host}:{port}/health").status_code == 200


def test_past_the_connection_cap_requests_get_503(real_server):
    host, port, _, _ = real_server
    held = [socket.create_connection((host, port)) for _ in range(6)]  # idle, within the 1 s deadline
    try:
        time.sleep(0.05)
        r = httpx.get(f"http://{host}:{port}/health")
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"http://{host}:{port}/health").status_code == 200


def test_repeated_log_lines_are_rate_limited_and_counted():
    now = [0.0]
    f = limits.RateLimitFilter(per_key=3, period_s=1.0, clock=lambda: now[0])
    rec = lambda: logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                    None, None)
    passed = [f.filter(rec()) for _ in range(100)]
    assert passed == [True] * 3 + [False] * 97
    now[0] = 1.5
    r = rec()
    assert f.filter(r) and r.getMessage() == "Exception in ASGI application [97 similar lines suppressed]"
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Exceeded concurrency limit.", None, None)
    assert f.filter(other)  # another kind of line has its own allowance


def test_access_log_error_lines_are_rate_limited_with_a_suppressed_count():
    async def not_found(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    now = [0.0]
    mw = MetricsMiddleware(not_found, Metrics(), limiter=limits.RateLimitFilter(per_key=5, clock=lambda: now[0]))
    records = Records()
    log = logging.getLogger("minillm.access")
    log.addHandler(records)
    log.setLevel(logging.INFO)

    async def send(message):
        pass

    async def hit(n):
        for _ in range(n):
            await mw({"type": "http", "method": "GET", "path": "/nope"}, None, send)
    try:
        asyncio.run(hit(50))
        now[0] = 2.0
        asyncio.run(hit(1))
    finally:
        log.removeHandler(records)
    lines = [json.loads(r.getMessage()) for r in records.records]
    assert len(lines) == 6 and lines[-1]["suppressed"] == 45 and "suppressed" not in lines[0]
    assert mw.metrics.requests[("other", 404)] == 51  # metrics still count every request


# --- 4 and 6. checkpoints that must not be served -------------------------------------------------

def nan_checkpoint(folder):
    model = tiny_model(3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_model(folder, model, TOK, step=9)


@pytest.fixture
def access_log_kept():
    """`minillm serve` points minillm.access at (captured) stderr: put the logger back afterwards."""
    log = logging.getLogger("minillm.access")
    saved = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:], log.propagate = saved[0], saved[1]
    log.setLevel(saved[2])


def test_serve_refuses_an_all_nan_checkpoint_in_one_line(tmp_path, monkeypatch, capsys, access_log_kept):
    ckpt = nan_checkpoint(tmp_path / "nan")
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    assert main(["serve", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert started == [] and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("minillm serve: error: ") and "non-finite" in line


def test_serve_starts_on_a_finite_checkpoint_with_the_limits(root, monkeypatch, capsys, access_log_kept):
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert main(["serve", str(root["a"]), "--admin-key=k", "--header_timeout=3"]) == 0
    assert started["limit_concurrency"] <= 8192 and started["timeout_keep_alive"] == 5
    assert started["http"].__name__.startswith("HeaderDeadline")
    assert started["app"].state.models_root == root["root"].resolve()  # the folder holding the first model
    assert "loads checkpoints from" in capsys.readouterr().out


def test_admin_refuses_a_nan_checkpoint_and_keeps_serving(served, root, tmp_path):
    app, registry = served
    nan_checkpoint(root["root"] / "nan")
    before = registry.current("alpha").version
    r = call(app, "POST", "/admin/models/alpha", json={"path": "nan"}, headers=ADMIN_AUTH)
    assert r.status_code == 422 and "non-finite" in r.json()["error"]["message"]
    assert registry.current("alpha").version == before


@pytest.mark.parametrize("failure", [MemoryError("cannot allocate 51 GB"), RuntimeError("size mismatch\n\tfor x"),
                                     KeyError("n_embd"), OverflowError("too big")],
                         ids=["MemoryError", "RuntimeError", "KeyError", "OverflowError"])
def test_any_load_failure_is_a_one_line_422(served, root, failure):
    app, registry = served

    def load(folder):
        raise failure
    registry._load = load
    r = call(app, "POST", "/admin/models/alpha", json={"path": "b"}, headers=ADMIN_AUTH)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "keeps serving" in message and type(failure).__name__ in message and "\n" not in message


def test_a_config_that_disagrees_with_its_weights_is_422(served, root):
    app, _ = served
    bad = save_model(root["root"] / "wide", tiny_model(4), TOK, step=5)
    config = json.loads((bad / "config.json").read_text())
    config["model"]["n_embd"] = 32  # the weights are 16 wide
    (bad / "config.json").write_text(json.dumps(config))
    write_manifest(bad)  # (so that the config, not the manifest, is what is wrong)
    r = call(app, "POST", "/admin/models/alpha", json={"path": "wide"}, headers=ADMIN_AUTH)
    assert r.status_code == 422, r.text
    assert "\n" not in r.json()["error"]["message"]


# --- 7. top_p --------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [1e-9, 1e-45, 5e-324])
def test_a_vanishing_top_p_is_greedy_not_a_500(served, root, top_p):
    app, _ = served
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "top_p": top_p, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy(root["a"], "hi", 8)


# --- 8. admin model names, and /metrics labels -----------------------------------------------------

@pytest.mark.parametrize("name", ["a%22b", "a%0Ab", "a%00b", "x" * 65, "a b", "a{b}", "é"])  # (" \n NUL)
def test_admin_refuses_names_outside_the_pattern(served, name):
    app, registry = served
    r = call(app, "POST", f"/admin/models/{name}", json={"path": "b", "create": True}, headers=ADMIN_AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_name", r.text
    assert registry.names() == ["alpha"]


def test_an_unknown_name_is_404_unless_created_and_the_count_is_capped(served):
    app, registry = served
    r = call(app, "POST", "/admin/models/beta", json={"path": "b"}, headers=ADMIN_AUTH)
    assert r.status_code == 404 and "models: alpha" in r.json()["error"]["message"]
    r = call(app, "POST", "/admin/models/beta", json={"path": "b", "create": True}, headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    assert registry.names() == ["alpha", "beta"] and r.json()["current"]["step"] == 2
    r = call(app, "POST", "/admin/models/gamma", json={"path": "b", "create": True}, headers=ADMIN_AUTH)
    assert r.status_code == 409 and "max_models=2" in r.json()["error"]["message"]
    assert registry.names() == ["alpha", "beta"]


LINE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="([^"\\\n]|\\[\\"n])*",?)*\})? \S+')


def test_metrics_escape_label_values_so_no_name_writes_a_line(root):
    model, tok, _ = load_model(root["a"])
    registry = Registry(None)
    evil = 'x"} 1\nminillm_pwned{a="\\'
    registry.add(registry.make_version(evil, model, tok, start=False))
    app = build_app(registry)
    call(app, "POST", "/v1/completions", json={"prompt": "hi", "model": "nope"})
    text = call(app, "GET", "/metrics").text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(LINE.fullmatch(line) for line in samples), [s for s in samples if not LINE.fullmatch(s)]
    assert not any(line.startswith("minillm_pwned") for line in text.splitlines())
    assert 'model="x\\"} 1\\nminillm_pwned{a=\\"\\\\"' in text


# --- 9. admin paths --------------------------------------------------------------------------------

def test_admin_paths_are_confined_to_the_models_root(served, root, tmp_path):
    app, registry = served
    r_root = root["root"]
    (r_root / "link-out").unlink(missing_ok=True)
    (r_root / "link-out").symlink_to(root["outside"])
    mixed = r_root / "mixed"
    mixed.mkdir(exist_ok=True)
    for f in root["a"].iterdir():  # a copy of a, except one file linked from outside
        target = mixed / f.name
        if target.exists():
            continue
        if f.name == "model.safetensors":
            target.symlink_to(root["outside"] / f.name)
        else:
            target.write_bytes(f.read_bytes())

    def refusal(path):
        r = call(app, "POST", "/admin/models/alpha", json={"path": path}, headers=ADMIN_AUTH)
        assert r.status_code == 422, (path, r.text)
        return r.json()["error"]["message"].replace(repr(path), "PATH")

    answers = {p: refusal(p) for p in (str(root["outside"]), "../outside", "link-out", "mixed", "/etc",
                                       "/etc/passwd", "/no/such/dir", str(tmp_path / "missing"))}
    assert len(set(answers.values())) == 1, answers  # outside, or missing outside: the same words
    assert "does not exist" not in next(iter(answers.values()))
    assert registry.current("alpha").step == 1  # nothing was loaded
    r = call(app, "POST", "/admin/models/alpha", json={"path": str(root["b"])}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["current"]["step"] == 2  # absolute, but inside: fine


# --- 13. chat content parts and unknown keys ------------------------------------------------------

def test_text_content_parts_are_joined_and_answer_like_a_string(served):
    app, _ = served
    ask = lambda content: call(app, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0})
    as_parts = ask([{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}])
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"]["content"] == \
        ask("Hello\nthere").json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("message,param,fragment", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
     "messages[0].content", "'image_url': only text parts"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}, "messages[0].content", "'cache'"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content", "needs \"text\""),
    ({"role": "user", "content": "x", "foo": 1}, "messages[0].foo", "unknown field 'messages[0].foo'"),
], ids=["image-part", "unknown-part-key", "part-without-text", "unknown-message-key"])
def test_bad_chat_messages_name_the_exact_place(served, message, param, fragment):
    app, _ = served
    r = call(app, "POST", "/v1/chat/completions", json={"messages": [message]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# --- left-overs: help text, and the access log's timing ---------------------------------------------

def test_serve_help_lists_every_endpoint_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for endpoint in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                     "GET /metrics", "GET /admin/models/NAME", "POST /admin/models/NAME",
                     "/admin/models/NAME/rollback"):
        assert endpoint in text, endpoint
    options = re.split(r"\s(?=--[a-z])", text.split("options:")[1])
    assert all(o.count("(default") <= 1 for o in options), [o for o in options if o.count("(default") > 1]


def test_the_access_log_line_is_written_before_the_last_byte_is_handed_to_the_server():
    """Deterministic: the middleware must have logged by the time it passes the final body on."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    records, seen = Records(), []
    log = logging.getLogger("minillm.access")
    log.addHandler(records)
    log.setLevel(logging.INFO)

    async def send(message):
        seen.append((message["type"], len(records.records)))

    try:
        asyncio.run(MetricsMiddleware(app, Metrics())({"type": "http", "method": "GET", "path": "/x"}, None, send))
    finally:
        log.removeHandler(records)
    assert seen == [("http.response.start", 0), ("http.response.body", 1)]


def test_the_access_log_line_is_written_before_the_client_has_its_answer(real_server):
    """Over a real socket the client can have its answer before the server's coroutine resumes: the
    line must already be there (tests/test_serve_versions.py's access-log test read it at once)."""
    host, port, access, _ = real_server
    with httpx.Client(base_url=f"http://{host}:{port}") as c:
        for _ in range(20):  # the 404 of that test, and a 200; checked the moment each returns
            assert c.post("/v1/completions", json={"prompt": "hi", "model": "nope"}).status_code == 404
            assert json.loads(access[-1].getMessage())["status"] == 404
            assert c.get("/health").status_code == 200
            assert json.loads(access[-1].getMessage())["path"] == "/health"


def test_raise_open_file_limit_reaches_what_it_can():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.raise_open_file_limit(soft) == soft  # asking for what there is changes nothing
    if hard != resource.RLIM_INFINITY and soft < hard:
        assert limits.raise_open_file_limit(hard + 1) == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
