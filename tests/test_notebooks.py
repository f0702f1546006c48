"""Execute every course notebook (notebooks/*.ipynb) top to bottom and render it, one test per notebook.

The notebooks are stored without outputs; this test is what keeps them from rotting: each one runs
in a fresh kernel, in a temporary working directory (a notebook must never write into the
repository), with a per-cell timeout. A cell that raises — including a failed exercise check —
fails the test with one line naming the notebook and the cell.

Execution and rendering are notebooks/build.py's execute() and render(), the functions that build the
course site: CI runs each notebook once, and that one run both checks it and renders its HTML page.
The kernel is the interpreter running pytest (ipykernel's built-in spec; see build.py).

    pytest tests/test_notebooks.py -q                 # all of them
    pytest tests/test_notebooks.py -k attention -q    # one
"""

from __future__ import annotations

import html
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need: pip install 'minillm[notebooks]'")
pytest.importorskip("nbclient", reason="notebook tests need: pip install 'minillm[notebooks]'")
pytest.importorskip("nbconvert", reason="notebook tests need: pip install 'minillm[notebooks]'")
pytest.importorskip("ipykernel", reason="notebook tests need: pip install 'minillm[notebooks]'")

from notebooks import build  # noqa: E402  (after the importorskips; the repository root is on sys.path)

NOTEBOOK_DIR = build.NOTEBOOK_DIR
NOTEBOOKS = build.notebooks()


def test_kernel_is_this_interpreter():
    km = build.kernel_manager()
    assert km.kernel_spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path):
    """Stored without outputs (notebooks/README.md): diffs stay readable, CI makes the figures."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"
    # the course contract: what you will learn first, then one parameter cell with the sizes
    assert nb.cells[0].cell_type == "markdown" and "you will be able to" in nb.cells[0].source.lower()
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    start = time.perf_counter()
    nb = build.execute(path, tmp_path)  # raises NotebookError naming the notebook and the cell
    build.keep_executed(path, nb)  # where .ci/run sets MINILLM_KEEP_EXECUTED: the docs site renders this run
    elapsed = time.perf_counter() - start
    # a figure in every notebook: plots are the point of the course
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} produced no figure"
    # the same run, rendered as the site renders it: the page has the title and its figures inline
    page = build.render(nb)
    title, goals = build.title_and_goals(nb)
    assert f"<title>{html.escape(title, quote=False)}</title>" in page
    assert goals, f"{path.name}: no goals found under 'you will be able to'"
    assert page.count("data:image/png;base64,") >= len(images)
    print(f"{path.name}: {elapsed:.1f} s, {len(images)} figures, {len(page) / 1e6:.1f} MB of HTML")


def test_index_lists_chapters_in_order():
    """The site's front page: every notebook's title, linked to its page, in file-name order."""
    chapters = [(p, nbformat.read(p, as_version=4), 1.0) for p in NOTEBOOKS]
    page = build.index_page(chapters)
    positions = []
    for path, nb, _ in chapters:
        title, _ = build.title_and_goals(nb)
        link = f'<a href="{path.stem}.html">{html.escape(title)}</a>'
        assert link in page, f"index lacks {link}"
        positions.append(page.index(link))
    assert positions == sorted(positions)


def _broken_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Broken\n\n**After this notebook you will be able to:**\n- fail"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("assert x == 2, 'x should be 2\\nand this is a second line'"),
        nbformat.v4.new_code_cell("print('never runs')"),
    ])
    path = folder / "99_broken.ipynb"
    nbformat.write(nb, path)
    return path


def test_build_fails_on_a_cell_error_with_one_line(tmp_path, capsys):
    path = _broken_notebook(tmp_path)
    status = build.main(["--out", str(tmp_path / "site"), str(path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1, err  # one line
    assert "99_broken.ipynb" in err and "cell 3 of 4" in err and "AssertionError: x should be 2" in err
    assert not (tmp_path / "site" / "index.html").exists()  # no site from a failed build
