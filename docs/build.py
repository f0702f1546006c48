"""Build the documentation site: the pages in docs/, a reference page per command, and the course.

    python docs/build.py --out site/                          # chapters as stored (no outputs): seconds
    python docs/build.py --out site/ --execute                # run the notebooks first (minutes)
    python docs/build.py --out site/ --executed DIR           # chapters executed by an earlier run (CI)

Open site/index.html; it reads from disk with no network: formulas are MathML written at build time
(docs/_ext/mathml.py), and the theme's files are copied into the site.

Three things are generated at build time, so that none of them can drift from what it describes:
- reference/: one page per `minillm` command, its `--help` text, from the same parsers the command
  line runs (minillm.cli.build_parser);
- course/: the notebooks in notebooks/, rendered by MyST-NB with whatever outputs they carry, and
  notebooks/README.md as the course's front page;
- _bench_results/: the figures and JSON files in bench/results/ that the pages show.

The build never writes into the repository: docs/ is copied into a temporary folder, the generated
pages are added there, and Sphinx runs on the copy. It runs strict (Sphinx's -W): a warning such as
a broken link, a missing page or a formula latex2mathml cannot read fails the build with exit 1.

Executed notebooks come from one run only. In CI that run is the test suite's: .ci/run sets
MINILLM_KEEP_EXECUTED, tests/test_notebooks.py keeps each notebook it executes there
(notebooks/build.py's keep_executed), and this script reads them with --executed, so no notebook
runs twice. Locally, --execute runs them here with notebooks/build.py's execute().

Needs the docs extra: pip install -e ".[docs]" (and ".[notebooks]" for --execute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
BENCH_RESULTS = ROOT / "bench" / "results"
HELP_COLUMNS = "100"  # argparse wraps --help to the terminal's width; the pages get a fixed one


@contextmanager
def _columns(width: str):
    """argparse reads COLUMNS when it formats help: fix it, so the pages do not depend on a terminal."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def commands() -> list[tuple[str, str, str]]:
    """Every `minillm` command as (name, one-line summary, full --help text), in the CLI's own order."""
    import argparse as ap

    from minillm.cli import build_parser

    with _columns(HELP_COLUMNS):
        parser = build_parser()
        # argparse keeps its subcommands in private attributes (_actions, _choices_actions): the only way
        # to reach them, and what argparse's own help formatter reads
        sub = next(a for a in parser._actions if isinstance(a, ap._SubParsersAction))
        summaries = {a.dest: a.help or "" for a in sub._choices_actions}  # the text `minillm --help` lists
        rows = [("minillm", parser.description or "", parser.format_help())]
        rows += [(name, summaries.get(name, ""), p.format_help()) for name, p in sub.choices.items()]
    return rows


