"""`python -m bench.report` on JSON from a real pytest-benchmark run, and bench/common.py's helpers.

The run: a tiny benchmark module written to tmp_path, run by pytest in a subprocess with the
project's benchmark plugin (bench/conftest.py) and --benchmark-json, exactly as a user runs the
suites. Files "from another machine" are copies with the device renamed — made here, never kept.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common
from bench import report
from bench.report import main

REPO = Path(__file__).resolve().parent.parent

TINY_SUITE = '''
import pytest
import torch
from bench import common
from bench.common import record, synchronized


@pytest.mark.parametrize("N", [8, 32])
@pytest.mark.parametrize("provider", ["naive", "sdpa"])
def test_matmul(benchmark, provider, N):
    torch.manual_seed(0)
    a = torch.randn(N, N)
    if provider == "sdpa":
        fn = lambda: a @ a
    else:  # a deliberately slow twin: one row at a time
        fn = lambda: torch.stack([a[i] @ a for i in range(N)])
    torch.testing.assert_close(fn(), a @ a)  # correct once before timing, as the suites do
    benchmark.pedantic(synchronized(fn), rounds=5, iterations=2, warmup_rounds=1)
    record(benchmark, flops=2 * N**3, bytes_moved=3 * N * N * 4, bench_size=common.SIZE)


def test_no_params(benchmark):
    benchmark.pedantic(lambda: sum(range(100)), rounds=3)
    record(benchmark, tokens=100)
'''


@pytest.fixture(scope="module")
def run_json(tmp_path_factory) -> Path:
    """pytest-benchmark JSON from a real run of TINY_SUITE (quick size, bench/conftest.py loaded)."""
    tmp = tmp_path_factory.mktemp("bench_run")
    (tmp / "test_tiny_bench.py").write_text(TINY_SUITE)
    (tmp / "pytest.ini").write_text("[pytest]\n")  # keep the repository's pytest options out
    out = tmp / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MINILLM_BENCH_SIZE": "full"}  # --quick on the command line must win over this
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(tmp / "pytest.ini"), "-p", "bench.conftest",
         "-p", "no:cacheprovider", "--quick", f"--benchmark-json={out}", str(tmp / "test_tiny_bench.py")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _other_machine(path: Path, tmp_path: Path, device: str, peak: float | None, faster: float) -> Path:
    """A copy of a results file as if run on `device`, `faster` times quicker (test only)."""
    data = json.loads(path.read_text())
    data["machine_info"].update(device=device, peak_tflops_bf16=peak)
    for b in data["benchmarks"]:
        b["extra_info"]["device"] = device
        for k in ("tflops", "gbps", "tokens_per_s"):
            b["extra_info"].pop(k, None)  # rates are re-derived from the per-call counts
        b["stats"]["median"] /= faster
    out = tmp_path / f"{device.replace(' ', '_')}.json"
    out.write_text(json.dumps(data))
    return out


def test_run_records_machine_and_size(run_json):
    data = json.loads(run_json.read_text())
    assert data["machine_info"]["device"] == common.device_name()
    assert data["machine_info"]["size"] == "quick"  # --quick beat MINILLM_BENCH_SIZE=full
    matmuls = [b for b in data["benchmarks"] if b["name"].startswith("test_matmul")]
    assert len(matmuls) == 4
    for b in matmuls:
        assert b["extra_info"]["bench_size"] == "quick"
        assert b["extra_info"]["torch"] and "tflops" in b["extra_info"]
        n = b["params"]["N"]
        assert b["extra_info"]["flops"] == 2 * n**3
        assert b["extra_info"]["tflops"] == pytest.approx(2 * n**3 / b["stats"]["median"] / 1e12)


def test_load_results_groups_and_speedups(run_json):
    results = report.load_results([run_json])
    assert len(results) == 5
    mm = [r for r in results if r.suite == "test_tiny_bench::test_matmul"]
    assert {r.provider for r in mm} == {"naive", "sdpa"}
    assert {r.shape["N"] for r in mm} == {8, 32}
    assert {r.device for r in results} == {common.device_name()}
    baselines = report.add_speedups(results)
    assert baselines == {"test_tiny_bench::test_matmul": "sdpa"}  # the suite without providers: none
    for r in mm:
        base = next(b for b in mm if b.provider == "sdpa" and b.shape == r.shape)
        assert r.metrics["vs baseline"] == pytest.approx(base.median_s / r.median_s)
    other = next(r for r in results if r.suite == "test_tiny_bench::test_no_params")
    assert other.provider == "" and other.shape == {}
    assert other.metrics["tokens/s"] == pytest.approx(100 / other.median_s, rel=1e-6)


def test_table_and_plots_from_two_machines(run_json, tmp_path):
    gpu = _other_machine(run_json, tmp_path, "NVIDIA H100 80GB HBM3", peak=989.0, faster=50.0)
    text, pngs = report.build_report([run_json, gpu], tmp_path / "out")
    cpu = common.device_name()
    assert "2 device(s)" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "provider" in line)
    for column in ("N", "provider", "device", "median", "TFLOP/s", "GB/s", "MFU", "vs sdpa"):
        assert f" {column} |" in header, column
    rows = [line for line in lines if "naive" in line or "| sdpa |" in line]
    assert len(rows) == 8  # 2 providers x 2 sizes x 2 devices
    assert sum(cpu in r for r in rows) == 4 and sum("H100" in r for r in rows) == 4
    # MFU only where a peak is known (the GPU file), derived from the re-computed TFLOP/s
    results = report.load_results([gpu])
    r = next(x for x in results if x.provider == "sdpa" and x.shape.get("N") == 32)
    assert r.metrics["MFU"] == pytest.approx(r.metrics["TFLOP/s"] / 989.0)
    h100_row = next(x for x in rows if "H100" in x and "| 32 | sdpa |" in x)
    assert f"{100 * r.metrics['MFU']:.1f}%" in h100_row
    # speedups compare providers on the same device only: the 50x faster copy is not "faster"
    assert all("| 1.00× |" in x for x in rows if "| sdpa |" in x)
    names = sorted(p.name for p in pngs)
    assert names == ["test_tiny_bench_test_matmul__scaling.png", "test_tiny_bench_test_matmul__speedup.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from matplotlib.image import imread
        h, w = imread(p).shape[:2]
        assert h > 100 and w > 100
    md = (tmp_path / "out" / "report.md").read_text()
    assert "](test_tiny_bench_test_matmul__scaling.png)" in md


def test_cli_report(run_json, tmp_path, capsys):
    assert main([str(run_json.parent), "--out", str(tmp_path / "r"),
                 "--baseline", "naive"]) == 0
    out = capsys.readouterr().out
    assert "### test_tiny_bench::test_matmul" in out and "vs naive" in out
    assert (tmp_path / "r" / "report.md").is_file()
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text(json.dumps({"benchmarks": []}))
    assert main([str(tmp_path / "empty.json")]) == 2
    assert main([str(run_json), "--bogus=1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--out" in text and "--baseline" in text and "pytest-benchmark" in text


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("Tesla T4", 65.0), ("CPU x86_64 (2 cores)", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(name, peak):
    # longest match first: an A100 is not an A10, an L40S is not an L4
    assert common.peak_tflops(name) == peak


def test_record_without_timing():
    """With --benchmark-disable there are no stats: the counts are stored, no rates invented."""
    class Disabled:
        extra_info: dict = {}
        stats = None

    b = Disabled()
    b.extra_info = {}
    info = common.record(b, flops=1e9, tokens=10, provider="x")
    assert info["flops"] == 1e9 and info["tokens"] == 10 and info["provider"] == "x"
    assert "tflops" not in info and "tokens_per_s" not in info
    assert info["device"] == common.device_name()


def test_pick_follows_size(monkeypatch):
    monkeypatch.setattr(common, "SIZE", "quick")
    assert common.pick(quick=[1], full=[2]) == [1]
    monkeypatch.setattr(common, "SIZE", "full")
    assert common.pick(quick=[1], full=[2]) == [2]


def test_report_ignores_other_json(run_json, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))  # not a results file
    data = json.loads(run_json.read_text())
    (tmp_path / "a.json").write_text(json.dumps(copy.deepcopy(data)))
    assert len(report.load_results([tmp_path])) == 5
