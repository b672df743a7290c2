"""The simulator and the arbiter must stay torch-free (and matplotlib-free until plotting)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ["elasticserve.core.arbiter", "elasticserve.sim", "elasticserve.workload.generators",
           "elasticserve.workload.trace", "elasticserve.sim.cost_model", "elasticserve.sim.gpu_specs",
           "elasticserve.sim.model_shapes", "elasticserve.sim.kv_sim", "elasticserve.sim.runtime",
           "elasticserve.sim.simulator", "elasticserve.sim.metrics", "elasticserve.sim.scenarios",
           "elasticserve.sim.experiment", "elasticserve.sim.report", "elasticserve.sim.calibrate",
           "elasticserve.sim.cli_sim"]


def test_sim_and_arbiter_import_without_torch() -> None:
    code = ("import importlib, sys\n"
            f"for m in {MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, f'imported {bad}'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
