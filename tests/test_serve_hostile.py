"""The server against clients that mean harm (or are merely broken): none of them may hurt anyone else.

Three layers are tested, from the inside out:
  - sampling: no temperature > 0 can turn logits into NaN (minillm.generate.sampling.sample_next);
  - the engine: a request that fails while it is prefilled, sampled or detokenized fails alone,
    never the other requests decoded in the same batch (minillm.generate.batching);
  - HTTP: body size limit while reading, JSON-only POSTs, API-key and CORS rules, and finally a
    bounded hostile mix against a real uvicorn, in which well-formed clients must see no error.
Checks that need no decoding talk to the app in-process (httpx.ASGITransport); the rest use a
uvicorn server in a thread on a free port, as tests/test_serve.py does.
"""

import asyncio
import socket
import string
import threading

import httpx
import pytest
import torch

from minillm.weights.checkpoint import save_model
from minillm.cli import main
from minillm.data.tokenizer import CharTokenizer
from minillm.generate import batching
from minillm.generate.batching import BatchEngine, SamplingParams
from minillm.generate.sampling import generate_text, sample_next
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.serve.api import MAX_BODY_BYTES, build_app
from tests.helpers import running

KEY = "ключ-🔑 with spaces"  # not ASCII: compared as UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + KEY.encode()}  # httpx sends str header values as ASCII only
GOOD_ORIGIN, EVIL_ORIGIN = "http://good.example:3000", "http://evil.example"
CHUNK = 65536


@pytest.fixture(scope="module")
def tiny():
    """A random char model with non-trivial greedy text (untied, large init), and its tokenizer."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(string.ascii_letters + " .\n")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                      tie_weights=False, init_std=0.3)
    return CausalLM(cfg).eval(), tok


def asgi_client(app) -> httpx.AsyncClient:
    """In-process client: no sockets, and the app reads the request body exactly as it is sent.
    ASGITransport does not run the lifespan, so the engine thread is not started (nothing here
    reaches the queue)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny):
    """The app (API key, one CORS origin) in a uvicorn thread; yields its base URL."""
    import uvicorn

    model, tok = tiny
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on 2 shared cores: threads cost more than they give
    app = build_app(model, tok, "tiny", max_batch_size=16, max_queue=64, api_key=KEY,
                    cors_origins=[GOOD_ORIGIN])
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical",
                                        ws="none"))
    try:
        with running(srv):
            yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        torch.set_num_threads(n_threads)


def greedy(tiny, prompt: str, max_tokens: int) -> str:
    model, tok = tiny
    return generate_text(model, tok, [prompt], max_tokens, temperature=0)[0]


# --- 1. sampling cannot produce NaN -------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-2, 1e-20, 1e-39, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.9)])
def test_tiny_temperature_samples_the_argmax_not_nan(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[1, 7:] = float("-inf")  # a row with few candidates is still a distribution
    logits[2, 4] = logits[2].max() + 10  # a clear winner
    ids = sample_next(logits, temperature, top_k, top_p, generator=g)
    if temperature < 1e-2:  # logit gaps of ~0.01 or more are gaps of >= 1e18 / τ... i.e. -inf
        assert torch.equal(ids, logits.argmax(dim=-1))
    assert ids.shape == (6,) and bool(((ids >= 0) & (ids < 50)).all())


@pytest.mark.parametrize("temperature", [1e29, 1e31, 1e300, 1.7e308])
def test_huge_temperature_samples_every_finite_logit_never_nan(temperature):
    # -inf / inf is NaN in float32 (1e31 and beyond are inf there): such τ divide in float64
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    logits[1, 5:] = float("-inf")  # only tokens 0..4 may be drawn from row 1
    draws = torch.stack([sample_next(logits, temperature, generator=torch.Generator().manual_seed(s))
                         for s in range(200)])  # (200, 3)
    assert bool((draws[:, 1] < 5).all())
    assert len(set(draws[:, 0].tolist())) > 10  # τ → ∞ flattens the distribution: most tokens appear


def test_sampling_at_normal_temperature_draws_from_softmax_z_over_tau():
    # the max shift and float64 division must not change the distribution: same generator state,
    # same draws as torch.multinomial on the textbook softmax(z / τ)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    got = [sample_next(logits, 0.7, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    want = [torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=torch.Generator().manual_seed(s))
            .squeeze(-1) for s in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("poison", ["all-inf", "nan", "+inf"])
def test_a_row_without_a_distribution_is_a_value_error_naming_it(poison):
    logits = torch.zeros(3, 10)
    logits[2] = {"all-inf": float("-inf"), "nan": float("nan"), "+inf": float("inf")}[poison]
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
            sample_next(logits, temperature)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1e-9])
