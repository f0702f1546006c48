"""Build the course as a static HTML site: execute every notebook, render it, write an index page.

The notebooks are stored without outputs (notebooks/README.md); this is where their outputs are made.
Each notebook runs top to bottom in a fresh kernel, in a temporary working directory, and nbconvert's
HTML exporter renders the result with its figures embedded as base64 PNGs. The site is rebuilt from a
fresh execution every time, so nothing it shows can be older than the code it was built from.

    python notebooks/build.py --out site/                               # every notebook, in name order
    python notebooks/build.py --out site/ notebooks/01_attention.ipynb  # only some
    python notebooks/build.py --out site/ --keep build/executed         # and keep them for docs/build.py

Open site/index.html. The documentation site (docs/build.py) renders the same chapters beside the
guides, with math as MathML that needs no network; these standalone pages load MathJax from a CDN.
A cell that raises stops the build with one line naming the notebook and the
cell (exit status 1). tests/test_notebooks.py uses the same execute() and render(), so CI executes each
notebook once and both checks and renders it; with MINILLM_KEEP_EXECUTED set it also keeps each executed
notebook (keep_executed), which docs/build.py --executed turns into the site's course pages.

The kernel is the interpreter running this file: we ask jupyter_client for ipykernel's own "python3"
spec, which launches `sys.executable -m ipykernel_launcher`, so no `python -m ipykernel install` is
needed and a stale `python3` kernelspec in ~/.local/share/jupyter cannot hijack the run.

Needs a source checkout and the notebooks extra: pip install -e ".[notebooks]".
"""

from __future__ import annotations

import argparse
import datetime
import html
import os
import re
import sys
import tempfile
import time
from pathlib import Path

try:
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbconvert import HTMLExporter
    from nbconvert.filters import markdown2html
except ImportError as err:
    raise ImportError(f"{err}. Building the course needs: pip install -e '.[notebooks]'") from err

NOTEBOOK_DIR = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 300  # one cell; the notebooks aim for 30-60 s in total on a 2-core CPU


class NotebookError(RuntimeError):
    """A notebook cell failed: the message is one line naming the notebook and the cell."""


def notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course, in file-name order (the number prefix is the reading order)."""
    return sorted(folder.glob("*.ipynb"))


def kernel_manager() -> KernelManager:
    """A manager for ipykernel's built-in spec, i.e. this very interpreter (see the docstring)."""
    specs = KernelSpecManager(kernel_dirs=[])  # no search path: only the native spec is left
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    return km


def execute(path: Path, workdir: Path) -> nbformat.NotebookNode:
    """Run the notebook at `path` top to bottom in a fresh kernel whose working directory is `workdir`.

    Returns the notebook with its outputs; raises NotebookError on a cell error, a timeout or a dead kernel.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager(), timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    current = {"index": None}  # which cell is running, for the error message

    def on_cell_execute(cell, cell_index):
        current["index"] = cell_index

    client.on_cell_execute = on_cell_execute
    # One BLAS/OpenMP thread: the notebooks use tiny shapes, where a second thread gains little, and
    # on a shared CI box two spinning threads per process can make a cell 10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        # cleanup_kc: shut the kernel down afterwards (given our own km, nbclient would leave it running)
        client.execute(env=env, cleanup_kc=True)
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError,
            nbclient.exceptions.DeadKernelError) as err:
        i = current["index"]
        if isinstance(err, nbclient.exceptions.CellExecutionError):
            what = f"{err.ename}: {err.evalue}"
        elif isinstance(err, nbclient.exceptions.CellTimeoutError):
            what = f"timed out after {CELL_TIMEOUT_S} s"
        else:
            what = "the kernel died (out of memory?)"
        if i is None:
            where = "before the first cell"
        else:  # cells counted from 1, markdown included, as they appear; then the cell's first line
            source = nb.cells[i].source.strip().splitlines() or [""]
            where = f"cell {i + 1} of {len(nb.cells)} ({source[0][:60]!r})"
        message = f"{path.name}, {where}: {what}"
        raise NotebookError(" ".join(message.split())) from err  # one line, whatever the error said
    return nb


KEEP_ENV = "MINILLM_KEEP_EXECUTED"  # a folder: where the test suite keeps each notebook it executes


def keep_executed(path: Path, nb: nbformat.NotebookNode, folder: Path | None = None) -> Path | None:
    """Save the executed notebook (outputs included) as folder/<name>.ipynb, for the documentation site.

    `folder` defaults to $MINILLM_KEEP_EXECUTED; with neither, nothing is written (returns None). This
    is how CI runs each notebook once: tests/test_notebooks.py executes it and keeps it here, and
    docs/build.py --executed renders what was kept, figures and all.
    """
    folder = folder or (Path(os.environ[KEEP_ENV]) if os.environ.get(KEEP_ENV) else None)
    if folder is None:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(path).name
    nbformat.write(nb, target)
    return target


def title_and_goals(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The first cell's "# title" and its "you will be able to" list (markdown), by the course contract."""
    lines = nb.cells[0].source.splitlines()
    title = next((line.lstrip("#").strip() for line in lines if line.startswith("# ")), "untitled")
    start = next((i for i, line in enumerate(lines) if "you will be able to" in line.lower()), None)
    goals = []
    if start is not None:
        for line in lines[start + 1:]:
            if line.strip() and not line.startswith(("-", " ", "\t")):
                break  # the list ended; the prose after it is not a goal
            goals.append(line)
    return title, "\n".join(goals).strip()


