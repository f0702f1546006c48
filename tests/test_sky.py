"""The SkyPilot task files (sky/*.yaml) and `python -m bench.cloud`, offline: nothing is launched.

Every YAML is loaded with SkyPilot's own parser (`sky.Task.from_yaml`), which validates it against
SkyPilot's schema and so catches misspelled keys; then the project's own checks, which SkyPilot
does not make: GPU names from our list, multi-node runs wired from the node-rank variables, the
benchmark sweep building one task per GPU. SkyPilot is a dev dependency: if it cannot be imported,
these tests fail (they are never skipped). sky.launch and friends are replaced by functions that
fail, so a test that tried to start a machine would fail instead.

What the task files install is checked against what the code imports: `pytest bench` is collected
in a subprocess where every installed distribution that bench.yaml's `pip install` would not bring
is unimportable, so a suite importing an extra the GPU node lacks fails here, not on a paid GPU.
"""

import base64
import gzip
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import sky  # noqa: E402  (one import: it takes seconds)
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench import cloud
from bench.cloud import main
from minillm.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
SKY_DIR = REPO / "sky"
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
    # resume only from a complete save, by the rule `minillm train --resume=true` uses
    assert "--resume=true" in task.run and "minillm checkpoints" in task.run
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


# --- What the task files run and install ------------------------------------------------------

def shell_commands(script: str) -> list[list[str]]:
    """A task's setup/run script as words, one list per command line (continuations joined)."""
    return [shlex.split(line, comments=True) for line in script.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


PIP_OPTIONS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                          "--constraint"}


def pip_requirements(script: str) -> list[str]:
    """Every requirement that a `pip install` in the script names: ['.[kernels]', 'pytest>=8', ...]."""
    reqs = []
    for words in shell_commands(script):
        for i in (i for i in range(1, len(words)) if words[i - 1:i + 1] == ["pip", "install"]):
            rest = iter(words[i + 1:])
            for w in rest:
                if w in ("&&", "||", ";", "|"):
                    break
                if w in ("-r", "--requirement"):
                    raise AssertionError("a requirements file: list the packages in the task file instead")
                if w in PIP_OPTIONS_WITH_VALUE:
                    next(rest)
                elif not w.startswith("-"):
                    reqs.append(w)
    return reqs


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions `pip install REQUIREMENTS` brings, as canonical names, following the
    dependencies of what is installed here; "." or ".[extra,...]" is this checkout (pyproject.toml)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names, seen, todo = set(), set(), [(r, frozenset()) for r in requirements]
    while todo:
        spec, parent_extras = todo.pop()
        spec = re.sub(r"^\.(?=\[|$)", project["name"], spec)  # ".[kernels]" -> "minillm[kernels]"
        req = Requirement(spec)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras or {""}):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        names.add(name)
        if name == canonicalize_name(project["name"]):
            extras = project["optional-dependencies"]
            deps = project["dependencies"] + [d for e in req.extras for d in extras[e]]
            todo += [(d, frozenset()) for d in deps]
        else:
            try:
                deps = metadata.distribution(name).requires or []
            except metadata.PackageNotFoundError:
                continue  # not installed here, so nothing here to hide either
            todo += [(d, frozenset(req.extras)) for d in deps]
    return names


# Run pytest with some top-level modules unimportable, as if their distributions were not installed.
HIDE_AND_RUN_PYTEST = """
import importlib.abc, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: the task does not install it)",
                                      name=name)
sys.meta_path.insert(0, NotInstalled())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def pytest_with_only(installed: set[str], args: list[str]) -> subprocess.CompletedProcess:
    """`python -m pytest ARGS` with only the distributions in `installed` importable (plus pip,
    setuptools and wheel, which every Python has) and only their pytest plugins loaded."""
    allowed = installed | {"pip", "setuptools", "wheel"}
    tops = metadata.packages_distributions()
    hidden = {top for top, dists in tops.items() if not {canonicalize_name(d) for d in dists} & allowed}
    plugins = [arg for ep in metadata.entry_points(group="pytest11")
               if canonicalize_name(ep.dist.name) in allowed for arg in ("-p", ep.value)]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugins of hidden packages stay out
    command = [sys.executable, "-c", HIDE_AND_RUN_PYTEST, ",".join(sorted(hidden)), *plugins, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def bench_pytest_args() -> list[str]:
    """The arguments of bench.yaml's `python -m pytest` (those naming shell variables dropped)."""
    run = yaml.safe_load((SKY_DIR / "bench.yaml").read_text())["run"]
    (words,) = [w for w in shell_commands(run) if w[:3] == ["python", "-m", "pytest"]]
    words = words[3:words.index("||")] if "||" in words else words[3:]
    return [w for w in words if "$" not in w]


BENCH_SUITES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "bench").glob("test_*.py"))


