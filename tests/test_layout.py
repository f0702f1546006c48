"""The package's shape: folders by pipeline stage, a thin command line, no reach into the checkout.

These are the layout's promises, checked on the source so that a later change cannot quietly break
them: only minillm/cli/ parses arguments, nothing in minillm/ imports bench/ (which needs a source
checkout), each stage's __init__ says what it holds, and kernels/ has no import cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("model", "weights", "data", "train", "finetune", "compress", "evaluate", "generate", "serve", "cli")


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (relative imports as '.name')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def library_modules():
    return sorted(p for p in (ROOT / "minillm").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts[1:2])


def test_only_the_cli_parses_arguments():
    offenders = [str(p.relative_to(ROOT)) for p in library_modules() if "argparse" in imports_of(p)]
    assert offenders == []
    assert any("argparse" in imports_of(p) for p in (ROOT / "minillm" / "cli").glob("*.py"))


def test_the_library_never_imports_the_checkouts_tooling():
    for p in (ROOT / "minillm").rglob("*.py"):
        assert not any(n == "bench" or n.startswith("bench.") for n in imports_of(p)), p


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_folder_whose_init_says_what_it_holds(stage):
    init = ROOT / "minillm" / stage / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()) >= 3, f"{init}: say what the folder holds and the reading order"
    for module in (ROOT / "minillm" / stage).glob("*.py"):  # every module of the stage is named there
        if module.stem not in ("__init__", "__main__") and stage != "cli":
            assert f"{module.stem}.py" in doc, f"{init}'s docstring does not mention {module.name}"


def test_kernels_have_no_import_cycle():
    graph = {p.stem: {n.lstrip(".") for n in imports_of(p) if n.startswith(".") and n.strip(".")}
             for p in (ROOT / "kernels").glob("*.py")}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]
