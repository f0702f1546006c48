"""The server's shape: named handlers, and an app factory that only wires them.

Checked on the source with `ast`, so no extra needs to be installed: every function in
minillm/serve/ fits on a page (≤ 80 lines), build_app stays a short list of wiring (≤ 60 lines)
with no handler defined inside it, and every route it wires is a module-level function of serve/.
With FastAPI installed, the built app is checked too, and request phases are called one by one,
without HTTP: what named functions are for.
"""

import ast
import string
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parent.parent / "minillm" / "serve"
MAX_FUNCTION_LINES, MAX_BUILD_APP_LINES = 80, 60


def functions(path: Path):
    """(name, number of lines, node) of every function in `path`, nested ones and methods included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # from the first decorator, if any, to the last line of the body
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.end_lineno - first + 1, node


def build_app_node() -> ast.FunctionDef:
    return next(node for name, _, node in functions(SERVE / "api.py") if name == "build_app")


def test_the_walk_finds_the_server_modules_and_their_functions():
    found = {p.name: [name for name, _, _ in functions(p)] for p in SERVE.glob("*.py")}
    assert {"api.py", "handlers.py", "admin.py"} <= found.keys()
    assert "build_app" in found["api.py"] and "completions" in found["handlers.py"]


def test_every_serve_function_is_at_most_80_lines():
    long = [f"{p.name}:{node.lineno} {name} ({n} lines)" for p in sorted(SERVE.glob("*.py"))
            for name, n, node in functions(p) if n > MAX_FUNCTION_LINES]
    assert long == []


def test_build_app_is_at_most_60_lines_and_defines_no_handler():
    n, node = next((n, node) for name, n, node in functions(SERVE / "api.py") if name == "build_app")
    assert n <= MAX_BUILD_APP_LINES, f"build_app is {n} lines"
    nested = [d.name for d in ast.walk(node) if d is not node
              and isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))]
    assert nested == [], f"build_app defines {nested}: handlers belong at module level"


def test_every_route_build_app_wires_is_a_module_level_function_of_serve():
    """Each `route(path, module.function, ...)` / `add_api_route(...)` names a function that exists at
    the top level of minillm/serve/MODULE.py (so it can be imported, read and tested on its own)."""
    top = {p.stem: {n.name for n in ast.parse(p.read_text(encoding="utf-8")).body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
           for p in SERVE.glob("*.py")}
    wired = []
    for call in ast.walk(build_app_node()):
        if isinstance(call, ast.Call) and len(call.args) >= 2 and isinstance(call.args[0], ast.Constant) \
                and str(call.args[0].value).startswith("/"):
            handler = call.args[1]
            assert isinstance(handler, ast.Attribute) and isinstance(handler.value, ast.Name), \
                f"{call.args[0].value}: wire a named function as module.function"
            assert handler.attr in top.get(handler.value.id, ()), f"{handler.value.id}.{handler.attr}"
            wired.append(call.args[0].value)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(wired)


# --- with the serve extra: the app as built, and phases called on their own ---------------------------

@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("fastapi")
    import torch

    from minillm.data.tokenizer import CharTokenizer
    from minillm.model.config import ModelConfig
    from minillm.model.transformer import CausalLM

    torch.manual_seed(0)
    tok = CharTokenizer.from_text(string.ascii_letters + " .\n")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    return CausalLM(cfg).eval(), tok


def test_the_built_app_routes_to_module_level_handlers_and_keeps_its_state_on_app_state(tiny):
    from fastapi.routing import APIRoute

    from minillm.serve.api import build_app

    app = build_app(*tiny, model_name="tiny", api_key="k", admin_key="a")
    endpoints = [r.endpoint for r in app.routes if isinstance(r, APIRoute)]
    assert len(endpoints) == 9
    for f in endpoints:
        assert f.__module__ in ("minillm.serve.handlers", "minillm.serve.admin"), f
        assert "<locals>" not in f.__qualname__, f.__qualname__
    assert app.state.registry.names() == ["tiny"] and app.state.default_model == "tiny"
    assert (app.state.api_key, app.state.admin_key) == (b"k", b"a")
    assert build_app(*tiny).state.admin_key is None  # no admin key: the admin API is off


def test_fit_crops_the_prompt_to_the_context_and_makes_tiny_temperatures_greedy(tiny):
    from minillm.serve.handlers import fit, prepare_completion
    from minillm.serve.protocol import APIError, CompletionRequest
    from minillm.serve.registry import Registry

    model, tok = tiny
    registry = Registry(None)
    v = registry.make_version("tiny", model, tok, start=False)
    prompt = "abcdefghijklmnopqrstuvwxyz" * 2  # 52 characters, block_size 32
    req = CompletionRequest(prompt=prompt, max_tokens=10, temperature=0.001, stop="x")
    (ids,), params = prepare_completion(v, req, max_batch_size=4)
    assert ids == tok.encode(prompt)[-(32 - 10):]  # the most recent 22 tokens: 22 + 10 fit the cache
    assert (params.max_tokens, params.temperature, params.stop) == (10, 0.0, ("x",))
    with pytest.raises(APIError, match="max_batch_size=4") as e:  # 2 prompts × n=3 rows > 4
        fit(v, CompletionRequest(prompt="ab", n=3), ["ab", "cd"], 4, [], max_batch_size=4)
    assert (e.value.status, e.value.param) == (400, "n")
    with pytest.raises(APIError, match="at most 31") as e:  # at least one prompt token must fit
        fit(v, req, ["ab"], 32, [], max_batch_size=4)
    assert (e.value.status, e.value.param) == (400, "max_tokens")
