"""The benchmark suites on several cloud GPUs at once, one report at the end. Run from the checkout:

    python -m bench.cloud --gpus H100:1,A100:1,L4:1 [--bucket my-minillm-results]
    python -m bench.cloud --gpus L4:1 --dryrun-print        # show the tasks, launch nothing

For each GPU type, sky/bench.yaml becomes one SkyPilot task with that accelerator (the same as
`sky launch sky/bench.yaml --gpus L4:1`), launched on its own cluster through SkyPilot's Python API.
The clusters run side by side; each job's results come back through its log (the YAML prints them
between marker lines), the cluster is torn down, and the JSON files go to bench/report.py.
With --bucket, the results are also kept in that bucket under the run id.

SkyPilot (`pip install "minillm[cloud]"`) needs cloud credentials: run `sky check` first. Without
them, the first step (a dry run through SkyPilot's optimizer) fails with SkyPilot's own message,
before anything is started.
"""

from __future__ import annotations

import argparse
import base64
import copy
import difflib
import gzip
import io
import re
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# GPU types the sweep accepts (SkyPilot's names). Each has a peak in bench/common.py, so the report
# can give MFU; a typo such as "H10" is caught here rather than by a cloud optimizer minutes later.
ALLOWED_ACCELERATORS = ("H100", "H200", "A100", "A100-80GB", "L40S", "L4", "A10G", "A10", "T4")
REPO_ROOT = Path(__file__).resolve().parent.parent  # an editable install: the checkout
RESULTS_MOUNT = "/results"  # where sky/bench.yaml mounts the bucket
# A cluster left behind (e.g. this process was killed) tears itself down after this much idle time.
AUTODOWN_MINUTES = 20
BEGIN = re.compile(r"=== minillm-results-begin (\S+) ===")
END = "=== minillm-results-end ==="


def _import_sky():
    try:
        import sky
    except ImportError:
        raise SystemExit('python -m bench.cloud needs SkyPilot: pip install "minillm[cloud]" '
                         "(then run `sky check` to set up cloud credentials)") from None
    return sky


def parse_gpus(text: str) -> list[tuple[str, int]]:
    """"H100:1,a100:2,L4" -> [("H100", 1), ("A100", 2), ("L4", 1)], names checked and canonical."""
    canonical = {a.lower(): a for a in ALLOWED_ACCELERATORS}
    gpus = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, count = item.partition(":")
        if name.lower() not in canonical:
            close = difflib.get_close_matches(name.upper(), ALLOWED_ACCELERATORS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown GPU {name!r} in --gpus{hint} "
                             f"(allowed: {', '.join(ALLOWED_ACCELERATORS)})")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"--gpus {item!r}: the count after ':' must be a positive integer")
        gpus.append((canonical[name.lower()], int(count or 1)))
    if not gpus:
        raise ValueError("--gpus is empty: give e.g. --gpus H100:1,L4:1")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus names the same GPU twice: {text}")
    return gpus


@dataclass
class BenchRun:
    """One GPU type of the sweep: its SkyPilot task and the cluster it runs on."""
    accelerator: str  # "H100:1", the resources override
    label: str  # "H100-1": results file name and part of the cluster name
    cluster_name: str
    task: object  # sky.Task


