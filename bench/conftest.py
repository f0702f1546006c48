"""pytest options and hooks for the benchmark suites.

    pytest bench --quick                                  tiny shapes (the default without a GPU)
    pytest bench --bench-size=full --benchmark-json=r.json   the sizes of a GPU run, saved as JSON

The size is applied to bench.common.SIZE before any suite is collected, so suites that choose
their parameters at import time see it. The JSON's machine_info gains the device name, library
versions and, on a SkyPilot node, the cloud and instance, so every results file names its machine.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import common


def pytest_addoption(parser):
    group = parser.getgroup("minillm benchmarks")
    group.addoption("--bench-size", choices=common.SIZES, default=None,
                    help="problem sizes: 'quick' (tiny, for CI and CPUs) or 'full' (a GPU run). "
                         "Default: $MINILLM_BENCH_SIZE, else 'full' when a GPU is present.")
    group.addoption("--quick", action="store_true", default=False,
                    help="shorthand for --bench-size=quick")


def pytest_configure(config):
    size = "quick" if config.getoption("--quick") else config.getoption("--bench-size")
    if size is not None:
        common.SIZE = size
        # Subprocesses (and suites that read the variable rather than the module) agree.
        os.environ["MINILLM_BENCH_SIZE"] = size


@pytest.hookimpl(optionalhook=True)  # only called when pytest-benchmark is installed
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update({"device": common.device_name(), **common.versions(), "size": common.SIZE,
                         "peak_tflops_bf16": common.peak_tflops()})
    # SkyPilot sets this on every node it runs a task on: {"cloud": ..., "region": ..., ...}.
    cluster = os.environ.get("SKYPILOT_CLUSTER_INFO")
    if cluster:
        try:
            machine_info["skypilot"] = json.loads(cluster)
        except json.JSONDecodeError:
            machine_info["skypilot"] = cluster  # keep what it said rather than lose it
