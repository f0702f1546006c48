"""The decoding code's shape: functions that fit on a page, and one decode core.

Checked on the source with `ast` (nothing is imported or run), as tests/test_serve_layout.py does
for the server:
  - every function in minillm/generate/ and minillm/serve/ is at most 80 lines (a page), methods
    and nested functions included;
  - only the decode core (minillm/generate/core.py) runs a model through a cache: no other module
    of generate/ passes `cache=` to a call. Every loop that produces tokens (sampling, batching,
    beam search, speculative decoding) goes through `prefill` / `decode_step` / `extend`, so a fast
    path or a new cache has one place to go.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "minillm"
GENERATE, SERVE = ROOT / "generate", ROOT / "serve"
MAX_FUNCTION_LINES = 80


def functions(path: Path):
    """(name, number of lines, node) of every function in `path`, nested ones and methods included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # from the first decorator
            yield node.name, node.end_lineno - first + 1, node


def calls_with_cache(path: Path) -> list[str]:
    """'file:line' of every call in `path` that passes a `cache=` keyword argument."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and any(kw.arg == "cache" for kw in node.keywords)]


def test_the_walk_finds_the_decoding_modules_and_their_functions():
    found = {p.name: [name for name, _, _ in functions(p)] for p in GENERATE.glob("*.py")}
    assert {"core.py", "sampling.py", "beam.py", "batching.py"} <= found.keys()
    assert {"prefill", "decode_step"} <= set(found["core.py"])
    assert {"beam_search", "greedy_search", "logprobs"} <= set(found["beam.py"])  # methods count too


def test_every_generate_and_serve_function_is_at_most_80_lines():
    long = [f"{p.parent.name}/{p.name}:{node.lineno} {name} ({n} lines)"
            for folder in (GENERATE, SERVE) for p in sorted(folder.glob("*.py"))
            for name, n, node in functions(p) if n > MAX_FUNCTION_LINES]
    assert long == []


def test_the_line_count_counts_decorators_and_the_whole_body(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("@dec\ndef f(x):\n    y = x\n\n    return y\n\nclass A:\n    def g(self):\n        pass\n")
    assert {name: n for name, n, _ in functions(src)} == {"f": 5, "g": 2}


def test_only_the_decode_core_runs_a_model_through_a_cache():
    assert calls_with_cache(GENERATE / "core.py") != []  # the walk does see the core's own calls
    others = [hit for p in sorted(GENERATE.glob("*.py")) if p.name != "core.py" for hit in calls_with_cache(p)]
    assert others == [], f"call prefill/decode_step/extend (generate/core.py) instead: {others}"
