"""The package's shape: folders by pipeline stage, a thin command line, no reach into the checkout.

These are the layout's promises, checked on the source so that a later change cannot quietly break
them: only minillm/cli/ parses arguments, nothing in minillm/ imports bench/ (which needs a source
checkout), each stage's __init__ says what it holds, and no import cycle, neither inside kernels/
nor in the package as a whole (minillm/ and kernels/ together, lazy imports included).
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


def module_name(path: Path) -> str:
    """minillm/data/corpora.py -> "minillm.data.corpora"; kernels/common.py -> "minillm.kernels.common"
    (pyproject.toml installs the top-level kernels/ folder as minillm.kernels)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "minillm")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the minillm modules it imports}, from the source, every import statement counted.

    - Imports inside functions count like top-level ones: a lazy import only postpones a cycle to
      run time (and hides it from the reader), it does not remove it from the design.
    - `from a.b import c` points at the module a.b.c when c is one, else at a.b (the name comes from
      a.b's __init__); `import a.b.c` and `from a.b.c import x` point at a.b.c only. Python also runs
      a.b's __init__ first, but that implicit step is not counted: otherwise every module of a
      package whose __init__ re-exports it would sit in a trivial cycle with its own package.
    - A package's __init__ re-exporting its modules *is* counted (package -> module). So a module
      that explicitly imports a name from its own package, or from a package that re-exports
      something which imports it back, closes a cycle and is reported: such an import runs while
      that package is half initialised, and it should import the module that defines the name.
    """
    files = [*(ROOT / "minillm").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    modules = {module_name(p): p for p in files}

    def resolve(name: str) -> str | None:  # the longest prefix of `name` that is one of our modules
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: level 1 is this package, 2 its parent, ...
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.update(resolve(f"{base}.{a.name}") for a in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None: depth-first search, a back edge closes a cycle."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_the_import_graph_sees_lazy_relative_and_submodule_imports():
    graph = import_graph()
    assert "minillm.kernels.common" in graph["minillm.kernels.attention"]  # from .common import ...
    assert "minillm.kernels.attention" in graph["minillm.model.attention"]  # imported inside a function
    assert "minillm.data.corpora" in graph["minillm.data"]  # a package re-exports its modules
    assert "minillm.data" not in graph["minillm.data.dataset"]  # ... and is not implied by them


def test_the_package_has_no_import_cycle():
    """minillm/ and kernels/ as one graph, lazy imports included: no module reaches itself."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
