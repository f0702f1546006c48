"""Where training text comes from: named corpora and local files.

    load_text("python-docs")     the embedded default: the documentation topics every CPython ships
                                 (`pydoc_data.topics`, ~470k characters), so training works offline
    load_text("shakespeare")     tiny-shakespeare (Karpathy's char-rnn, 1.1 MB), downloaded once,
                                 checked against its sha256 and kept in the user cache dir
    load_text("notes.txt")       any UTF-8 .txt file, or a folder of them (sorted, concatenated)

The cache dir is `$XDG_CACHE_HOME/minillm` (else `~/.cache/minillm`), or the `cache_dir` argument.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from minillm.files import write_bytes

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("python-docs", "shakespeare")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/minillm`, or `~/.cache/minillm` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minillm"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def python_docs_text() -> str:
    """The pydoc topic texts (what `help("for")` prints) joined in sorted key order.

    Sorted keys and a fixed separator make the text identical on every run of the same Python;
    another Python version ships other docs, a different text, hence a different dataset hash.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some Linux distributions split the stdlib docs into their own package
        raise FileNotFoundError(
            "this Python has no pydoc_data module (its documentation topics were left out, as some "
            "Linux distributions do); install your distribution's python3 documentation package, or "
            "train on a local text file with --data PATH"
        ) from None
    return "\n\n".join(topics[key] for key in sorted(topics))


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    """Download `url` (tests replace this function: they never touch the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def shakespeare_text(cache_dir: str | Path | None = None) -> str:
    """tiny-shakespeare: from the cache if present and intact, else downloaded and verified."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "shakespeare.txt"
    if path.exists():
        data = path.read_bytes()
        if sha256_hex(data) == SHAKESPEARE_SHA256:
            return data.decode("utf-8")
        # A truncated or edited copy must not silently become "shakespeare": fetch it again.
        path.unlink()
    try:
        data = _fetch(SHAKESPEARE_URL)
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(
            f"could not download tiny-shakespeare from {SHAKESPEARE_URL} ({e}). If you are offline "
            f"and have a copy (the char-rnn input.txt), pass it as a path: --data PATH/input.txt, "
            f"or copy it to {path}"
        ) from None
    digest = sha256_hex(data)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"downloaded tiny-shakespeare has sha256 {digest}, expected "
                         f"{SHAKESPEARE_SHA256}; refusing to use it (a proxy or a changed file?)")
    write_bytes(path, data)  # atomic: a concurrent reader sees no file or the whole file
    return data.decode("utf-8")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def read_path(path: str | Path) -> str:
    """A .txt file, or every .txt file under a folder in sorted path order, each ending in a newline."""
    path = Path(path).expanduser()
    if path.is_file():
        return _read_utf8(path)
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files in folder {path}")
    texts = [_read_utf8(f) for f in files]
    # Without the newline, one file's last line would run into the next file's first line.
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


def load_text(source: str | Path, cache_dir: str | Path | None = None) -> str:
    """Text of a named corpus ("python-docs", "shakespeare") or of a local file/folder."""
    if str(source) == "python-docs":
        text = python_docs_text()
    elif str(source) == "shakespeare":
        text = shakespeare_text(cache_dir)
    elif Path(source).expanduser().exists():
        text = read_path(source)
    else:
        close = difflib.get_close_matches(str(source), CORPORA, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"data source {str(source)!r} is neither a corpus name "
                                f"({', '.join(CORPORA)}) nor an existing file or folder{hint}")
    if not text:
        raise ValueError(f"data source {str(source)!r} is empty")
    return text


def source_name(source: str | Path, text: str) -> str:
    """A short name for cache folders and summaries; a local copy of tiny-shakespeare is "shakespeare"."""
    if str(source) in CORPORA:
        return str(source)
    if sha256_hex(text.encode("utf-8")) == SHAKESPEARE_SHA256:
        return "shakespeare"
    stem = Path(source).expanduser().resolve().name or "data"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(stem).stem)[:40] or "data"
