"""README.md is the first five minutes (issue 28): short, every link it gives resolves, a guide per stage.

The guides, design notes and measured figures live in docs/ (the site); the README points into it with
relative links, so they work on GitHub as well as in a checkout. These tests need nothing but the
files: no Sphinx, no network (tests/test_docs.py builds the site itself).

    pytest tests/test_readme.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 300
GUIDES = ["pretrain", "finetune", "compress", "translate", "evaluate", "real-models", "serve", "benchmarks-cloud"]
# [text](target) outside code: the target up to a closing parenthesis or a space (a title)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The README without its fenced code blocks, where [x](y) is code, not a link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _links() -> list[str]:
    return [t for t in LINK.findall(_prose(README.read_text(encoding="utf-8")))
            if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not files here


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move sections into docs/ (the site), keep ≤ {MAX_LINES}"


def test_every_relative_link_resolves():
    """A link to a file that does not exist, or to a heading a page does not have, fails here."""
    broken = []
    for target in _links():
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = [line for line in file.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"


def test_links_into_docs_are_pages_of_the_site():
    """The README reaches the site through relative paths to its Markdown pages, one guide per stage."""
    into_docs = {t.partition("#")[0] for t in _links() if t.startswith("docs/")}
    assert all(t.endswith(".md") for t in into_docs), into_docs
    missing = [g for g in GUIDES if f"docs/guides/{g}.md" not in into_docs]
    assert not missing, f"README.md has no line for the guides {missing}"
    assert "docs/results.md" in into_docs


def test_real_model_section_holds_one_table_between_its_markers():
    """The lead replaces this table with a benchmark's output: it must be one table, clearly delimited."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## A real model, measured\n", 1)[1].split("\n## ", 1)[0]
    begin, end = "<!-- real-model table: begin", "<!-- real-model table: end -->"
    assert section.count(begin) == 1 and section.count(end) == 1
    inside = section.split(begin, 1)[1].split("-->", 1)[1].split(end, 1)[0].strip().splitlines()
    assert len(inside) >= 3 and all(line.startswith("|") for line in inside), inside  # header, rule, rows
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", inside[1]), inside[1]
