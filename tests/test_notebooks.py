"""Execute every course notebook (notebooks/*.ipynb) top to bottom, one test per notebook.

The notebooks are stored without outputs; this test is what keeps them from rotting: each one runs
in a fresh kernel, in a temporary working directory (a notebook must never write into the
repository), with a per-cell timeout. A cell that raises — including a failed exercise check —
fails the test and the error names the cell.

The kernel is the interpreter running pytest: we ask jupyter_client for ipykernel's own "python3"
spec, which launches `sys.executable -m ipykernel_launcher`. No `python -m ipykernel install` is
needed, and a stale `python3` kernelspec in ~/.local/share/jupyter cannot hijack the run.

    pytest tests/test_notebooks.py -q                 # all of them
    pytest tests/test_notebooks.py -k attention -q    # one
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need: pip install 'minillm[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need: pip install 'minillm[notebooks]'")
pytest.importorskip("ipykernel", reason="notebook tests need: pip install 'minillm[notebooks]'")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the importorskips)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # one cell; the notebooks aim for 30-60 s in total on a 2-core CPU


def _kernel_manager() -> KernelManager:
    """A manager for ipykernel's built-in spec, i.e. this very interpreter (see the docstring)."""
    specs = KernelSpecManager(kernel_dirs=[])  # no search path: only the native spec is left
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    return km


def test_kernel_is_this_interpreter():
    km = _kernel_manager()
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
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    # One BLAS/OpenMP thread: the notebooks use tiny shapes, where a second thread gains little, and
    # on a shared CI box two spinning threads per process can make a cell 10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError naming the cell and the traceback
    elapsed = time.perf_counter() - start
    # a figure in every notebook: plots are the point of the course
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} produced no figure"
    print(f"{path.name}: {elapsed:.1f} s, {len(images)} figures")
