"""Several models, version switches under load, rollback, chat (with the openai client), access logs."""

import asyncio
import json
import logging
import string
import threading

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from minillm.weights.checkpoint import load_model, save_model  # noqa: E402
from minillm.data.tokenizer import CharTokenizer  # noqa: E402
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.model.transformer import CausalLM  # noqa: E402
from minillm.serve.api import build_app  # noqa: E402
from minillm.serve.chat import chat_prompt  # noqa: E402
from minillm.serve.registry import Registry  # noqa: E402

from tests.test_serve import free_port, wait_until  # noqa: E402

ADMIN = "adm1n"
TOK = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,:;!?'-#\n")


def checkpoint(folder, seed, step, instruct=None):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16,
                      tie_weights=False, init_std=0.3)
    meta = {"step": step, **({"instruct": instruct} if instruct else {})}
    return save_model(folder, CausalLM(cfg), TOK, **meta)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    return {"a1": checkpoint(root / "a1", 0, 100), "a2": checkpoint(root / "a2", 1, 200),
            "b": checkpoint(root / "b", 2, 300, instruct={"template": "plain", "end": "\n###"})}


@pytest.fixture
def server(ckpts):
    """Two models, "alpha" (version a1) and "beta" (instruction-tuned), in a uvicorn thread."""
    registry = Registry(lambda folder: load_model(folder), max_batch_size=8, max_queue=64)
    for name, key in (("alpha", "a1"), ("beta", "b")):
        registry.add(registry.make_version(name, *load_model(ckpts[key]), path=str(ckpts[key]), start=False))
    app = build_app(registry, admin_key=ADMIN)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="the threaded server to start")
    yield f"http://127.0.0.1:{port}", registry
    srv.should_exit = True
    thread.join(timeout=30)


def admin(base, path, body=None, key=ADMIN):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None and not path.endswith("rollback"):
        return httpx.get(f"{base}{path}", headers=headers, timeout=60)
    return httpx.post(f"{base}{path}", json=body or {}, headers=headers, timeout=60)


def test_models_lists_every_model_with_its_version_and_requests_pick_one(server, ckpts):
    base, _ = server
    data = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
    assert set(data) == {"alpha", "beta"}
    assert data["alpha"]["step"] == 100 and data["alpha"]["version"].startswith("step-100-")
    assert len(data["alpha"]["sha256"]) == 64 and data["alpha"]["created"] > 0
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "model": "beta"}).json()
    assert r["model"] == "beta" and r["system_fingerprint"] == data["beta"]["version"]
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
    assert r["model"] == "alpha"  # no model: the first one
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "model": "gamma"})
    assert r.status_code == 404 and "'alpha', 'beta'" in r.json()["error"]["message"]


def test_switch_under_16_concurrent_clients_fails_no_request_and_rollback_restores(server, ckpts):
    base, registry = server
    old = httpx.get(f"{base}/v1/models").json()["data"][0]["version"]
    seen, failures, stop = [], [], asyncio.Event()

    async def client(c, i):
        while not stop.is_set():
            stream = i % 2 == 0
            body = {"prompt": "ab", "max_tokens": 8, "temperature": 0, "model": "alpha", "stream": stream}
            try:
                if stream:
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        text = "".join([line async for line in r.aiter_lines()])
                        ok = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                        fp = json.loads(text.split("data: ")[1])["system_fingerprint"] if ok else None
                else:
                    r = await c.post("/v1/completions", json=body)
                    ok, fp = r.status_code == 200, r.json().get("system_fingerprint")
            except httpx.HTTPError as e:
                ok, fp = False, repr(e)
            (seen if ok else failures).append(fp)

    async def scenario():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            tasks = [asyncio.create_task(client(c, i)) for i in range(16)]
            await asyncio.sleep(0.5)
            r = await asyncio.to_thread(admin, base, "/admin/models/alpha", {"path": str(ckpts["a2"])})
            assert r.status_code == 200, r.text
            new = r.json()["current"]["version"]
            await asyncio.sleep(0.5)
            r = await asyncio.to_thread(admin, base, "/admin/models/alpha/rollback")
            assert r.status_code == 200 and r.json()["current"]["version"] == old
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
            return new

    new = asyncio.run(scenario())
    assert failures == []
    assert old in seen and new in seen and new != old  # both versions answered, none failed
    assert seen[-1] == old  # after the rollback, the old version serves again
    info = admin(base, "/admin/models/alpha").json()
    assert info["current"]["version"] == old and info["previous"]["version"] == new
    metrics = httpx.get(f"{base}/metrics").text
    assert f'minillm_model_current{{model="alpha",version="{old}"}} 1' in metrics
    assert f'minillm_model_current{{model="alpha",version="{new}"}} 0' in metrics
    assert f'minillm_model_requests_total{{model="alpha",version="{new}",code="200"}}' in metrics


