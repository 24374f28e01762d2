"""Faults a step must survive with a clear outcome: the tracking server dying mid-step, SIGTERM
(Airflow's kill), and a tracking URI that carries credentials. Each against a real MLflow server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MLFLOW_SERVER_TEST_ENV, free_port, run_step, wait_http

#: The outage tests' retry budget (seconds) and how much later than it a step may exit on a
#: loaded machine; without a budget each MLflow call retries for about four minutes.
BUDGET_S = 15
SLACK_S = 45


def start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over the SQLite store and artifacts under ``root``, in its
    own process group (its workers die with it)."""
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        env={**os.environ, **MLFLOW_SERVER_TEST_ENV},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300, proc=proc)
    except Exception:
        kill_server(proc)
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    return proc


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the server and its workers: a crash, not a shutdown."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def candidate_run(client: Any, experiment: str, count: int) -> str:
    """A run holding ``count`` small artifact folders m0, m1, ... (plain-folder promotion candidates)."""
    import tempfile

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name="candidates")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            Path(tmp, f"m{i}").mkdir()
            Path(tmp, f"m{i}", "model.bin").write_bytes(bytes([i % 256]) * 64)
        client.log_artifacts(run.info.run_id, tmp)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def promote_spec(name: str, run_id: str, count: int, context: dict[str, Any]) -> dict[str, Any]:
    candidates = [{"target": f"t{i}", "model_uri": f"runs:/{run_id}/m{i}", "passed": True,
                   "candidate_key": f"{name}-{i}", "metrics": {"latency_ms_p50": 1.0 + i, "model_bytes": 64.0}}
                  for i in range(count)]
    return {"registered_model_name": name, "candidates": candidates, "write_summary": False, "context": context}


class StepProcess:
    """The entry point in a subprocess whose stderr lines are collected as they come."""

    def __init__(self, step: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_modelopt", "run", step, "--spec", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the step never logged {text!r} (exit {self.proc.returncode}):\n{self.output[-3000:]}")

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None (and the process killed) when it is still running after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    @property
    def output(self) -> str:
        return self.stdout + "".join(self.lines)

    def run_id(self) -> str:
        """The step's own MLflow run, as the runner logs it."""
        for line in self.lines:
            if match := re.search(r"MLflow run (\w+) \(parent", line):
                return match.group(1)
        raise AssertionError(f"the step logged no MLflow run:\n{self.output[-3000:]}")


def test_server_dying_mid_step_exits_4_within_the_retry_budget_and_the_next_try_closes_the_run(tmp_path):
    """The server is SIGKILLed while a promotion is making its registry calls: the step gives up
    within one retry budget for all its calls together (not ~4 minutes per call) with exit 4, and
    the task's next try, once the server is back on the same store, ends the run try 1 had to leave
    RUNNING (FAILED, tagged why) and then promotes."""
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        count = 40
        run_id = candidate_run(MlflowClient(uri), "tests-faults", count)
        context = {"experiment_name": "tests-faults", "dag_id": "faults", "run_id": "manual__outage",
                   "task_id": "promote", "try_number": 1}
        env = {"MLFLOW_TRACKING_URI": uri, "MODELOPT_MLFLOW_RETRY_BUDGET": str(BUDGET_S)}
        step = StepProcess("promote", promote_spec("faults-outage", run_id, count, context), env)
        step.wait_for_line(" (parent ", timeout=300)  # the step's run exists; its registry calls begin
        kill_server(server)
        killed_at = time.monotonic()
        code = step.wait(BUDGET_S + SLACK_S)
        took = time.monotonic() - killed_at
        assert code is not None, (f"the step was still running {BUDGET_S + SLACK_S} s after the server died "
                                  f"(retry budget {BUDGET_S} s):\n{step.output[-3000:]}")
        assert code == 4, step.output[-3000:]
        assert "stopped answering" in step.output and f"retry budget {BUDGET_S} s" in step.output
        assert "Traceback" not in step.output, "an unreachable server is an exit 4 with one error line"
        step_run_id = step.run_id()

        server = start_server(tmp_path, port)
        client = MlflowClient(uri)
        assert client.get_run(step_run_id).info.status == "RUNNING"  # nobody could close it meanwhile
        retry = run_step("promote", promote_spec("faults-outage", run_id, count, {**context, "try_number": 2}),
                         env, timeout=900)
        assert retry.returncode == 0, retry.output[-3000:]
        abandoned = client.get_run(step_run_id)
        assert abandoned.info.status == "FAILED"
        assert abandoned.data.tags["modelopt.status"] == "failed"
        assert "abandoned: try 1 ended without closing this run" in abandoned.data.tags["modelopt.error"]
        assert len(client.search_model_versions("name = 'faults-outage'")) == count
        print(f"step exited {took:.0f} s after the server died")
    finally:
        kill_server(server)


def test_sigterm_marks_the_run_killed_and_removes_the_temp_folder(mlflow_server, tmp_path):
    """Airflow's kill sends SIGTERM: the run ends KILLED with the reason, the step's temporary folder
    is gone and the process exits 143 (128 + SIGTERM) within a few seconds."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    spec = {"epochs": 500, "context": {"experiment_name": "tests-faults", "dag_id": "faults",
                                       "run_id": "manual__sigterm", "task_id": "train"}}
    step = StepProcess("train_example", spec, {**mlflow_server.env(), "TMPDIR": str(scratch)})
    step.wait_for_line("epoch 2/500", timeout=600)  # training: the step is at work
    assert [p.name for p in scratch.iterdir() if p.name.startswith("modelopt-train_example-")]
    step.proc.send_signal(signal.SIGTERM)
    code = step.wait(60)
    assert code == 143, step.output[-3000:]
    assert "terminated by SIGTERM" in step.output
    run = mlflow_server.client().get_run(step.run_id())
    assert run.info.status == "KILLED"
    assert run.data.tags["modelopt.status"] == "killed"
    assert "terminated by SIGTERM" in run.data.tags["modelopt.error"]
    assert [p.name for p in scratch.iterdir() if p.name.startswith("modelopt-")] == []


def test_credentials_in_the_tracking_uri_are_used_and_never_printed(mlflow_server):
    """``http://user:password@host`` works (the server here has no auth, so it shows the URI is
    accepted rather than a false exit 4) and the password appears nowhere in the step's output."""
    password = "s3cr3t-Pa55word"
    client = mlflow_server.client()
    run_id = candidate_run(client, "tests-faults", 1)
    with_credentials = mlflow_server.uri.replace("http://", f"http://alice:{password}@")
    context = {"experiment_name": "tests-faults", "dag_id": "faults", "run_id": f"manual__credentials-{run_id}"}
    name = f"faults-credentials-{run_id[:8]}"
    done = run_step("promote", promote_spec(name, run_id, 1, context),
                    {"MLFLOW_TRACKING_URI": with_credentials})
    assert done.returncode == 0, done.output[-3000:].replace(password, "<password>")
    assert password not in done.output
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    unreachable = f"http://alice:{password}@127.0.0.1:{free_port()}"
    failed = run_step("promote", promote_spec(name, run_id, 1, context),
                      {"MLFLOW_TRACKING_URI": unreachable, "MODELOPT_MLFLOW_CONNECT_RETRIES": "1"})
    assert failed.returncode == 4, failed.output[-3000:].replace(password, "<password>")
    assert password not in failed.output
    assert "127.0.0.1" in failed.output