def render(nb: nbformat.NotebookNode) -> str:
    """One executed notebook as a standalone HTML page (JupyterLab's look, figures inline as base64)."""
    title, _ = title_and_goals(nb)
    exporter = HTMLExporter(template_name="lab", embed_images=True)  # embed_images: markdown images too
    page, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    # Links between chapters point at .ipynb files; on the site they are the rendered pages.
    page = re.sub(r'href="([\w.-]+)\.ipynb(#[^"]*)?"', lambda m: f'href="{m[1]}.html{m[2] or ""}"', page)
    nav = '<nav style="padding:0.5em 1em;font-family:sans-serif"><a href="index.html">&larr; the course</a></nav>'
    return re.sub(r"(<body[^>]*>)", lambda m: m[1] + nav, page, count=1)


def index_page(chapters: list[tuple[Path, nbformat.NotebookNode, float]]) -> str:
    """The site's front page: each chapter in order, with its title, goals and execution time."""
    items = []
    for path, nb, seconds in chapters:
        title, goals = title_and_goals(nb)
        items.append(f'<li><h2><a href="{path.stem}.html">{html.escape(title)}</a></h2>\n'
                     f'<p class="meta">{path.name} &middot; executed in {seconds:.0f} s</p>\n'
                     f"<p>After it you will be able to:</p>\n{markdown2html(goals)}</li>")
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>The minillm course</title>
<script src="{HTMLExporter().mathjax_url}"></script>
<script type="text/x-mathjax-config">MathJax.Hub.Config({{tex2jax: {{inlineMath: [['$','$']]}}}});</script>
<style>body{{max-width:50em;margin:2em auto;padding:0 1em;font-family:sans-serif;line-height:1.5}}
ol{{padding-left:1.2em}} h2{{margin-bottom:0.1em}} .meta{{color:#666;margin-top:0}}</style></head>
<body><h1>The minillm course</h1>
<p>Every notebook below was executed from a clean kernel on {built} ({sys.platform}, Python
{sys.version.split()[0]}); the outputs and figures are that run's. Read them in order.</p>
<ol>
{chr(10).join(items)}
</ol></body></html>
"""


def build(paths: list[Path], out: Path, keep: Path | None = None) -> list[Path]:
    """Execute and render each notebook into `out`, then write out/index.html; returns the pages.

    With `keep`, each executed notebook is also saved there (keep_executed), for docs/build.py --executed.
    """
    out.mkdir(parents=True, exist_ok=True)
    chapters, pages = [], []
    for path in paths:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"minillm-{path.stem}-") as workdir:
            nb = execute(path, Path(workdir))
        keep_executed(path, nb, keep)
        seconds = time.perf_counter() - start
        page = out / f"{path.stem}.html"
        page.write_text(render(nb), encoding="utf-8")
        print(f"{path.name}: {seconds:.1f} s -> {page}", flush=True)
        chapters.append((path, nb, seconds))
        pages.append(page)
    index = out / "index.html"
    index.write_text(index_page(chapters), encoding="utf-8")
    return [index, *pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course notebooks and write a static HTML site.")
    parser.add_argument("--out", type=Path, required=True, help="folder for index.html and one page per notebook")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help=f"notebooks to build (default: all of {NOTEBOOK_DIR})")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="also save the executed notebooks in DIR (then: python docs/build.py --executed DIR)")
    args = parser.parse_args(argv)
    paths = sorted(args.notebooks, key=lambda p: p.name) if args.notebooks else notebooks()
    if not paths:
        print(f"build: no notebooks in {NOTEBOOK_DIR}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        pages = build(paths, args.out, keep=args.keep)
    except NotebookError as err:
        print(f"build failed: {err}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in pages) / 1e6
    print(f"{len(pages) - 1} notebooks in {time.perf_counter() - start:.0f} s; "
          f"{size:.1f} MB in {args.out} (open {pages[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
