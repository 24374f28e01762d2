"""Local-mode steps forked from the warm interpreter (``operators/warm_start.py``,
``container/warm.py``) behave as fresh processes do: result, environment, exit status, SIGTERM
handling and a dead or late server (then a fresh process runs the step). Real servers, real steps,
a real MLflow server over HTTP."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import pytest

from airflow_modelopt.hooks.mlflow import TrackingConfig
from airflow_modelopt.operators import warm_start
from airflow_modelopt.operators.launchers import LocalLauncher
from airflow_modelopt.operators.train_example import TrainExampleModelOperator
from airflow_modelopt.specs import StepResult


@pytest.fixture
def base_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def server(base_env):
    started = warm_start.WarmServer(sys.executable, base_env)
    yield started
    started.close()


def _train_spec(experiment: str, epochs: int, **context: Any) -> str:
    spec = TrainExampleModelOperator(task_id="train", epochs=epochs).build_spec(None, mode="local")
    spec.context.experiment_name = experiment
    for key, value in context.items():
        setattr(spec.context, key, value)
    return spec.model_dump_json()


class Lines:
    """A warm step's output, read as it comes."""

    def __init__(self, step: warm_start.WarmStep) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(step.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(text in line for line in self.lines):
            time.sleep(0.1)
        assert any(text in line for line in self.lines), "".join(self.lines)[-3000:]

    @property
    def text(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


def test_a_step_forked_from_the_warm_interpreter_runs_with_its_own_environment(mlflow_server, server, base_env):
    """The step gets the request's environment, not the server's: here MLflow's address (the
    server was started without it) and a log level of WARNING (its INFO lines are gone)."""
    env = {**base_env, **mlflow_server.env(), "MODELOPT_LOG_LEVEL": "WARNING"}
    step = server.spawn(["run", "train_example", "--spec", "-"], env, _train_spec("tests-warm", 1))
    out = Lines(step)
    assert step.wait() == 0, out.text[-3000:]
    lines = out.text.strip().splitlines()
    result = StepResult.model_validate_json(lines[-1])
    assert result.step == "train_example" and not result.cache_hit
    assert not [line for line in lines if " INFO " in line], lines[:10]
    run = mlflow_server.client().get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert {a.path for a in mlflow_server.client().list_artifacts(result.mlflow_run_id)} >= {"data", "model"}


def test_sigterm_and_sigkill_end_a_warm_step_as_they_end_a_fresh_one(mlflow_server, server, base_env):
    """SIGTERM to the step's process group (the launcher's kill): exit 143 and the run KILLED.
    SIGKILL: exit -9, as ``subprocess`` reports it. The server serves the next step either way."""
    env = {**base_env, **mlflow_server.env()}
    spec = _train_spec("tests-warm", 500, dag_id="warm", run_id="manual__sigterm", task_id="train")
    step = server.spawn(["run", "train_example", "--spec", "-"], env, spec)
    out = Lines(step)
    out.wait_for("epoch 2/500", timeout=600)
    os.killpg(step.pid, signal.SIGTERM)
    assert step.wait() == 143, out.text[-3000:]
    assert "terminated by SIGTERM" in out.text
    run_id = re.search(r"MLflow run (\w+) \(parent", out.text).group(1)
    assert mlflow_server.client().get_run(run_id).info.status == "KILLED"

    step = server.spawn(["run", "train_example", "--spec", "-"], env, _train_spec("tests-warm", 500))
    out = Lines(step)
    out.wait_for("epoch 2/500", timeout=600)
    os.killpg(step.pid, signal.SIGKILL)
    assert step.wait() == -signal.SIGKILL

    listing = server.spawn(["steps"], env, "")
    assert "train_example" in Lines(listing).text and listing.wait() == 0


def test_a_bad_spec_on_stdin_is_refused_with_exit_2(server, base_env):
    step = server.spawn(["run", "promote", "--spec", "-"], base_env, "{not json")
    out = Lines(step)
    assert step.wait() == 2
    assert "modelopt: error: spec is not valid JSON" in out.text


def test_one_server_per_interpreter_environment_and_sources(base_env, monkeypatch):
    """Tasks differing only in Airflow's per-task context share a server; another environment, or
    edited sources, get a new one and the old one ends; a dead server is replaced."""
    try:
        first = warm_start.server(sys.executable, {**base_env, "AIRFLOW_CTX_TASK_ID": "a"})
        assert warm_start.server(sys.executable, {**base_env, "AIRFLOW_CTX_TASK_ID": "b"}) is first
        other_env = warm_start.server(sys.executable, {**base_env, "MODELOPT_LOG_LEVEL": "DEBUG"})
        assert other_env is not first
        assert first.process.wait(10) == 0 and not os.path.exists(first.socket_path)

        monkeypatch.setattr("airflow_modelopt.operators.worker_cache.local_code_digest", lambda: "edited")
        edited = warm_start.server(sys.executable, {**base_env, "MODELOPT_LOG_LEVEL": "DEBUG"})
        assert edited is not other_env and other_env.process.wait(10) == 0

        edited.wait_ready(60)
        edited.process.kill()
        edited.process.wait(10)
        with pytest.raises(warm_start.Unavailable, match="exited|gone"):
            edited.spawn(["steps"], base_env, "")
        replaced = warm_start.server(sys.executable, {**base_env, "MODELOPT_LOG_LEVEL": "DEBUG"})
        assert replaced is not edited and replaced.process.poll() is None
    finally:
        warm_start._close_all()


def test_usable_only_for_this_interpreter_and_when_switched_on(monkeypatch):
    monkeypatch.setattr(warm_start, "_tasks", 2)
    assert warm_start.usable(sys.executable)
    assert not warm_start.usable("/opt/other/bin/python")
    monkeypatch.setenv("AIRFLOW__MODELOPT__WARM_START", "False")
    assert not warm_start.usable(sys.executable)
    monkeypatch.setenv("AIRFLOW__MODELOPT__WARM_START", "True")
    monkeypatch.setattr(warm_start, "_tasks", 1)  # the process's first task
    monkeypatch.delenv(warm_start.IN_PROCESS_MARKER, raising=False)
    assert not warm_start.usable(sys.executable)
    monkeypatch.setenv(warm_start.IN_PROCESS_MARKER, "7")  # Airflow runs the tasks in-process (dags test)
    assert warm_start.usable(sys.executable)


def _launcher(mlflow_server, epochs: int) -> LocalLauncher:
    operator = TrainExampleModelOperator(task_id="train", epochs=epochs)
    spec = operator.build_spec(None, mode="local")
    spec.context.experiment_name = "tests-warm-launcher"
    tracking = TrackingConfig(mlflow_server.uri, mlflow_server.env(), {}, source="test")
    return LocalLauncher(operator.launch_request(spec, tracking), logging.getLogger("tests.warm"))


def test_the_local_launcher_uses_the_warm_interpreter_and_falls_back_to_a_fresh_process(
        mlflow_server, monkeypatch, caplog):
    """A process's first local task runs its step in a fresh process and starts no server (a
    scheduler's task process runs one task); from its second task on, steps start from the
    server; when the server cannot take a step in time, the launcher says so and runs the same
    step in a fresh process, with the same result."""
    monkeypatch.setattr(warm_start, "_tasks", 0)
    monkeypatch.delenv(warm_start.IN_PROCESS_MARKER, raising=False)
    try:
        first = _launcher(mlflow_server, 2)
        first.prepare()
        with caplog.at_level(logging.INFO, logger="tests.warm"):
            first.launch(None)
        assert "Starting " in caplog.text and "warm interpreter" not in caplog.text
        assert not warm_start._servers

        caplog.clear()
        launcher = _launcher(mlflow_server, 1)
        launcher.prepare()
        with caplog.at_level(logging.INFO, logger="tests.warm"):
            warm = launcher.launch(None)
        assert "from the warm interpreter" in caplog.text and "Starting " not in caplog.text
        assert warm.step == "train_example" and warm.mlflow_run_id

        caplog.clear()
        monkeypatch.setattr(warm_start, "READY_TIMEOUT_S", 0.0)
        monkeypatch.setattr("airflow_modelopt.operators.worker_cache.local_code_digest", lambda: "a new server")
        with caplog.at_level(logging.INFO, logger="tests.warm"):
            fresh = _launcher(mlflow_server, 1).launch(None)
        assert "Warm interpreter unavailable (the warm interpreter is not ready after 0 s" in caplog.text
        assert "Starting " in caplog.text and "from the warm interpreter" not in caplog.text
        assert fresh.step == "train_example" and fresh.mlflow_run_id != warm.mlflow_run_id
        assert fresh.cache_hit  # same spec, same code: the fresh process found the warm one's run
    finally:
        warm_start._close_all()