def write_cli_reference(folder: Path) -> list[Path]:
    """reference/index.md (the commands, each with its summary) and reference/<command>.md (its --help)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = commands()
    (_, top_summary, top_help), rows = rows[0], rows[1:]
    pages = []
    for name, summary, text in rows:
        page = folder / f"{name}.md"
        page.write_text(
            f"# minillm {name}\n\n{summary}\n\n"
            f"This page is `minillm {name} --help`, generated when the site was built.\n\n"
            f"```text\n{text.rstrip()}\n```\n", encoding="utf-8")
        pages.append(page)
    table = "\n".join(f"| [`minillm {name}`]({name}.md) | {summary} |" for name, summary, _ in rows)
    toctree = "\n".join(name for name, _, _ in rows)
    index = folder / "index.md"
    index.write_text(
        "# Command reference\n\n"
        f"{top_summary}\n\nEach page below is a command's `--help`, generated from the parsers the command "
        "line itself builds (`minillm.cli.build_parser`) when the site was built, so it says what the "
        "installed version does. Options that configure a model or a run are `--key=value`; "
        "`minillm info --help` and `minillm train --help` list them.\n\n"
        f"| command | what it does |\n|---|---|\n{table}\n\n"
        f"```text\n$ minillm --help\n{top_help.rstrip()}\n```\n\n"
        f"```{{toctree}}\n:hidden:\n\n{toctree}\n```\n", encoding="utf-8")
    return [index, *pages]


def copy_course(folder: Path, executed: Path | None = None, execute: bool = False) -> list[Path]:
    """course/: notebooks/README.md and every chapter, executed (from `executed`, or run now) or as stored.

    With `executed`, every chapter must be there: a site that silently mixed executed and empty
    chapters would hide a notebook the run skipped.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(NOTEBOOKS / "README.md", folder / "README.md")  # included by docs/course/index.md
    chapters = sorted(NOTEBOOKS.glob("*.ipynb"))
    if executed is not None:
        missing = [p.name for p in chapters if not (executed / p.name).is_file()]
        if missing:
            raise FileNotFoundError(f"{executed} lacks executed notebooks: {', '.join(missing)}")
    if execute:
        sys.path.insert(0, str(ROOT))  # notebooks/ is a folder of the checkout, not an installed package
        from notebooks import build as course  # needs the notebooks extra
    copied = []
    for path in chapters:
        target = folder / path.name
        if executed is not None:
            shutil.copy(executed / path.name, target)
        elif execute:
            with tempfile.TemporaryDirectory(prefix=f"minillm-{path.stem}-") as workdir:
                start = time.perf_counter()
                course.keep_executed(path, course.execute(path, Path(workdir)), folder)
                print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)
        else:
            shutil.copy(path, target)
        copied.append(target)
    return copied


def prepare_source(src: Path, executed: Path | None = None, execute: bool = False,
                   docs: Path = DOCS) -> Path:
    """A complete Sphinx source folder at `src`: a copy of `docs` plus the generated pages."""
    shutil.copytree(docs, src, ignore=shutil.ignore_patterns("__pycache__", "build.py"), dirs_exist_ok=True)
    write_cli_reference(src / "reference")
    copy_course(src / "course", executed=executed, execute=execute)
    shutil.copytree(BENCH_RESULTS, src / "_bench_results", ignore=shutil.ignore_patterns("*.md"),
                    dirs_exist_ok=True)
    return src


def build(out: Path, executed: Path | None = None, execute: bool = False, docs: Path = DOCS,
          strict: bool = True, quiet: bool = True) -> int:
    """Build the site into `out`; returns Sphinx's exit status (0 built, 1 a warning or error in strict mode)."""
    try:
        from sphinx.cmd.build import build_main
    except ImportError as err:
        raise ImportError(f"{err}. Building the site needs: pip install -e '.[docs]'") from err
    with tempfile.TemporaryDirectory(prefix="minillm-docs-") as tmp:
        src = prepare_source(Path(tmp) / "src", executed=executed, execute=execute, docs=docs)
        args = ["-b", "html", "-d", str(Path(tmp) / "doctrees"), "--jobs", "1"]
        args += ["-W", "--keep-going"] if strict else []  # strict: every warning is an error, all of them listed
        args += ["-q"] if quiet else []
        return build_main([*args, str(src), str(out)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the documentation site (strict: any warning fails).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the HTML site (open OUT/index.html)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--executed", type=Path, metavar="DIR",
                       help="take the chapters from DIR, notebooks executed by an earlier run (CI: the tests')")
    group.add_argument("--execute", action="store_true",
                       help="execute the notebooks now (minutes; needs the notebooks extra)")
    parser.add_argument("--no-strict", action="store_true", help="report warnings without failing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        status = build(args.out, executed=args.executed, execute=args.execute, strict=not args.no_strict)
    except FileNotFoundError as err:
        print(f"docs: {err}", file=sys.stderr)
        return 1
    if status == 0:
        print(f"docs: site built in {time.perf_counter() - start:.0f} s; open {args.out / 'index.html'}")
    else:
        print("docs: the build failed: the warnings above say where (.../src/ is the build's copy of docs/)",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