def build_bench_tasks(gpus: list[tuple[str, int]], run_id: str, bucket: str | None = None,
                      yaml_path: str | Path | None = None) -> list[BenchRun]:
    """One sky.Task per GPU, from sky/bench.yaml with `accelerators` overridden. Launches nothing.

    Without a bucket, the YAML's bucket mount is dropped (results come back through the job log).
    """
    sky = _import_sky()  # first: without SkyPilot, say what to install
    import yaml  # PyYAML comes with SkyPilot

    yaml_path = Path(yaml_path or REPO_ROOT / "sky" / "bench.yaml")
    if not yaml_path.is_file():
        raise FileNotFoundError(f"{yaml_path} not found: run from a checkout of the minillm "
                                "repository, or pass --yaml PATH")
    if not re.fullmatch(r"[a-z0-9-]+", run_id):
        raise ValueError(f"run id {run_id!r}: use lowercase letters, digits and '-' "
                         "(it becomes part of cluster names)")
    base = yaml.safe_load(yaml_path.read_text())
    if bucket is None:
        (base.get("file_mounts") or {}).pop(RESULTS_MOUNT, None)
    elif RESULTS_MOUNT not in (base.get("file_mounts") or {}):
        raise ValueError(f"{yaml_path} has no bucket mount at {RESULTS_MOUNT} for --bucket")
    if base.get("workdir") == ".":
        base["workdir"] = str(yaml_path.resolve().parent.parent)  # the YAML's repository
    runs = []
    for name, count in gpus:
        label = f"{name}-{count}"
        envs = [("RUN_ID", run_id), ("BUCKET", bucket or ""), ("LABEL", label)]
        # from_yaml_config validates against SkyPilot's schema (misspelled keys fail here) and
        # consumes its argument, hence the copy.
        task = sky.Task.from_yaml_config(copy.deepcopy(base), env_overrides=envs)
        task.set_resources_override({"accelerators": f"{name}:{count}"})
        runs.append(BenchRun(f"{name}:{count}", label,
                             f"minillm-bench-{label.lower()}-{run_id}", task))
    return runs


def task_yaml(task) -> str:
    """A task as YAML the way a person writes it: scripts as `|` blocks, no SkyPilot internals."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    def public(d: dict) -> dict:  # SkyPilot's own bookkeeping keys start with "_"
        return {k: public(v) if isinstance(v, dict) else v for k, v in d.items()
                if not str(k).startswith("_") and v not in ({}, None)}

    config = public(task.to_yaml_config())
    return yaml.dump(config, Dumper=Dumper, sort_keys=False, width=100)


def extract_results(log: str) -> dict[str, bytes]:
    """The JSON files a bench job printed between marker lines: {file name: content}."""
    found, name, chunks = {}, None, []
    for line in log.splitlines():
        if name is None:
            m = BEGIN.search(line)
            if m:
                name, chunks = m.group(1), []
        elif END in line:
            found[name] = gzip.decompress(base64.b64decode("".join(chunks)))
            name = None
        elif line.strip():
            chunks.append(line.split()[-1])  # SkyPilot may prefix log lines: keep the last word
    return found


def _run_one(sky, run: BenchRun, out_dir: Path) -> tuple[Path | None, str]:
    """Launch, follow the job to its end, save its log and results, tear the cluster down."""
    say = lambda msg: print(f"[{run.accelerator}] {msg}", flush=True)  # noqa: E731
    try:
        request = sky.launch(run.task, cluster_name=run.cluster_name, down=True,
                             idle_minutes_to_autostop=AUTODOWN_MINUTES)
        say(f"launching cluster {run.cluster_name} (provisioning log: sky api logs {request})")
        job_id, _ = sky.get(request)
        say(f"job {job_id} running; following its log")
        log = io.StringIO()
        exit_code = sky.tail_logs(run.cluster_name, job_id, follow=True, output_stream=log)
        (out_dir / f"{run.label}.log").write_text(log.getvalue())
        files = extract_results(log.getvalue())
        if not files:
            return None, f"no results in the job log (exit code {exit_code}); see {run.label}.log"
        path = out_dir / f"{run.label}.json"
        path.write_bytes(next(iter(files.values())))
        status = "ok" if exit_code == 0 else f"job exit code {exit_code}, partial results"
        return path, status
    except Exception as e:  # one GPU failing (no capacity, quota) must not stop the others
        return None, f"{type(e).__name__}: {e}"
    finally:
        try:
            sky.get(sky.down(run.cluster_name))
            say(f"cluster {run.cluster_name} torn down")
        except sky.exceptions.ClusterDoesNotExist:
            pass  # never came up, or already gone: nothing is left running
        except Exception as e:  # say so loudly: a cluster may still be costing money
            say(f"could not tear down {run.cluster_name} ({e}): run `sky down {run.cluster_name}`")


def check_tasks(runs: list[BenchRun]) -> None:
    """A dry run of every task through SkyPilot's optimizer: it picks a cloud and a price and
    provisions nothing. A machine without credentials stops here with SkyPilot's own message."""
    sky = _import_sky()
    for run in runs:
        sky.stream_and_get(sky.launch(run.task, cluster_name=run.cluster_name, dryrun=True))


