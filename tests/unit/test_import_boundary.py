"""The Airflow side never loads ML frameworks; the container side never loads Airflow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "tensorflow", "onnxruntime", "tensorrt", "onnx", "mlflow", "keras", "jax")


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys; {statement}; "
        f"print(','.join(m for m in {modules!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return [m for m in out.stdout.strip().split(",") if m]


def test_operators_import_no_ml_framework():
    assert _loaded_after("import airflow_modelopt.operators", HEAVY) == []


@pytest.mark.parametrize("dag_file", ["modelopt_retrain_and_optimize.py", "modelopt_optimize.py"])
def test_dags_parse_without_ml_framework(dag_file):
    assert _loaded_after(f"import runpy; runpy.run_path('dags/{dag_file}')", HEAVY) == []


def test_container_entry_point_imports_no_airflow():
    statement = "import airflow_modelopt.container.cli, airflow_modelopt.container.runner, airflow_modelopt.container.steps.torch_to_onnx"
    assert _loaded_after(statement, ("airflow",)) == []


def test_step_modules_import_no_ml_framework():
    """The warm interpreter imports every step's module before it forks steps (container/warm.py):
    a framework loaded there would be shared, thread pools and all, by every step."""
    statement = ("import importlib; from airflow_modelopt.container.steps import STEP_MODULES; "
                 "[importlib.import_module(m) for m in STEP_MODULES.values()]")
    assert _loaded_after(statement, (*HEAVY, "openvino", "MNN", "coremltools", "tritonclient", "nncf")) == []


def test_import_linter_contracts_hold():
    from pathlib import Path

    lint = Path(sys.executable).with_name("lint-imports")
    exe = str(lint) if lint.exists() else "lint-imports"
    proc = subprocess.run([exe], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout
