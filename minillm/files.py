"""Writing files so that a crash never leaves half of one: the one atomic-write helper.

    with atomic_write(path) as tmp:      # a temporary file in the same folder
        write to tmp                     # ... flushed and fsync'ed to disk
    # only now renamed over `path`: readers see the old file or the new one, never a mix

rename(2) is atomic within one filesystem, which is why the temporary file lives in the same folder
as its destination. fsync before the rename makes sure the new *contents* are on disk before the
name points at them: without it, a power cut can leave the new name on an empty file. Checkpoints,
tokenizers, downloads, metrics and plots all go through this.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


# read once, at import: os.umask is process-wide, so reading it later could race another thread
_FILE_MODE = 0o666 & ~_current_umask()


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows, for folders) refuse to fsync a directory
        pass
    finally:
        os.close(fd)


class atomic_write:
    """`with atomic_write(path) as tmp: write to tmp` — renamed to `path` only if the block succeeds.

    suffix: the temporary file's suffix. matplotlib picks an image format from it, so a plot passes
    suffix=".png".
    """

    def __init__(self, path: str | Path, suffix: str = ".tmp"):
        self.path = Path(path)
        self.suffix = suffix

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=self.suffix)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        try:
            # mkstemp made it 0600 (and a writer may have replaced it): give it the mode open() would,
            # 0666 less the umask, so a checkpoint stays readable by others, e.g. a container's user
            os.chmod(self.tmp, _FILE_MODE)
            _fsync(self.tmp)  # the bytes reach the disk before the name points at them
            os.replace(self.tmp, self.path)  # atomic: readers see the old file or the new one
            _fsync(self.path.parent, directory=True)  # and the rename itself is durable
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return False


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj, indent: int | None = 2, sort_keys: bool = True) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False), encoding="utf-8")
