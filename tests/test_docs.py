"""The documentation site (docs/build.py): a strict build has every page, math as MathML, no network.

One strict build of the real site into a temporary folder (module-scoped: ~30 s on a 2-core CPU),
with the course chapters taken from an "executed" folder as CI takes them, one chapter carrying
outputs (a figure and printed text), so the pages CI publishes are the pages checked here. Then a
copy of docs/ with one broken link added must fail the strict build: otherwise the strict check
could pass silently whatever the pages say.

    pytest tests/test_docs.py -q
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs site needs: pip install -e '.[docs]'")
pytest.importorskip("myst_nb", reason="the docs site needs: pip install -e '.[docs]'")
pytest.importorskip("latex2mathml", reason="the docs site needs: pip install -e '.[docs]'")
nbformat = pytest.importorskip("nbformat", reason="the docs site needs: pip install -e '.[notebooks]'")

from docs import build as docs_build  # noqa: E402  (the repository root is on sys.path, as for notebooks/)

# myst-parser 5 still calls Sphinx APIs that Sphinx 9 marks for removal in 11: theirs to change, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*Check CHANGES for Sphinx API modifications")

GUIDES = ["pretrain", "finetune", "compress", "translate", "evaluate", "real-models", "serve", "benchmarks-cloud"]
CHAPTERS = sorted(docs_build.NOTEBOOKS.glob("*.ipynb"))


def _png() -> str:
    """A 1x1 white PNG built by hand (signature, IHDR, IDAT, IEND), base64 as a notebook stores a figure."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00\xff\xff\xff")) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _executed_folder(folder: Path) -> Path:
    """Every stored chapter, as docs/build.py --executed expects them; chapter 01 with outputs added."""
    folder.mkdir()
    for path in CHAPTERS:
        shutil.copy(path, folder / path.name)
    first = folder / CHAPTERS[0].name
    nb = nbformat.read(first, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="printed by the executed run\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"}),
                    # a tqdm progress bar as a Jupyter widget: the site must show its text, not load widget JS
                    nbformat.v4.new_output("display_data", data={
                        "application/vnd.jupyter.widget-view+json": {"model_id": "m1", "version_major": 2,
                                                                     "version_minor": 0},
                        "text/plain": "train: 100%|##########| 300/300"})]
    code.execution_count = 1
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "state": {"m1": {"model_name": "HBoxModel", "model_module": "@jupyter-widgets/controls",
                         "model_module_version": "2.0.0", "state": {}}},
        "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, first)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "site"
    status = docs_build.build(out, executed=_executed_folder(tmp / "executed"))
    assert status == 0, "the strict build of docs/ failed (its warnings are printed above)"
    return out


