"""The SkyPilot task files (sky/*.yaml) and `python -m bench.cloud`, offline: nothing is launched.

Every YAML is loaded with SkyPilot's own parser (`sky.Task.from_yaml`), which validates it against
SkyPilot's schema and so catches misspelled keys; then the project's own checks, which SkyPilot
does not make: GPU names from our list, multi-node runs wired from the node-rank variables, the
benchmark sweep building one task per GPU. SkyPilot is a dev dependency: if it cannot be imported,
these tests fail (they are never skipped). sky.launch and friends are replaced by functions that
fail, so a test that tried to start a machine would fail instead.
"""

import base64
import gzip
import json
from pathlib import Path

import pytest
import sky  # noqa: E402  (one import: it takes seconds)
import yaml

from bench import cloud
from bench.cloud import main

SKY_DIR = Path(__file__).resolve().parent.parent / "sky"
YAMLS = sorted(SKY_DIR.glob("*.yaml"))
NODE_VARS = ("SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_GPUS_PER_NODE")


@pytest.fixture(autouse=True)
def no_launching(monkeypatch):
    """Anything that would start, stop or submit to a cloud fails the test instead."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a test tried to talk to a cloud")

    for name in ("launch", "exec", "down", "stop", "start", "tail_logs", "optimize", "status"):
        monkeypatch.setattr(sky, name, forbidden)
    monkeypatch.setattr(sky.jobs, "launch", forbidden)


def load_task(path: Path) -> sky.Task:
    """Parse like `sky launch PATH --env NAME=...` would: required envs (null) get a value first."""
    config = yaml.safe_load(path.read_text())
    required = [(k, "minillm-test-bucket") for k, v in (config.get("envs") or {}).items() if v is None]
    if not required:
        return sky.Task.from_yaml(str(path))
    return sky.Task.from_yaml_config(config, env_overrides=required)


def accelerators(task: sky.Task) -> list[str]:
    return [name for r in task.resources for name in (r.accelerators or {})]


def test_the_task_files_exist():
    names = {p.name for p in YAMLS}
    assert {"train.yaml", "train-multinode.yaml", "bench.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_is_valid_skypilot(path):
    task = load_task(path)
    assert task.run, f"{path.name} has no run command"
    for name in accelerators(task):
        assert name in cloud.ALLOWED_ACCELERATORS, f"{path.name}: GPU {name!r} is not in the allowed list"
    if task.num_nodes > 1:  # torchrun on every node, wired from SkyPilot's variables
        for var in NODE_VARS:
            assert var in task.run, f"{path.name} runs on {task.num_nodes} nodes but never uses ${var}"
        assert "--node_rank=$SKYPILOT_NODE_RANK" in task.run
    if task.workdir is not None:
        assert task.workdir == ".", "task files are launched from the repository root"


def test_schema_check_catches_a_misspelled_key(tmp_path):
    """The validation above can fail: SkyPilot rejects a key it does not know."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  acelerators: H100:1\nrun: echo hi\n")
    with pytest.raises(ValueError, match="acelerators"):
        sky.Task.from_yaml(str(bad))


def test_required_bucket_is_enforced_by_skypilot():
    # Launching a training or benchmark file without a bucket stops with SkyPilot's own message.
    for name in ("train.yaml", "train-multinode.yaml", "bench.yaml"):
        with pytest.raises(ValueError, match="BUCKET"):
            sky.Task.from_yaml(str(SKY_DIR / name))


def test_train_is_a_recoverable_spot_job():
    task = load_task(SKY_DIR / "train.yaml")
    assert task.num_nodes == 1
    for r in task.resources:
        assert r.use_spot
        assert r.job_recovery["strategy"] == "FAILOVER" and r.job_recovery["max_restarts_on_errors"] >= 1
        assert sum(r.accelerators.values()) == 1  # one GPU
    (mount, storage), = task.storage_mounts.items()
    assert storage.name == "minillm-test-bucket"
    assert f"OUT={mount}/" in task.run and '--out_dir="$OUT"' in task.run
    assert "--resume=true" in task.run and "config.json" in task.run  # resume only from a finished save
    assert "minillm train" in task.run


def test_multinode_uses_two_nodes_and_torchrun():
    task = load_task(SKY_DIR / "train-multinode.yaml")
    assert task.num_nodes == 2
    assert "torchrun" in task.run and "-m minillm.cli train" in task.run
    assert 'head -n1' in task.run  # the master is the first node IP
    assert "--nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE" in task.run


def test_parse_gpus():
    assert cloud.parse_gpus("H100:1, a100:2,l4") == [("H100", 1), ("A100", 2), ("L4", 1)]
    with pytest.raises(ValueError, match="did you mean H100"):
        cloud.parse_gpus("H10:1")
    with pytest.raises(ValueError, match="positive integer"):
        cloud.parse_gpus("L4:0")
    with pytest.raises(ValueError, match="twice"):
        cloud.parse_gpus("L4:1,L4:1")
    with pytest.raises(ValueError, match="empty"):
        cloud.parse_gpus(" , ")