def run_sweep(runs: list[BenchRun], out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Run every task on its own cluster, in parallel; each is torn down when its job ends.

    Returns the results files and {accelerator: status}.
    """
    sky = _import_sky()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        outcomes = list(pool.map(lambda r: _run_one(sky, r, out_dir), runs))
    files = [path for path, _ in outcomes if path is not None]
    return files, {run.accelerator: status for run, (_, status) in zip(runs, outcomes)}


def cmd_cloud_bench(args) -> int:
    """Run the benchmark suites on several cloud GPUs (one cluster each, torn down after) and
    build one report comparing them."""
    from bench.report import build_report

    gpus = parse_gpus(args.gpus)
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    runs = build_bench_tasks(gpus, run_id, args.bucket, args.yaml)
    if args.dryrun_print:
        for run in runs:
            print(f"# {run.accelerator} on cluster {run.cluster_name}")
            print(task_yaml(run.task))
        return 0
    out_dir = Path(args.out) / run_id
    print(f"run {run_id}: {', '.join(r.accelerator for r in runs)}; results in {out_dir}"
          + (f" and bucket {args.bucket}/{run_id}/" if args.bucket else ""))
    try:
        check_tasks(runs)
    except Exception as e:  # SkyPilot's exceptions share no base class; its message says what to do
        print(f"python -m bench.cloud: SkyPilot could not plan the runs: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    files, statuses = run_sweep(runs, out_dir)
    for accelerator, status in statuses.items():
        print(f"  {accelerator}: {status}")
    if not files:
        print("python -m bench.cloud: no GPU returned results", file=sys.stderr)
        return 1
    text, pngs = build_report(files, out_dir / "report")
    print(text)
    print(f"report: {out_dir / 'report' / 'report.md'} ({len(pngs)} plot(s))")
    return 0 if len(files) == len(runs) else 1


def build_parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(
        prog="python -m bench.cloud",
        description=textwrap.fill(" ".join((cmd_cloud_bench.__doc__ + " Each GPU type gets its "
            "own cluster running sky/bench.yaml (pytest bench at full size); results come back "
            "through the job log, clusters are torn down (and tear themselves down after "
            f"{AUTODOWN_MINUTES} idle minutes if this process dies), and bench/report.py "
            "turns them into a table and plots. Provisioning and setup take minutes per cluster "
            "(all clusters in parallel) before the suites start. Needs SkyPilot (pip install "
            "\"minillm[cloud]\") and credentials (run `sky check` once).").split()), 90),
        epilog="examples:\n  python -m bench.cloud --gpus H100:1,A100:1,L4:1\n"
               "  python -m bench.cloud --gpus L4:1 --bucket my-minillm-results --out bench/results\n"
               "  python -m bench.cloud --gpus A10G:1 --dryrun-print",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--gpus", default="H100:1", metavar="LIST",
                   help="comma-separated GPU:COUNT list (default: H100:1); allowed GPU names: "
                        + ", ".join(ALLOWED_ACCELERATORS))
    b.add_argument("--bucket", default=None, metavar="NAME",
                   help="also keep the results in this bucket (S3/GCS name, created if missing) "
                        "under RUN_ID/")
    b.add_argument("--run-id", default=None, metavar="ID",
                   help="name of this sweep (default: UTC time, e.g. 20261123-140501)")
    b.add_argument("--out", default="bench/results", metavar="DIR",
                   help="local folder; results, logs and the report go to DIR/RUN_ID "
                        "(default: bench/results)")
    b.add_argument("--yaml", default=None, metavar="PATH",
                   help="task file to launch (default: sky/bench.yaml of this checkout)")
    b.add_argument("--dryrun-print", action="store_true",
                   help="print the task built for each GPU and exit; contacts no cloud")
    b.set_defaults(func=cmd_cloud_bench)
    return b


def main(argv: list[str] | None = None) -> int:
    from bench.common import run_command

    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