def test_temperature_must_be_finite_and_non_negative(temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 5), temperature)


# --- 1. a failing request fails alone ------------------------------------------------------------

def run_engine(model, tok, requests):
    """Submit every request before the engine starts, so that they are admitted (and decoded)
    together; returns each request's (text, finish_reason, error) per choice, and the most rows
    any decode step ran with."""
    engine = BatchEngine(model, tok, max_batch_size=16, max_queue=16)
    done, results = threading.Event(), {}
    jobs = []
    for k, (prompts, params, n) in enumerate(requests):
        texts = {}

        def emit(ev, k=k, texts=texts, n_rows=len(prompts) * n):
            texts[ev.index] = texts.get(ev.index, "") + ev.text
            if ev.finish_reason is not None:
                results.setdefault(k, {})[ev.index] = (texts[ev.index], ev.finish_reason, ev.error)
                if sum(len(r) for r in results.values()) == total:
                    done.set()
        jobs.append(batching.Request(prompts, params, n, emit=emit, stream=True))
    total = sum(j.n_rows for j in jobs)
    for j in jobs:
        engine.submit(j)
    engine.start()
    try:
        assert done.wait(60), f"only {results} finished"
    finally:
        engine.shutdown()
    widest = max(b for b, steps in enumerate(engine.stats.batch_rows) if steps)
    return [[results[k][i] for i in range(j.n_rows)] for k, j in enumerate(jobs)], widest


def test_a_request_failing_in_prefill_sampling_or_decoding_fails_alone(tiny, monkeypatch):
    model, tok = tiny
    prompt = tok.encode("ab")
    real_sample, real_find_stop = batching.sample_next, batching.find_stop

    calls = {"sample": 0}

    def sample_next_failing_at_037(logits, temperature, *args):  # a sampler bug hitting one setting,
        if temperature == 0.37:  # from its 3rd token on: it fails in a decode step, among the others
            calls["sample"] += 1
            if calls["sample"] >= 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_sample(logits, temperature, *args)

    def find_stop_failing_on_boom(text, stops):  # a text-side bug (detokenizing, stop search)
        if "BOOM" in stops and len(text) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_find_stop(text, stops)

    good = [([prompt], SamplingParams(12, 0.0), 1), ([prompt], SamplingParams(12, 1.0, seed=5), 2)]
    alone = run_engine(model, tok, good[:1])[0] + run_engine(model, tok, good[1:])[0]
    monkeypatch.setattr(batching, "sample_next", sample_next_failing_at_037)
    monkeypatch.setattr(batching, "find_stop", find_stop_failing_on_boom)
    bad = [([prompt], SamplingParams(12, 0.37), 2),  # fails when sampling
           ([prompt], SamplingParams(12, 0.0, stop=("BOOM",)), 1),  # fails when its text is decoded
           ([[tok.vocab_size + 5]], SamplingParams(12, 0.0), 1)]  # fails in prefill (no such token)
    together, widest = run_engine(model, tok, bad[:2] + good + bad[2:])
    assert widest == 6, "the requests that fail while decoding should share decode steps with the good"
    assert together[2:4] == alone, "a good request's text changed because a neighbour failed"
    assert all(fin == "length" and err is None for choices in alone for _, fin, err in choices)
    for choices in together[:2] + together[4:]:
        assert all(fin == "error" and err for _, fin, err in choices), choices
    assert "inf" in together[0][0][2] and "UnicodeDecodeError" in together[1][0][2]


