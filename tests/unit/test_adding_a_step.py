"""docs/adding-a-step.md is true: its tiny step's spec, step and operator, run exactly as written.

The page's ``python file=...`` blocks are loaded as the modules they name, the step gets its line
in the registry, and then the operator validates its arguments (the Airflow side) and the real
runner runs the step against a SQLite MLflow store (the container side). It runs in a subprocess
so the tiny step never joins the registry of the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO

SCRIPT = r'''
import json, pathlib, re, sys, types

doc = pathlib.Path("docs/adding-a-step.md").read_text()
blocks = re.findall(r"```python file=(\S+)\n(.*?)```", doc, re.S)
assert [p for p, _ in blocks] == ["airflow_modelopt/specs/array_stats.py",
                                  "airflow_modelopt/container/steps/array_stats.py",
                                  "airflow_modelopt/operators/array_stats.py"], blocks
for path, code in blocks:
    name = path[:-3].replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    exec(compile(code, path, "exec"), module.__dict__)

from airflow_modelopt.container.steps import STEP_MODULES
STEP_MODULES["array_stats"] = "airflow_modelopt.container.steps.array_stats"   # the page's registry line

from airflow_modelopt import get_provider_info
from airflow_modelopt.operators.array_stats import ArrayStatsOperator

listed = get_provider_info()["operators"][0]["python-modules"]
refusal = None
try:
    ArrayStatsOperator(task_id="bad", data_uri=sys.argv[1], max_samples=0)
except ValueError as exc:
    refusal = str(exc)

spec = ArrayStatsOperator(task_id="stats", data_uri=sys.argv[1], max_samples=50).build_spec(None)
from airflow_modelopt.container.runner import run_step
first = run_step("array_stats", spec.model_dump_json())
again = run_step("array_stats", spec.model_dump_json())
print(json.dumps({"listed": listed, "refusal": refusal, "first": first.model_dump(mode="json"),
                  "again": again.model_dump(mode="json")}))
'''


def test_the_tiny_step_on_the_page_validates_runs_logs_and_caches(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 0.5, size=(80, 4)).astype(np.float32)
    y = rng.integers(0, 10, size=80)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MODELOPT_ARTIFACT_ROOT": str(tmp_path / "art")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "airflow_modelopt.operators.array_stats" in out["listed"]
    assert out["refusal"] and "max_samples" in out["refusal"]
    first = out["first"]
    assert first["step"] == "array_stats" and not first["cache_hit"]
    assert abs(first["metrics"]["x_mean"] - float(x[:50].astype(np.float64).mean())) < 1e-9
    assert abs(first["metrics"]["y_std"] - float(y[:50].std())) < 1e-9
    assert first["artifacts"]["report"].startswith(f"runs:/{first['mlflow_run_id']}/")
    assert out["again"]["cache_hit"] and out["again"]["cached_from_run_id"] == first["mlflow_run_id"]
