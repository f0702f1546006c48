"""A Sphinx math renderer that writes MathML at build time, so formulas need no script and no network.

Sphinx's default renderer (sphinx.ext.mathjax) leaves the LaTeX in the page and loads MathJax from a
CDN to typeset it in the browser: read offline, `$\\ln V$` stays `\\(\\ln V\\)`. Here each formula is
converted once, while the site is built, by latex2mathml (pure Python) into MathML, which browsers
render natively (MathML Core: Chromium 109+, Firefox, Safari). The page carries the result; nothing
runs when it is opened.

A formula latex2mathml cannot read is a warning naming the page and the LaTeX; docs/build.py runs
Sphinx with -W, so it fails the build instead of shipping raw LaTeX.

Used by docs/conf.py: extensions = [..., "mathml"] and html_math_renderer = "mathml".
"""

from __future__ import annotations

import html
import re
import unicodedata

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.util import logging

logger = logging.getLogger(__name__)


# MathML Core, the part of MathML that Chromium implements, draws mathvariant="normal" only: a
# \mathcal N would come out as a plain italic N. Unicode has the styled letters themselves (𝒩, ℝ, 𝔄),
# so a one-letter <mi> with a style becomes that letter, which every browser and font shows as meant.
STYLES = {"script": "SCRIPT", "double-struck": "DOUBLE-STRUCK", "fraktur": "FRAKTUR", "bold": "BOLD"}
STYLED_MI = re.compile(r'<mi mathvariant="(script|double-struck|fraktur|bold)">([A-Za-z])</mi>')


def styled_letter(style: str, letter: str) -> str:
    """The Unicode letter for `letter` in `style` (𝒩 for script N), or `letter` itself if there is none."""
    case = "CAPITAL" if letter.isupper() else "SMALL"
    # most are MATHEMATICAL SCRIPT CAPITAL N; a few older ones have their own names (SCRIPT CAPITAL B: ℬ)
    for name in (f"MATHEMATICAL {STYLES[style]} {case} {letter.upper()}", f"{STYLES[style]} {case} {letter.upper()}"):
        try:
            return unicodedata.lookup(name)
        except KeyError:
            continue
    return letter


def to_mathml(latex: str, display: str, node: nodes.Node) -> str:
    """`latex` as a <math> element; on a conversion error, a warning and the LaTeX shown as code."""
    try:
        mathml = convert(latex.strip(), display=display)
        return STYLED_MI.sub(lambda m: f"<mi>{styled_letter(m[1], m[2])}</mi>", mathml)
    except Exception as err:  # latex2mathml raises several types (its own, IndexError, KeyError, ...)
        logger.warning("latex2mathml cannot convert %r: %s: %s", latex, type(err).__name__, err, location=node)
        return f"<code>{html.escape(latex)}</code>"


def visit_math(self, node: nodes.math) -> None:
    """Inline math ($...$ in MyST): a <math display="inline"> in the running text."""
    self.body.append(to_mathml(node.astext(), "inline", node))
    raise nodes.SkipNode


def visit_math_block(self, node: nodes.math_block) -> None:
    """Display math ($$...$$, ```{math}, amsmath environments): a centred <math display="block">."""
    latex = node.astext()
    if node.get("nowrap"):  # an amsmath environment written out whole: \begin{align} ... \end{align}
        latex = latex.strip()
    self.body.append(self.starttag(node, "div", CLASS="math"))
    if node.get("number"):  # a labelled equation: its number at the right, as Sphinx's own renderers do
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    self.body.append(to_mathml(latex, "block", node))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None),
                               block_renderers=(visit_math_block, None))
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
