"""The GPU table: one command that measures minillm's kernels and models against what a user would
pick instead, on one GPU, in at most ~8 minutes, and writes JSON lines and a markdown table.

    python -m bench.gpu_table --out=bench/results/          # a CUDA GPU (H100/H200): ~8 min
    python -m bench.gpu_table --toy --out=/tmp/gpu-table/    # any CPU: tiny shapes, Triton's interpreter

Sections (each in its own process, time-boxed; a failure is recorded and the next section runs):
    attention  minillm.kernels' FlashAttention fwd/bwd against SDPA's flash and cuDNN backends, bf16,
               the shapes of ../shared/docs/performance-targets.md (B·N = 16k tokens, H·D = 2048)
    quant      int8 / int4 (group 128) weight-only matmul at M = 1 and 16 against bf16 F.linear and
               torch's int4 tinygemm (_weight_int4pack_mm), Llama-7B/-13B layer shapes
    train      the baby GPT's training step (6L/6H/384, block 256, batch 64, bf16) against nanoGPT's
               recipe (bench/nanogpt.py), eager and torch.compile'd
    decode     SmolLM2-135M greedy tokens/s at batch 1, bf16 / int8 / int4; the real GGUF when pulled
               (--model), else a model of its shape with random weights (the row says why)
    tests      `pytest -m cuda tests`, then the Triton suites (which run on the GPU when there is one):
               passed / failed / skipped counts and the failing tests' names
Every row carries its status (ok, skipped, failed, timeout) and, when not ok, the reason; a time is
the median of 20 calls after warm-up (CUDA events, L2 flushed before each call), each case checked
against its reference once first; ratios are against baselines measured in the same run. Files:
OUT/gpu-table-<device>-<date>.jsonl (a first "machine" row: device, torch, triton, CUDA) and .md.

--toy runs every section at tiny shapes with few repetitions, on a CPU through Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported): tests/test_gpu_table.py runs it end to end
so the GPU run cannot fail on a typo. Its times say nothing about a GPU.

On the lent GPU machine (torch 2.11 / triton 3.6, no internet), from the repository root, the lead runs
this one line; the results (and logs) land in $OUT, to be committed under bench/results/:

    pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1; timeout 590 python -m bench.gpu_table --out="$OUT" 2>&1 | tee "$OUT/gpu-table.log"

(with the run's timeout_s=600; add --time-scale=0.7 when less than ~10 minutes of device time is left.)
The pulled GGUF (98 MB) does not travel to that machine, so its decode rows time SmolLM2's shape with
random weights; pass --model=PATH where the file is present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# Seconds each section may take on a GPU: 435 s in all, plus ~10 s of start-up per process, stays
# under 8 minutes. A section stops starting cases at its time box; its process is killed 15 s later
# (so even a run where every section hangs ends within ~9.5 minutes, under the GPU machine's 10).
TIME_BOX = {"attention": 130, "quant": 75, "train": 95, "decode": 60, "tests": 75}
TOY_TIME_BOX = 60  # per section on a CPU (each takes ~5-20 s at toy sizes when the machine is quiet)
GRACE = 15
ROOT = Path(__file__).resolve().parent.parent  # the children run `-m bench.gpu_table` and pytest from here
GGUF = "smollm2-135m-instruct"  # minillm pull's name for SmolLM2-135M-Instruct (Q4_1)
TRITON_SUITES = ["tests/test_kernels_attention.py", "tests/test_kernels_quant.py", "tests/test_model_triton.py",
                 "tests/test_seq2seq_triton.py"]  # they run on the GPU when there is one (CPU: the interpreter)


def pytest_runs(toy: bool) -> list[tuple[str, list[str]]]:
    """[(label, pytest args)] of the tests section: `pytest -m cuda tests`, given only the files that
    use the marker (the same tests, without a minute of collecting all the others), then the Triton
    suites; --toy keeps the second to one file's tests named *cuda* (which skip on a CPU)."""
    marked = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                    if "mark.cuda" in f.read_text(encoding="utf-8"))
    suites = ["-k", "cuda", TRITON_SUITES[1]] if toy else TRITON_SUITES
    return [("pytest -m cuda tests", ["-m", "cuda", *(marked or ["tests"])]), ("Triton suites", suites)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_table", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections: " + ", ".join(TIME_BOX) + ". See the module docstring.")
    p.add_argument("--out", default="bench/results/", help="folder for the .jsonl and .md (default: %(default)s)")
    p.add_argument("--toy", action="store_true",
                   help="tiny shapes on a CPU through Triton's interpreter (a smoke run; its times mean nothing)")
    p.add_argument("--sections", default=",".join(TIME_BOX), help="comma-separated subset (default: all)")
    p.add_argument("--model", default=None,
                   help=f"GGUF (pulled name or path) the decode section loads (default: {GGUF}; with --toy: none)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every section's time box (default 1.0: ~8 min on a GPU)")
    p.add_argument("--pytest", action="append", default=None, metavar="ARGS",
                   help="pytest arguments for the tests section, replacing the default runs (repeatable)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        if not args.toy:
            p.error("no CUDA GPU here: run with --toy for a CPU smoke run at tiny shapes")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (children inherit it)
    os.environ["MINILLM_BENCH_SIZE"] = "quick" if args.toy else "full"  # bench.common reads it on import
    if args.section:
        return run_section(args)
    return run_all(args, p)


def run_all(args, parser) -> int:
    """Each section in a child process under its time box; rows appended to the .jsonl as they come."""
    from bench.common import device_name, versions

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in TIME_BOX]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(TIME_BOX)}")
    out = Path(args.out).resolve()  # the children run in ROOT, wherever this was started
    if args.model and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    out.mkdir(parents=True, exist_ok=True)
    device = device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    stem = out / f"gpu-table-{slug}-{datetime.date.today().isoformat()}{'-toy' if args.toy else ''}"
    rows_path, md_path = stem.with_suffix(".jsonl"), stem.with_suffix(".md")
    machine = {"section": "machine", "status": "ok", "device": device, **versions(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "toy": args.toy, "command": " ".join(["python -m bench.gpu_table", *sys.argv[1:]])}
    rows_path.write_text(json.dumps(machine) + "\n")
    # `timeout 590 python -m bench.gpu_table` sends SIGTERM: end as SystemExit, so run_child's finally
    # kills the section running then (its own process group) instead of leaving it orphaned
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_sections(args, sections, rows_path, md_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = markdown(read_rows(rows_path))
    print(text)
    print(f"wrote {rows_path} and {md_path}")
    return 0


def run_sections(args, sections: list[str], rows_path: Path, md_path: Path) -> None:
    for name in sections:
        budget = (TOY_TIME_BOX if args.toy else TIME_BOX[name]) * args.time_scale
        print(f"== {name} (time box {budget:.0f} s)", flush=True)
        cmd = [sys.executable, "-m", "bench.gpu_table", f"--section={name}", f"--rows={rows_path}",
               f"--deadline-s={budget}", *(["--toy"] if args.toy else []),
               *([f"--model={args.model}"] if args.model else []),
               *[f"--pytest={a}" for a in args.pytest or []]]
        t0 = time.monotonic()
        status, reason = run_child(cmd, budget + GRACE)
        print(f"== {name}: {status} after {time.monotonic() - t0:.0f} s", flush=True)
        if status != "ok":
            append_row(rows_path, {"section": name, "status": status, "reason": reason})
        md_path.write_text(markdown(read_rows(rows_path)))  # after every section: a cut-off run keeps its table


def run_child(cmd: list[str], timeout: float) -> tuple[str, str]:
    """Run a section's process (and whatever it starts) to the end or the timeout: (status, reason)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a pytest it started goes too
        _, err = proc.communicate()
        sys.stderr.write(err[-4000:])
        return "timeout", f"killed after {timeout:.0f} s, inside a case (the rows before it are kept)"
    finally:
        if proc.poll() is None:  # we are being stopped (SIGTERM, Ctrl-C): take the section down with us
            os.killpg(proc.pid, signal.SIGKILL)
    sys.stderr.write(err[-4000:])  # warnings and tracebacks, for the log
    if proc.returncode != 0:
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return "failed", f"the section's process exited {proc.returncode}: {last[0][:300]}"
    return "ok", ""


def run_section(args) -> int:
    """The child's side: run one section's cases and append each row as soon as it is measured."""
    from bench import gpu_decode, gpu_sections

    ctx = gpu_sections.Context(toy=args.toy, deadline=time.monotonic() + args.deadline_s,
                               model=args.model or (None if args.toy else GGUF))
    if args.section == "tests":
        runs = [(a, shlex.split(a)) for a in args.pytest] if args.pytest else pytest_runs(args.toy)
        rows = (run_pytest(label, pytest_args, ctx.deadline) for label, pytest_args in runs)
    else:
        rows = {"attention": gpu_sections.attention, "quant": gpu_sections.quant, "train": gpu_sections.train,
                "decode": gpu_decode.decode}[args.section](ctx)
    for row in rows:
        append_row(Path(args.rows), row)
        print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "section"), flush=True)
    return 0


def run_pytest(label: str, pytest_args: list[str], deadline: float) -> dict:
    """One pytest run in its own process until the deadline: counts from its summary line, or from
    its per-test lines (-v) when it had to be stopped."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           *pytest_args]
    row = {"section": "tests", "status": "ok", "run": label, "command": " ".join(["pytest", *pytest_args])}
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, deadline - t0),
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its lines so far, if it is stopped
        text = res.stdout
        summary = [line for line in text.splitlines() if line.startswith("=") and " in " in line][-1:]
        if res.returncode in (2, 3, 4):  # interrupted, internal error, usage error: pytest did not run the tests
            last = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()][-1:] or ["?"]
            row.update(status="failed", reason=f"pytest exited {res.returncode}: {last[0][:300]}")
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        text, summary = (out.decode(errors="replace") if isinstance(out, bytes) else out), []
        row.update(status="timeout", reason="stopped at the section's time box; counts are of the tests run so far")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "deselected": 0}
    if summary:  # "==== 3 passed, 1 skipped, 1600 deselected in 12.3s ===="
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|deselected)", summary[0]):
            counts["errors" if word.startswith("error") else word] = int(n)
    else:
        for outcome in re.findall(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL)", text, re.M):
            key = {"ERROR": "errors", "XFAIL": "xfailed"}.get(outcome, outcome.lower())
            counts[key] += 1
    failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)  # the short summary (-ra)
    row.update(counts, seconds=round(time.monotonic() - t0, 1))
    if failing:
        row["failing"] = failing[:20]
    return row


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def markdown(rows: list[dict]) -> str:
    """A heading naming the machine, then one table per section (its columns: the keys its rows
    have, in order) and, under it, every case that did not run and why."""
    machine = next((r for r in rows if r["section"] == "machine"), {})
    lines = [f"# GPU table: {machine.get('device', '?')}{' (--toy: tiny shapes, times mean nothing)' if machine.get('toy') else ''}",
             "", f"torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}, "
             f"python {machine.get('python')}; {machine.get('date')}; `{machine.get('command')}`"]
    for section in dict.fromkeys(r["section"] for r in rows if r["section"] != "machine"):
        mine = [r for r in rows if r["section"] == section]
        ok = [r for r in mine if r["status"] == "ok"]
        lines += ["", f"## {section}", ""]
        cols = [k for k in dict.fromkeys(k for r in ok for k in r) if k not in ("section", "status", "failing")]
        if ok:
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in ok]
        for r in mine:
            if r["status"] != "ok" or r.get("failing"):
                what = ", ".join(f"{k}={fmt(v)}" for k, v in r.items()
                                 if k not in ("section", "status", "reason", "failing") and not isinstance(v, float))
                why = r.get("reason") or "failing: " + fmt(r.get("failing"))
                lines.append(f"- {r['status']}: {what + ': ' if what else ''}{why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