def test_sweep_builds_one_task_per_gpu():
    runs = cloud.build_bench_tasks(cloud.parse_gpus("H100:1,A100:1,L4:1"), "t1", bucket="my-results")
    assert [r.accelerator for r in runs] == ["H100:1", "A100:1", "L4:1"]
    assert len({r.cluster_name for r in runs}) == 3
    for r, (name, count) in zip(runs, [("H100", 1), ("A100", 1), ("L4", 1)]):
        (res,) = r.task.resources
        assert res.accelerators == {name: count}  # the override replaced bench.yaml's default
        assert r.task.envs["RUN_ID"] == "t1" and r.task.envs["BUCKET"] == "my-results"
        assert r.task.envs["LABEL"] == r.label == f"{name}-{count}"
        assert r.task.storage_mounts[cloud.RESULTS_MOUNT].name == "my-results"
        assert Path(r.task.workdir).is_dir()  # absolute: works from any current directory
        assert r.cluster_name.endswith("-t1") and r.cluster_name == r.cluster_name.lower()


def test_sweep_without_bucket_drops_the_mount():
    (run,) = cloud.build_bench_tasks([("T4", 1)], "t2")
    assert run.task.storage_mounts == {} and run.task.envs["BUCKET"] == ""
    with pytest.raises(ValueError, match="run id"):
        cloud.build_bench_tasks([("T4", 1)], "Bad_ID")


def _log_with_results(name: str, payload: bytes) -> str:
    blob = base64.b64encode(gzip.compress(payload)).decode()
    lines = [blob[i:i + 76] for i in range(0, len(blob), 76)]
    # SkyPilot may prefix job output; the parser keeps the last word of each line
    return "\n".join(["setup done", "(task, pid=42) 3 passed",
                      f"(task, pid=42) === minillm-results-begin {name} ===",
                      *[f"(task, pid=42) {x}" for x in lines],
                      "(task, pid=42) === minillm-results-end ===", "bye"])


def test_extract_results_from_a_job_log():
    payload = json.dumps({"benchmarks": [], "x": "y" * 500}).encode()
    assert cloud.extract_results(_log_with_results("H100-1.json", payload)) == {"H100-1.json": payload}
    assert cloud.extract_results("no markers here") == {}


def test_run_sweep_collects_and_always_tears_down(monkeypatch, tmp_path):
    """The orchestration against a fake SkyPilot API: one GPU works, one fails to launch.
    Both clusters are torn down; the working one's results are saved from its log."""
    calls = []
    payload = json.dumps({"benchmarks": ["ok"]}).encode()

    def launch(task, cluster_name, **kw):
        calls.append(("launch", cluster_name, kw.get("down"), kw.get("idle_minutes_to_autostop")))
        return ("launch", cluster_name)

    def get(request):
        kind, name = request
        if kind == "launch" and "l4" in name:
            raise RuntimeError("no L4 capacity anywhere")
        return (7, None) if kind == "launch" else None

    def tail_logs(cluster_name, job_id, follow, output_stream):
        assert follow and job_id == 7
        output_stream.write(_log_with_results("x.json", payload))
        return 0

    def down(cluster_name):
        calls.append(("down", cluster_name))
        return ("down", cluster_name)

    for name, fn in (("launch", launch), ("get", get), ("tail_logs", tail_logs), ("down", down)):
        monkeypatch.setattr(sky, name, fn)
    runs = cloud.build_bench_tasks([("H100", 1), ("L4", 1)], "t3")
    files, statuses = cloud.run_sweep(runs, tmp_path)
    assert [f.name for f in files] == ["H100-1.json"] and files[0].read_bytes() == payload
    assert statuses["H100:1"] == "ok" and "no L4 capacity" in statuses["L4:1"]
    downs = {c[1] for c in calls if c[0] == "down"}
    assert downs == {r.cluster_name for r in runs}
    # each cluster also tears itself down if this process dies
    assert all(c[2] is True and c[3] == cloud.AUTODOWN_MINUTES for c in calls if c[0] == "launch")


def test_cli_dryrun_print_launches_nothing(capsys):
    assert main(["--gpus", "H100:1,L4:1", "--run-id", "t4", "--dryrun-print"]) == 0
    out = capsys.readouterr().out
    assert "# H100:1 on cluster minillm-bench-h100-1-t4" in out and "# L4:1 on cluster" in out
    assert "L4: 1" in out and "python -m pytest bench --bench-size=full" in out
    assert main(["--gpus", "V100:1", "--dryrun-print"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


def test_cloud_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for words in ("--gpus", "--bucket", "--dryrun-print", "torn down", "sky/bench.yaml"):
        assert words in text