def test_a_failing_request_is_a_500_and_its_neighbour_a_200(server, tiny, monkeypatch):
    real_sample = batching.sample_next

    def failing(logits, temperature, *args):
        if temperature == 0.37:
            raise RuntimeError("sampler bug")
        return real_sample(logits, temperature, *args)
    monkeypatch.setattr(batching, "sample_next", failing)

    async def both():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            url = f"{server}/v1/completions"
            good = asyncio.create_task(c.post(url, json={"prompt": "ab", "max_tokens": 40, "temperature": 0}))
            bad = await c.post(url, json={"prompt": "ab", "max_tokens": 40, "temperature": 0.37})
            return await good, bad
    good, bad = asyncio.run(both())
    assert bad.status_code == 500 and "sampler bug" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == greedy(tiny, "ab", 40)


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 0.009])
def test_temperature_below_the_floor_is_greedy(server, tiny, temperature):
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": "ab", "max_tokens": 20, "temperature": temperature})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(tiny, "ab", 20)


# --- 2. the body limit holds while reading -------------------------------------------------------

def test_an_endless_chunked_body_is_refused_after_the_limit(tiny):
    sent = [0]

    async def endless():  # no Content-Length: httpx sends it chunked. 64 MB stands in for endless,
        for _ in range(1024):  # so that a server reading it all fails this test instead of hanging
            sent[0] += CHUNK
            yield b"x" * CHUNK

    async def post(headers):
        async with asgi_client(build_app(*tiny)) as c:
            return await c.post("/v1/completions", content=endless(),
                                headers={"Content-Type": "application/json", **headers})
    r = asyncio.run(post({}))
    assert r.status_code == 413 and "the limit is" in r.json()["error"]["message"]
    assert r.headers["connection"] == "close"
    assert sent[0] <= MAX_BODY_BYTES + CHUNK, f"read {sent[0]:,} bytes past the limit"
    sent[0] = 0  # a declared Content-Length over the limit: refused before reading a byte
    r = asyncio.run(post({"Content-Length": str(200_000_000)}))
    assert r.status_code == 413 and "200,000,000" in r.json()["error"]["message"] and sent[0] == 0


