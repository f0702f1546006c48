"""`python -m bench.sky_check`, the documented offline check of sky/*.yaml: it passes on the shipped
files and fails, naming the problem, on a misspelled key, an unknown GPU and broken YAML."""

import pytest

pytest.importorskip("sky")

from bench.sky_check import main  # noqa: E402


def test_the_shipped_task_files_pass(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "train.yaml: ok" in out and "bench.yaml: ok" in out and "train-multinode.yaml: ok" in out


@pytest.mark.parametrize("text, message", [
    ("resources:\n  acelerators: H100:1\nrun: echo hi\n", "did you mean 'accelerators'"),
    ("resources:\n  accelerators: P100:1\nrun: echo hi\n", "GPU 'P100' is not in bench.cloud's list"),
    ("resources: [unclosed\n", "not readable YAML"),
    ("num_nodes: 2\nrun: torchrun train.py\n", "never uses $SKYPILOT_NODE_RANK"),
])
def test_a_broken_task_file_fails_with_its_problem(text, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main([str(bad)]) == 1
    assert message in capsys.readouterr().out
