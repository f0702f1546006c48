"""Sphinx configuration of the minillm site. Build it with docs/build.py, not sphinx-build directly:
the script adds the pages generated at build time (the command reference, the course chapters, the
benchmark figures) to a copy of this folder, then runs Sphinx strict. docs/design/site.md says why Sphinx."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))  # mathml.py, our math renderer

project = "minillm"
author = "the minillm authors"
copyright = "the minillm authors"

extensions = [
    "myst_nb",  # MyST Markdown pages and Jupyter notebooks (it brings myst_parser with it)
    "mathml",   # formulas to MathML at build time (docs/_ext/mathml.py): no script, no network
]
html_math_renderer = "mathml"

# MyST: $...$ and $$...$$ as math (what the notebooks and the README write), amsmath environments,
# and anchors on headings down to ###, so a link can point into another page (guide.md#a-section).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# The notebooks are never executed by Sphinx: docs/build.py hands it chapters already executed (by the
# test suite in CI), or as stored, without outputs.
nb_execution_mode = "off"
nb_merge_streams = True  # a cell's printed lines in one block, as Jupyter shows them
# A progress bar that tqdm drew as a Jupyter widget shows the text it also carries ("100%|#####| 300/300"):
# a live widget needs ipywidgets' JavaScript from a CDN, and this site loads nothing from the network.
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]

exclude_patterns = ["_build", "course/README.md", "**/.ipynb_checkpoints"]

html_theme = "furo"
html_title = "minillm"
html_static_path = ["_static"]
html_css_files = ["minillm.css"]
html_copy_source = False  # the sources are in the repository; a copy in the site adds nothing
html_show_sourcelink = False