@pytest.mark.parametrize("chunked", [True, False])
def test_oversized_bodies_get_413_over_a_real_socket(server, chunked):
    body = b"x" * (3 * MAX_BODY_BYTES)
    content = (body[i:i + CHUNK] for i in range(0, len(body), CHUNK)) if chunked else body
    r = httpx.post(f"{server}/v1/completions", content=content, timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(f"{server}/v1/completions", headers=AUTH, json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


# --- 5. JSON content types only --------------------------------------------------------------

@pytest.mark.parametrize("content_type,status", [
    ("application/json", 400), ("application/json; charset=utf-8", 400),
    ("Application/JSON;charset=UTF-8", 400), ("application/vnd.api+json", 400),  # past the check:
    # 400 because the body {} has no prompt
    ("text/plain", 415), ("text/plain;charset=UTF-8", 415), ("application/x-www-form-urlencoded", 415),
    ("multipart/form-data; boundary=x", 415), ("application/json; charset=latin-1", 415),
    ("application/jsonx", 415), ("", 415),
])
def test_posts_must_be_declared_json(tiny, content_type, status):
    async def post():
        async with asgi_client(build_app(*tiny)) as c:
            return await c.post("/v1/completions", content=b"{}", headers={"Content-Type": content_type})
    r = asyncio.run(post())
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if status == 415:
        assert r.json()["error"]["code"] == "unsupported_media_type"


# --- 4. the API key --------------------------------------------------------------------------

@pytest.mark.parametrize("header,status", [
    (b"Bearer " + KEY.encode(), 200), (b"bearer " + KEY.encode(), 200), (b"BEARER " + KEY.encode(), 200),
    (b"Bearer  " + KEY.encode(), 200),  # extra spaces before the token are allowed (RFC 9110)
    (b"Bearer " + KEY.encode()[:-1], 401), (b"Bearer " + KEY.encode("utf-16"), 401),
    (b"Basic " + KEY.encode(), 401), (b"Bearer", 401), (KEY.encode(), 401), (None, 401),
])
def test_any_string_is_a_key_and_the_scheme_is_case_insensitive(tiny, header, status):
    async def get():
        async with asgi_client(build_app(*tiny, api_key=KEY)) as c:
            headers = {} if header is None else {"Authorization": header}
            return [await c.get(p, headers=headers) for p in ("/v1/models", "/openapi.json")]
    for r in asyncio.run(get()):
        assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_openapi_is_behind_the_key_and_docs_are_off(tiny):
    async def get(app, path, headers=None):
        async with asgi_client(app) as c:
            return await c.get(path, headers=headers)
    locked, open_ = build_app(*tiny, api_key=KEY), build_app(*tiny)
    assert asyncio.run(get(locked, "/openapi.json")).status_code == 401
    schema = asyncio.run(get(locked, "/openapi.json", AUTH)).json()
    assert "/v1/completions" in schema["paths"] and "/openapi.json" not in schema["paths"]
    assert asyncio.run(get(open_, "/openapi.json")).status_code == 200  # no key set: public
    for app in (locked, open_):
        for path in ("/docs", "/redoc"):
            assert asyncio.run(get(app, path, AUTH)).status_code == 404
    with pytest.raises(ValueError, match="non-empty"):
        build_app(*tiny, api_key="")


# --- 5. CORS ---------------------------------------------------------------------------------

def preflight(origin: str) -> dict:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_answers_allowed_origins_only(server):
    r = httpx.options(f"{server}/v1/completions", headers=preflight(GOOD_ORIGIN))
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(f"{server}/v1/completions", headers=preflight(EVIL_ORIGIN))
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # the actual request: the answer carries the header for the allowed origin only
    for origin, allowed in ((GOOD_ORIGIN, True), (EVIL_ORIGIN, False)):
        r = httpx.post(f"{server}/v1/completions", timeout=30, headers={**AUTH, "Origin": origin},
                       json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        assert r.headers.get("access-control-allow-origin") == (GOOD_ORIGIN if allowed else None)


def test_without_cors_origins_there_are_no_cors_headers(tiny):
    async def go():
        async with asgi_client(build_app(*tiny)) as c:
            return (await c.options("/v1/completions", headers=preflight(GOOD_ORIGIN)),
                    await c.get("/v1/models", headers={"Origin": GOOD_ORIGIN}))
    pre, get = asyncio.run(go())
    assert pre.status_code == 405 and get.status_code == 200
    assert not any(h.startswith("access-control-") for r in (pre, get) for h in r.headers)


@pytest.mark.parametrize("origin", ["http://good.example/", "good.example", "http://a.example/path"])
def test_a_cors_origin_browsers_never_send_is_refused_at_start(tiny, origin):
    with pytest.raises(ValueError, match="scheme://host"):
        build_app(*tiny, cors_origins=[origin])


def test_cli_cors_origin_is_repeatable_and_comma_separated(tiny, tmp_path, monkeypatch):
    import uvicorn
    ckpt = save_model(tmp_path / "tiny", tiny[0], tiny[1])
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    assert main(["serve", str(ckpt), "--cors-origin", "http://a.example",
                 "--cors-origin=http://b.example, http://c.example:8080", "--log-level=critical"]) == 0

    async def allowed(origin):
        async with asgi_client(served["app"]) as c:
            r = await c.options("/v1/completions", headers=preflight(origin))
            return r.headers.get("access-control-allow-origin") == origin
    assert all(asyncio.run(allowed(o)) for o in ("http://a.example", "http://b.example",
                                                   "http://c.example:8080"))
    assert not asyncio.run(allowed(EVIL_ORIGIN))


# --- 6. a hostile mix: well-formed clients see no error ------------------------------------------

def hostile_requests() -> list[tuple[str, dict, set]]:
    """(name, httpx.post keyword arguments, acceptable outcomes). An outcome is a status code, or
    "closed" for an upload cut short by the server (the 413 may then be lost with the connection)."""
    h = {**AUTH, "Content-Type": "application/json"}

    def chunks(n):  # built anew for every send (a generator can be read once); async for AsyncClient
        async def body():
            for _ in range(n):
                yield b"x" * CHUNK
        return body
    return [
        ("tiny-temperature", dict(json={"prompt": "ab", "max_tokens": 8, "temperature": 1e-39}, headers=AUTH), {200}),
        ("subnormal-temperature", dict(json={"prompt": "ab", "max_tokens": 8, "temperature": 5e-324},
                                       headers=AUTH), {200}),
        ("huge-seed", dict(json={"prompt": "ab", "seed": 2**64}, headers=AUTH), {400}),
        ("huge-top-k", dict(json={"prompt": "ab", "top_k": 10**30}, headers=AUTH), {400}),
        ("huge-n", dict(json={"prompt": "ab", "n": 2**70}, headers=AUTH), {400}),
        ("deep-nesting", dict(content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=h), {400}),
        ("garbage", dict(content=bytes(range(256)) * 4, headers=h), {400}),
        ("nan", dict(content=b'{"prompt": "a", "temperature": NaN}', headers=h), {400}),
        ("lone-surrogate", dict(content=b'{"prompt": "\\ud800"}', headers=h), {400}),
        ("text-plain", dict(content=b'{"prompt": "a"}', headers={**AUTH, "Content-Type": "text/plain"}), {415}),
        ("form", dict(data={"prompt": "a"}, headers=AUTH), {415}),
        ("bad-key", dict(json={"prompt": "a"}, headers={"Authorization": "Bearer nope"}), {401}),
        ("no-key", dict(json={"prompt": "a"}), {401}),
        ("too-big", dict(content=b"x" * (2 * MAX_BODY_BYTES), headers=h), {413, "closed"}),
        ("too-big-chunked", dict(content=chunks(40), headers=h), {413, "closed"}),
    ]


def test_hostile_mix_gives_well_formed_clients_no_errors(server, tiny):
    n_clients, per_client = 16, 6
    expected = {i: greedy(tiny, "ab" * (1 + i % 3), 12) for i in range(0, n_clients, 2)}
    failures, hostile_seen = [], []

    async def client(c, i):
        for j in range(per_client):
            body = {"prompt": "ab" * (1 + i % 3), "max_tokens": 12, "temperature": 0 if i % 2 == 0 else 0.8,
                    "seed": i}
            if i % 4 == 3:  # some stream
                async with c.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                if r.status_code != 200 or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
                    failures.append((i, j, r.status_code, lines[-2:]))
                continue
            r = await c.post(f"{server}/v1/completions", json=body)
            if r.status_code != 200:
                failures.append((i, j, r.status_code, r.text[:200]))
            elif i % 2 == 0 and r.json()["choices"][0]["text"] != expected[i]:
                failures.append((i, j, "greedy text changed", r.json()["choices"][0]["text"]))

    async def attacker(stop, first):
        kinds = hostile_requests()
        async with httpx.AsyncClient(timeout=60) as c:
            k = 0
            while not stop.is_set() or k < len(kinds):  # every kind at least once
                name, kwargs, ok = kinds[(first + k) % len(kinds)]
                kwargs = {**kwargs, "content": kwargs["content"]()} if callable(kwargs.get("content")) else kwargs
                try:
                    outcome = (await c.post(f"{server}/v1/completions", **kwargs)).status_code
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                    outcome = "closed"
                hostile_seen.append((name, outcome, outcome in ok))
                k += 1

    async def scenario():
        stop = asyncio.Event()
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            hostile = [asyncio.create_task(attacker(stop, k)) for k in (0, 7)]  # two, out of step
            await asyncio.gather(*[client(c, i) for i in range(n_clients)])
            stop.set()
            await asyncio.gather(*hostile)
    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert failures == [], f"{len(failures)} of {n_clients * per_client} well-formed requests failed"
    unexpected = [(name, outcome) for name, outcome, ok in hostile_seen if not ok]
    assert unexpected == [], unexpected
    assert {name for name, _, _ in hostile_seen} == {k[0] for k in hostile_requests()}
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