def _prose(page: str) -> str:
    """The text a reader sees as prose: code blocks, formulas, scripts and tags removed."""
    page = re.sub(r"<(pre|code|math|script|style|textarea)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


@pytest.mark.slow  # a strict build of the whole site, ~30 s on our CPU (once per module)
def test_pages_exist(site):
    expected = ["index.html", "getting-started.html", "results.html", "development.html",
                "design/layout.html", "design/model.html", "design/kernels.html", "design/site.html",
                "course/index.html", "reference/index.html"]
    expected += [f"guides/{g}.html" for g in GUIDES]
    expected += [f"course/{p.stem}.html" for p in CHAPTERS]
    expected += [f"reference/{name}.html" for name, _, _ in docs_build.commands()[1:]]
    missing = [p for p in expected if not (site / p).is_file()]
    assert not missing, f"the site lacks {missing}"


@pytest.mark.slow  # a strict build of the whole site, ~30 s on our CPU (once per module)
def test_reference_is_the_parsers_help(site):
    """Each command's page holds its --help as the parser formats it (generated, so it cannot drift)."""
    rows = docs_build.commands()
    assert {"train", "generate", "serve", "eval"} <= {name for name, _, _ in rows}
    for name, _, text in rows[1:]:
        page = html.unescape(re.sub(r"<[^>]+>", "", (site / "reference" / f"{name}.html").read_text()))
        for line in text.strip().splitlines()[:3]:  # the usage lines, wrapped at the fixed width
            assert line.strip() in page, f"reference/{name}.html lacks {line.strip()!r}"


@pytest.mark.slow  # a strict build of the whole site, ~30 s on our CPU (once per module)
def test_math_is_mathml_and_no_raw_latex_is_left(site):
    pages = sorted(site.rglob("*.html"))
    raw = {}
    for page in pages:
        found = re.findall(r"\$[^$\s][^$\n]{0,200}?\$|\\\(|\\\[", _prose(page.read_text(encoding="utf-8")))
        if found:
            raw[str(page.relative_to(site))] = found[:3]
    assert not raw, f"raw LaTeX left in the pages: {raw}"
    attention = (site / "course" / f"{CHAPTERS[0].stem}.html").read_text(encoding="utf-8")
    assert attention.count("<math") >= 10  # chapter 01 is full of formulas: softmax(QK^T/sqrt(D))V, ...
    assert "<msqrt>" in attention


@pytest.mark.slow  # a strict build of the whole site, ~30 s on our CPU (once per module)
def test_site_needs_no_network(site):
    """Opened from disk, a page loads nothing from elsewhere: no remote script, style sheet or font."""
    remote = {}
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        found = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"', text)
        if found:
            remote[str(page.relative_to(site))] = found[:2]
    assert not remote, remote
    assert "mathjax" not in " ".join(p.name.lower() for p in site.rglob("*"))


@pytest.mark.slow  # a strict build of the whole site, ~30 s on our CPU (once per module)
def test_executed_chapters_show_their_outputs(site):
    page = (site / "course" / f"{CHAPTERS[0].stem}.html").read_text(encoding="utf-8")
    assert "printed by the executed run" in page
    assert "train: 100%|##########| 300/300" in page  # the progress bar's text, not an empty widget
    images = re.findall(r'<img[^>]*src="([^"]+\.png)"', page)
    assert images and all((site / "course" / src).resolve().is_file() for src in images)


@pytest.mark.slow  # a second strict build, of a copy of docs/ with the broken link
def test_a_broken_link_fails_the_strict_build(tmp_path, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(docs_build.DOCS, docs, ignore=shutil.ignore_patterns("__pycache__"))
    guide = docs / "guides" / "evaluate.md"
    guide.write_text(guide.read_text() + "\nSee [a page nobody wrote](no-such-page.md).\n")
    status = docs_build.build(tmp_path / "site", docs=docs)
    assert status != 0
    assert "no-such-page" in capsys.readouterr().err


def test_executed_folder_must_hold_every_chapter(tmp_path):
    (tmp_path / "executed").mkdir()
    shutil.copy(CHAPTERS[0], tmp_path / "executed" / CHAPTERS[0].name)
    with pytest.raises(FileNotFoundError, match=CHAPTERS[-1].name):
        docs_build.copy_course(tmp_path / "course", executed=tmp_path / "executed")


def test_keep_executed_follows_the_environment(tmp_path, monkeypatch):
    """The hand-off from the notebook tests to the site: kept only where MINILLM_KEEP_EXECUTED is set."""
    from notebooks import build as course

    nb = nbformat.read(CHAPTERS[0], as_version=4)
    monkeypatch.delenv(course.KEEP_ENV, raising=False)
    assert course.keep_executed(CHAPTERS[0], nb) is None
    monkeypatch.setenv(course.KEEP_ENV, str(tmp_path / "kept"))
    kept = course.keep_executed(CHAPTERS[0], nb)
    assert kept == tmp_path / "kept" / CHAPTERS[0].name
    assert nbformat.read(kept, as_version=4).cells[0].source == nb.cells[0].source


def test_mathml_draws_styled_letters_as_unicode():
    """MathML Core (Chromium) ignores mathvariant="script": the renderer writes 𝒩 itself, not N."""
    from docs._ext import mathml

    assert "<mi>𝒩</mi>" in mathml.to_mathml(r"\mathcal N(0, 0.02)", "inline", None)
    assert "<mi>ℝ</mi>" in mathml.to_mathml(r"\mathbb R^d", "inline", None)  # a letter with its own name
    assert "<msqrt>" in mathml.to_mathml(r"\sqrt{D}", "block", None)
