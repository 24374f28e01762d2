"""The container entry point as a pod runs it: exit code, error line, termination message."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_cli(spec: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow_modelopt", "run", "torch_to_onnx", "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_bad_spec_error_becomes_the_termination_message(tmp_path):
    """Kubernetes shows /dev/termination-log as the container's termination message; the pod
    operator copies it into the task's error, so the cause is in the error, not only in the log."""
    log = tmp_path / "termination-log"
    log.write_text("")
    proc = run_cli({"model_uri": "runs:/r1/model/model.pt2", "opset": 99}, {"MODELOPT_TERMINATION_LOG": str(log)})
    assert proc.returncode == 2
    assert "modelopt: error: invalid TorchToOnnxSpec spec" in proc.stderr
    assert "opset" in log.read_text() and "99" in log.read_text()


def test_no_termination_file_is_created_outside_kubernetes(tmp_path):
    log = tmp_path / "termination-log"
    proc = run_cli({"model_uri": "runs:/r1/model/model.pt2", "opset": 99}, {"MODELOPT_TERMINATION_LOG": str(log)})
    assert proc.returncode == 2
    assert not log.exists()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_credentials_in_the_tracking_uri_never_reach_the_output():
    """http://user:password@host is split before anything uses or logs it: an unreachable server is
    reported by host, and the password appears nowhere."""
    password = "s3cr3t-Pa55word"
    proc = subprocess.run(
        [sys.executable, "-m", "airflow_modelopt", "run", "promote", "--spec", json.dumps(
            {"registered_model_name": "m", "candidates": [{"target": "t", "passed": False}]})],
        capture_output=True, text=True, timeout=120, env={
            **os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{password}@127.0.0.1:{closed_port()}",
            "MODELOPT_MLFLOW_CONNECT_RETRIES": "1"})
    assert proc.returncode == 4, proc.stderr[-2000:].replace(password, "<password>")
    assert "MLflow tracking server at http://127.0.0.1:" in proc.stderr
    assert password not in proc.stdout + proc.stderr


def test_a_bad_retry_budget_is_refused_naming_the_variable():
    proc = subprocess.run(
        [sys.executable, "-m", "airflow_modelopt", "run", "promote", "--spec", json.dumps(
            {"registered_model_name": "m", "candidates": [{"target": "t", "passed": False}]})],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "MODELOPT_MLFLOW_RETRY_BUDGET": "soon"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MODELOPT_MLFLOW_RETRY_BUDGET is 'soon'; expected seconds >= 0" in proc.stderr


BUDGET_PROBE = """
import json, sys, time
from mlflow import MlflowClient
from airflow_modelopt.container import tracking
client = MlflowClient(tracking.configure())
took = []
for _ in range(3):
    started = time.monotonic()
    try:
        client.get_experiment_by_name("x")
    except Exception:
        pass
    took.append(time.monotonic() - started)
print(json.dumps({"took": took, "timeout": __import__("os").environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]}))
"""


def test_all_mlflow_calls_of_a_step_share_one_retry_budget():
    """Against a server that does not answer, the first call gives up when the budget is spent (not
    after MLflow's own ~4-minute retry cycle) and later calls give up at once."""
    proc = subprocess.run([sys.executable, "-c", BUDGET_PROBE], capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"},
                               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}",
                               "MODELOPT_MLFLOW_RETRY_BUDGET": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    first, *later = probe["took"]
    assert 2 <= first < 15, probe
    assert all(t < 2 for t in later), probe
    assert probe["timeout"] == "10"  # a quarter of the budget, at least 10 s
