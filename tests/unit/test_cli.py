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