def test_pip_requirements_are_read_from_the_setup():
    script = ('set -e\npip install -q -e ".[kernels]" "pytest>=8" \\\n'
              '   x==1 --index-url https://i/cpu && echo done\n')
    assert pip_requirements(script) == [".[kernels]", "pytest>=8", "x==1"]
    closure = installed_closure([".[serve]"])
    assert {"minillm", "torch", "fastapi", "httpx"} <= closure and "skypilot" not in closure


def test_bench_collects_with_only_what_bench_yaml_installs():
    """The GPU node has exactly bench.yaml's `pip install`: every suite must import with that."""
    setup = yaml.safe_load((SKY_DIR / "bench.yaml").read_text())["setup"]
    installed = installed_closure(pip_requirements(setup))
    assert {"minillm", "pytest", "pytest-benchmark"} <= installed
    assert not installed & {"skypilot", "transformers", "jupyter", "onnx"}  # the dev extras stay out
    r = pytest_with_only(installed, [*bench_pytest_args(), "--collect-only"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = {line.split("::")[0] for line in r.stdout.splitlines() if "::" in line}
    assert collected == set(BENCH_SUITES), f"collected {sorted(collected)}: want bench/test_*.py, no more"


def test_serve_suite_skips_without_the_serve_extra():
    installed = installed_closure([".[kernels]", "pytest", "pytest-benchmark"])
    assert "httpx" not in installed and "fastapi" not in installed
    suites = ["bench/test_serve_load.py", "bench/test_generate.py"]  # two suites are enough, and quick
    r = pytest_with_only(installed, [*suites, "--collect-only", "-q", "-p", "no:cacheprovider"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SKIPPED" in r.stdout and "pip install 'minillm[serve]'" in r.stdout
    assert "bench/test_serve_load.py::" not in r.stdout and "bench/test_generate.py::" in r.stdout


def run_setup(tmp_path, name: str, gpu: bool) -> list[list[str]]:
    """Run a task's setup script with a `pip` that records its arguments (and nvidia-smi or not)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "pip.log"
    bin_dir.mkdir()
    fakes = {"pip": f'#!/bin/sh\necho "$@" >> "{log}"\n'}
    if gpu:
        fakes["nvidia-smi"] = "#!/bin/sh\n"
    for fake, text in fakes.items():
        (bin_dir / fake).write_text(text)
        (bin_dir / fake).chmod(stat.S_IRWXU)
    setup = yaml.safe_load((SKY_DIR / name).read_text())["setup"]
    subprocess.run(["/bin/bash", "-c", setup], env={"PATH": str(bin_dir)}, cwd=tmp_path, check=True,
                   timeout=30)
    return [line.split() for line in log.read_text().splitlines()]


def test_serve_installs_the_cpu_torch_wheel_on_cpu_replicas(tmp_path):
    cpu_torch, serve = run_setup(tmp_path, "serve.yaml", gpu=False)
    assert cpu_torch[0] == "install" and "--index-url" in cpu_torch
    assert cpu_torch[cpu_torch.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    (pin,) = [Requirement(w) for w in cpu_torch if w.startswith("torch")]
    (wanted,) = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                 ["dependencies"] if d.startswith("torch")]
    (version,) = [s.version for s in pin.specifier if s.operator == "=="]  # pinned, not "latest"
    assert wanted.specifier.contains(version), f"torch {version} does not satisfy pyproject's {wanted}"
    assert serve[0] == "install" and '.[serve]' in serve  # after torch, so pip keeps the CPU build


def test_serve_keeps_the_cuda_torch_wheel_on_gpu_replicas(tmp_path):
    (serve,) = run_setup(tmp_path, "serve.yaml", gpu=True)
    assert ".[serve]" in serve and "--index-url" not in serve


SUBCOMMANDS = set(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_task_files_name_what_exists(path):
    """Commands, modules and files that a task file runs or tells the reader to run exist in the
    repository: `python -m bench.cloud`, `minillm serve`, bench/loadgen.py (not renamed or removed)."""
    text = path.read_text()
    config = yaml.safe_load(text)
    code = [config.get("setup") or "", config.get("run") or ""]
    code += re.findall(r"^#\s{3,}(.+)$", text, flags=re.M)  # indented command examples in comments
    code += re.findall(r"`([^`]+)`", text)
    code = "\n".join(code)
    for module in re.findall(r"python -m ([\w.]+)", code):
        assert importlib.util.find_spec(module), f"{path.name}: python -m {module}: no such module"
    for command in re.findall(r"(?:^\s*|[;&|(]\s*|-m\s+)minillm(?:\.cli)? ([a-z][\w-]*)", code, flags=re.M):
        assert command in SUBCOMMANDS, f"{path.name}: `minillm {command}` is not a command"
    repo_path = r"\b((?:bench|sky|minillm|kernels|notebooks|tests)/[\w/.-]+\.(?:py|yaml|ipynb))"
    for file in re.findall(repo_path, text):
        assert (REPO / file).is_file(), f"{path.name} refers to {file}, which does not exist"
