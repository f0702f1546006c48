"""Where training text comes from: the named corpora, local files, and the one download helper.

    "python-docs"   the embedded default: the documentation topics every CPython ships
                    (`pydoc_data.topics`, ~470k characters), so training works offline
    "shakespeare"   tiny-shakespeare (Karpathy's char-rnn, 1.1 MB), downloaded once, checked against
                    its sha256 and kept in the user cache dir
    "sst2-text"     the sentences of SST-2's training split, one per line, labels dropped: in-domain
                    text for pre-training a model later fine-tuned on SST-2 (downloaded by tasks.py)
    notes.txt       any UTF-8 .txt file, or a folder of them (sorted, concatenated)

`load_text(name or path)` in dataset.py picks among them. This file imports nothing else from
minillm/data/: tasks.py and translation.py download through its `_fetch`, `sha256_hex` and
`default_cache_dir` (`$XDG_CACHE_HOME/minillm`, else `~/.cache/minillm`, or a `cache_dir` argument).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from minillm.files import write_bytes

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("python-docs", "shakespeare", "sst2-text")


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


def _iter_utf8(path: Path, chunk_bytes: int) -> Iterator[str]:
    """The text of a UTF-8 file, `chunk_bytes` at a time, as `Path.read_text(encoding="utf-8")` reads it.

    Incremental decoders carry a multi-byte character or a "\r\n" split between two reads over to
    the next one; the newline decoder turns "\r\n" and "\r" into "\n", as text mode does.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    consumed = 0  # bytes handed to the decoder so far, for the error message
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.start counts from the bytes still pending in utf8
                at = consumed - len(utf8.getstate()[0]) + e.start
                raise ValueError(f"{path} is not UTF-8 text (byte {at}: {e.reason}); "
                                 "convert it first, e.g. iconv -f latin1 -t utf-8") from None
            consumed += len(data)
            if text:
                yield text
            if not data:
                return


def iter_path(path: str | Path, chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """A .txt file, or every .txt file under a folder in sorted path order, each ending in a newline,
    in pieces of about `chunk_bytes`: the text without ever holding all of it."""
    path = Path(path).expanduser()
    if path.is_file():
        yield from _iter_utf8(path, chunk_bytes)
        return
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files in folder {path}")
    for f in files:
        last = ""
        for text in _iter_utf8(f, chunk_bytes):
            yield text
            last = text[-1]
        if last != "\n":  # else one file's last line would run into the next file's first line
            yield "\n"


def read_path(path: str | Path) -> str:
    """A .txt file, or every .txt file under a folder in sorted path order, each ending in a newline."""
    return "".join(iter_path(path))


def source_name(source: str | Path, text: str | None = None, text_sha256: str | None = None) -> str:
    """A short name for cache folders and summaries; a local copy of tiny-shakespeare is "shakespeare".

    Give the text, or its UTF-8 sha256 when the text is streamed rather than held."""
    if str(source) in CORPORA:
        return str(source)
    if text_sha256 is None:
        text_sha256 = sha256_hex(text.encode("utf-8"))
    if text_sha256 == SHAKESPEARE_SHA256:
        return "shakespeare"
    stem = Path(source).expanduser().resolve().name or "data"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(stem).stem)[:40] or "data"
