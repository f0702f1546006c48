"""bench/gpu_table.py, the GPU table, run end to end at toy sizes on a CPU (Triton's interpreter), so
the run on a lent GPU cannot fail on a typo; and its pieces: a section that crashes or hangs is
recorded and the next one runs, pytest's counts are read right, the markdown shows what did not run.
"""

import json
import sys

import pytest
import torch

from bench import gpu_table

SECTIONS = ["attention", "quant", "train", "decode", "tests"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--toy on a GPU machine would time the GPU, not the toy run")
def test_toy_run_produces_rows_for_every_section(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="pip install 'minillm[kernels]'")
    monkeypatch.setenv("MINILLM_BENCH_SIZE", "quick")  # main() sets both; restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    absent = tmp_path / "absent.gguf"
    # time boxes × 5: on a busy shared CPU every case still runs (the test checks paths, not speed)
    assert gpu_table.main(["--toy", f"--out={tmp_path / 'out'}", "--time-scale=5", f"--model={absent}"]) == 0

    [jsonl] = (tmp_path / "out").glob("gpu-table-*-toy.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    machine = rows[0]
    assert machine["section"] == "machine" and machine["toy"] is True
    assert machine["torch"] == torch.__version__ and machine["device"].startswith("CPU")
    by = {s: [r for r in rows if r["section"] == s] for s in SECTIONS}
    for section, mine in by.items():
        failed = [r for r in mine if r["status"] in ("failed", "timeout")]
        assert not failed, f"{section}: {failed}"
        assert any(r["status"] == "ok" for r in mine), f"{section} measured nothing: {mine}"

    def ok(section, **labels):
        found = [r for r in by[section] if r["status"] == "ok" and all(r.get(k) == v for k, v in labels.items())]
        assert found, f"no ok {section} row with {labels}: {by[section]}"
        return found

    for direction in ("fwd", "bwd"):  # the kernel, checked against SDPA, and its ratio to the flash backend
        for r in ok("attention", provider="triton", direction=direction):
            assert r["rel_err"] < 1e-4 and r["ms"] > 0 and r["vs_flash"] > 0
    for provider in ("bf16", "int8", "int4"):
        for r in ok("quant", provider=provider):
            assert r["us"] > 0 and r["vs_bf16"] > 0
    assert {r["M"] for r in ok("quant", provider="int4")} == {1, 16}
    for provider in ("nanoGPT", "minillm sdpa"):
        for compiled in (False, True):
            assert ok("train", provider=provider, compiled=compiled)[0]["vs_nanogpt"] > 0
    assert ok("train", provider="minillm triton")[0]["tokens_per_s"] > 0
    [skip] = [r for r in by["decode"] if r["status"] == "skipped"]  # the GGUF is named and why it is absent
    assert str(absent) in skip["reason"]
    for variant in ("fp32", "int8", "int4"):
        r = ok("decode", variant=variant)[0]
        assert r["tokens_per_s"] > 0 and r["same_tokens_as_modules"] == 1.0
    runs = ok("tests")
    assert [r["run"] for r in runs] == ["pytest -m cuda tests", "Triton suites"]
    assert "tests/test_prune.py" in runs[0]["command"]  # a file that uses the marker
    for r in runs:  # CUDA tests on a CPU: selected, then skipped; none failed
        assert r["skipped"] >= 1 and r["failed"] == r["errors"] == 0 and r["deselected"] > 0

    [md] = (tmp_path / "out").glob("gpu-table-*-toy.md")
    text = md.read_text()
    for section in SECTIONS:
        assert f"## {section}" in text
    assert "tinygemm is a CUDA kernel" in text  # what did not run is listed with its reason


def test_a_section_that_crashes_or_hangs_is_recorded_not_fatal():
    status, reason = gpu_table.run_child([sys.executable, "-c", "raise SystemExit('cuDNN exploded')"], 30)
    assert status == "failed" and "cuDNN exploded" in reason
    status, reason = gpu_table.run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert status == "timeout" and "1 s" in reason
    assert gpu_table.run_child([sys.executable, "-c", "pass"], 30) == ("ok", "")


def write_tests(folder):
    (folder / "test_sample.py").write_text(
        "import time, pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_c(): pass\n"
        "def test_d(): time.sleep(float(__import__('os').environ.get('SLEEP_D', '0')))\n")
    return str(folder / "test_sample.py")


def test_pytest_counts_come_from_its_summary(tmp_path, monkeypatch):
    import time

    path = write_tests(tmp_path)
    row = gpu_table.run_pytest("sample", [path], time.monotonic() + 120)
    assert row["status"] == "ok" and row["run"] == "sample"
    assert (row["passed"], row["failed"], row["skipped"], row["errors"]) == (2, 1, 1, 0)
    assert len(row["failing"]) == 1 and row["failing"][0].endswith("test_sample.py::test_b")


def test_pytest_stopped_at_the_time_box_keeps_the_counts_so_far(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("SLEEP_D", "60")
    path = write_tests(tmp_path)
    row = gpu_table.run_pytest("sample", [path], time.monotonic() + 20)  # pytest starts in ~2-10 s
    assert row["status"] == "timeout" and "time box" in row["reason"]
    assert (row["passed"], row["failed"], row["skipped"]) == (1, 1, 1)  # test_d never finished


def test_markdown_lists_what_did_not_run():
    rows = [{"section": "machine", "status": "ok", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11",
             "triton": "3.6", "cuda": "12.8", "python": "3.12", "date": "d", "toy": False, "command": "c"},
            {"section": "quant", "status": "ok", "M": 1, "provider": "bf16", "us": 40.04, "vs_bf16": 1.0},
            {"section": "quant", "status": "ok", "M": 1, "provider": "int4", "us": 12.5, "vs_bf16": 3.2032},
            {"section": "quant", "status": "skipped", "M": 1, "provider": "torch-int4", "reason": "no tinygemm"},
            {"section": "decode", "status": "timeout", "reason": "killed after 75 s"}]
    text = gpu_table.markdown(rows)
    assert text.startswith("# GPU table: NVIDIA H100 80GB HBM3\n")
    assert "torch 2.11, triton 3.6, CUDA 12.8" in text
    assert "| M | provider | us | vs_bf16 |" in text and "| 1 | int4 | 12.5 | 3.2 |" in text
    assert "- skipped: M=1, provider=torch-int4: no tinygemm" in text
    assert "## decode" in text and "- timeout: killed after 75 s" in text


def test_without_a_gpu_it_asks_for_toy(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    with pytest.raises(SystemExit) as e:
        gpu_table.main(["--out=/nonexistent"])
    assert e.value.code == 2 and "--toy" in capsys.readouterr().err


def test_an_unknown_section_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILLM_BENCH_SIZE", "quick")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        gpu_table.main(["--toy", f"--out={tmp_path}", "--sections=attention,qaunt"])
    assert "unknown section 'qaunt'" in capsys.readouterr().err


def test_a_pytest_that_cannot_start_is_a_failed_row(tmp_path):
    import time

    row = gpu_table.run_pytest("sample", [str(tmp_path / "no_such_test.py")], time.monotonic() + 120)
    assert row["status"] == "failed" and "pytest exited 4" in row["reason"]
