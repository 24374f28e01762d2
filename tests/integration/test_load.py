"""CI slice of the load test (scripts/load_test.py): the real stack on PostgreSQL — MLflow server
with --serve-artifacts, Airflow api-server, scheduler (LocalExecutor, parallelism 4) and
dag-processor — runs two `modelopt_optimize` runs into one registered model at once, plus one whose
promotion has no passing candidate, while the MLflow server is killed and restarted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, postgres_unavailable

pytestmark = pytest.mark.timeout(1500)

SCRIPT = REPO / "scripts" / "load_test.py"


def _unavailable() -> str | None:
    reason = postgres_unavailable()
    if reason:
        return reason
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (Airflow 3's async engine on PostgreSQL; pip install 'airflow-modelopt[postgres]')"
    return None


def test_concurrent_runs_through_an_mlflow_outage(tmp_path: Path) -> None:
    reason = _unavailable()
    if reason:
        pytest.skip(f"the load test needs a PostgreSQL server: {reason}")
    from airflow_modelopt.pipelines import gpu_visible

    failing = 0 if gpu_visible() else 1  # the run without a candidate asks for TensorRT on a GPU-less worker
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", str(2 + failing), "--failing-runs", str(failing), "--names", "1",
         "--outage", "--outage-seconds", "20", "--timeout", "1380", "--json", str(out),
         "--workdir", str(tmp_path / "stack")],
        capture_output=True, text=True, timeout=1440, cwd=REPO,
    )
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert out.exists(), output
    report = json.loads(out.read_text())
    assert "error" not in report, output
    assert report["outage"]["down_s"] >= 20, output  # the server really went away while a step ran
    assert report["duplicate_versions"] == 0, output
    assert report["running_runs"] == 0, output
    assert report["unfinished"] == [] and report["truthful"], output
    states = sorted((r["expected"], r["state"]) for r in report["dag_runs"])
    assert states == sorted([("success", "success")] * 2 + [("failed", "failed")] * failing), output
    # Both runs promoted the same candidate into one registered model: exactly one version of it.
    assert report["versions_per_name"] == {"loadtest-0": 1}, output
    assert proc.returncode == 0, output
    assert "runs/min" in proc.stdout and "DAG states truthful: yes" in proc.stdout, output
