"""Check the SkyPilot task files offline: nothing is launched, no cloud or credentials are needed.

    python -m bench.sky_check                 every sky/*.yaml of this checkout
    python -m bench.sky_check sky/train.yaml  one file

Each file is parsed with SkyPilot's own parser (`sky.Task.from_yaml_config`), which validates it
against SkyPilot's schema, so a misspelled key, a bad resource or a malformed `envs` block fails
here instead of after minutes of provisioning. Environment variables the file declares as
required (`BUCKET: null`: `sky launch` refuses to start without `--env BUCKET=...`) get a
placeholder, as `sky launch --env` would give them. Then the project's own rules: GPU names from
bench.cloud's list, and multi-node files wired from SkyPilot's node variables. One line per file;
exit status 1 if any file fails. tests/test_sky.py holds the same checks and more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLACEHOLDER = "minillm-check-placeholder"
NODE_VARS = ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS")


def check_file(path: Path) -> list[str]:
    """The problems of one task file (an empty list when it is valid)."""
    import sky
    import yaml

    from bench.cloud import ALLOWED_ACCELERATORS

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        return [f"not readable YAML ({str(e).splitlines()[0]})"]
    if not isinstance(config, dict):
        return ["not a SkyPilot task (expected a mapping at the top level)"]
    envs = config.get("envs") or {}
    required = {k: PLACEHOLDER for k, v in envs.items() if v is None} if isinstance(envs, dict) else {}
    try:
        task = sky.Task.from_yaml_config(config, env_overrides=list(required.items()) or None)
    except Exception as e:  # SkyPilot's schema errors are ValueErrors, but a bad value may raise others
        return [f"SkyPilot rejects it: {' '.join(str(e).split())[:300]}"]
    problems = []
    if not task.run:
        problems.append("no run command")
    for resources in task.resources:
        for name in resources.accelerators or {}:
            if name not in ALLOWED_ACCELERATORS:
                problems.append(f"GPU {name!r} is not in bench.cloud's list ({', '.join(ALLOWED_ACCELERATORS)})")
    if task.num_nodes > 1:
        problems += [f"runs on {task.num_nodes} nodes but never uses ${v}" for v in NODE_VARS
                     if v not in (task.run or "")]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sky_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="task files (default: every sky/*.yaml)")
    args = parser.parse_args(argv)
    files = args.files or sorted((REPO / "sky").glob("*.yaml"))
    if not files:
        print("no task files found", file=sys.stderr)
        return 1
    failed = 0
    for path in files:
        problems = check_file(path)
        failed += bool(problems)
        shown = path.resolve().relative_to(Path.cwd()) if path.resolve().is_relative_to(Path.cwd()) else path
        print(f"{shown}: " + ("ok (SkyPilot schema, GPU names, node wiring)" if not problems else "; ".join(problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