def test_a_corrupt_checkpoint_is_refused_and_the_old_version_keeps_serving(server, ckpts, tmp_path):
    base, _ = server
    before = admin(base, "/admin/models/alpha").json()["current"]
    bad = checkpoint(tmp_path / "bad", 5, 400)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    r = admin(base, "/admin/models/alpha", {"path": str(bad)})
    assert r.status_code == 422 and "keeps serving" in r.json()["error"]["message"]
    r = admin(base, "/admin/models/alpha", {"path": str(tmp_path / "missing")})
    assert r.status_code == 422
    assert admin(base, "/admin/models/alpha").json()["current"] == before
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_admin_needs_its_key_and_is_off_without_one(server, ckpts):
    base, _ = server
    assert admin(base, "/admin/models/alpha", {"path": str(ckpts["a2"])}, key="wrong").status_code == 401
    assert admin(base, "/admin/models/alpha", key=None).status_code == 401
    assert admin(base, "/admin/models/nope").status_code == 404
    assert admin(base, "/admin/models/alpha/rollback").status_code == 409  # nothing to roll back to yet
    model, tok, _ = load_model(ckpts["a1"])

    async def off():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(model, tok)),
                                     base_url="http://t") as c:
            return await c.post("/admin/models/minillm", json={"path": "x"})
    r = asyncio.run(off())
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]


def test_chat_templates():
    prompt, stops = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None)
    assert prompt == "System: Be brief.\n\nUser: Hi\nAssistant:" and stops == ["\nUser:"]
    prompt, stops = chat_prompt([{"role": "user", "content": "Reverse tiger"}], {"template": "plain", "end": "\n###"})
    assert prompt == "### Instruction:\nReverse tiger\n### Response:\n" and stops == ["\n###"]
    with pytest.raises(ValueError, match="role is 'robot'"):
        chat_prompt([{"role": "robot", "content": "x"}], None)
    with pytest.raises(ValueError, match="last message"):
        chat_prompt([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], None)


def test_chat_with_the_openai_client_plain_and_streaming(server):
    openai = pytest.importorskip("openai")
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    text = r.choices[0].message.content
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text  # same greedy answer
    r = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "x"}])


def test_access_log_is_one_json_line_per_request(server, caplog):
    base, _ = server
    with caplog.at_level(logging.INFO, logger="minillm.access"):
        logging.getLogger("minillm.access").propagate = True  # (caplog listens on the root logger)
        httpx.post(f"{base}/v1/chat/completions", json={"model": "beta", "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "model": "nope"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "minillm.access"]
    ok = next(x for x in lines if x["path"] == "/v1/chat/completions")
    assert ok["status"] == 200 and ok["model"] == "beta" and ok["version"].startswith("step-300-")
    assert ok["request_id"].startswith("chatcmpl-") and ok["prompt_tokens"] > 0 and ok["completion_tokens"] >= 1
    assert ok["latency_ms"] > 0 and ok["stream"] is False
    assert any(x["status"] == 404 and x["path"] == "/v1/completions" for x in lines)


def test_the_grafana_dashboard_charts_metrics_that_exist(server):
    import re
    from pathlib import Path

    base, _ = server
    httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    exposed = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{base}/metrics").text.splitlines()
               if line and not line.startswith("#")}
    dash = json.loads((Path(__file__).parent.parent / "sky" / "grafana-dashboard.json").read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"minillm_\w+", t["expr"])}
    assert used and used <= exposed, used - exposed


def test_the_engine_names_what_it_cannot_serve():
    from minillm.generate.batching import BatchEngine
    from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig
    from minillm.model.transformer import MaskedLM

    with pytest.raises(ValueError, match="minillm translate"):
        BatchEngine(Seq2Seq(Seq2SeqConfig(ModelConfig(vocab_size=20, n_embd=16, n_head=2), n_enc_layer=1,
                                          n_dec_layer=1)), TOK)
    with pytest.raises(ValueError, match="a MaskedLM"):
        BatchEngine(MaskedLM(ModelConfig(vocab_size=20, n_embd=16, n_head=2, n_layer=1, causal=False)), TOK)
