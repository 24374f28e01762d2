"""Shared fixtures: a real MLflow tracking server on loopback, the example model, Airflow homes.

Tiers are set by folder (tests/unit -> unit, ...), so `pytest -m unit` runs just the fast ones.
Container tests skip without a Docker engine unless MODELOPT_REQUIRE_DOCKER=1 (CI sets it),
which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "container", "helm", "e2e", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@dataclass
class MlflowServer:
    uri: str
    root: Path

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


#: Environment of every `mlflow server` the tests start. uvicorn restarts a worker that misses a
#: 5 s health check, and on a loaded 2-core machine a worker still importing MLflow misses it again
#: and again; MLflow 3's job runner (GenAI scorers) starts about eight huey consumer processes per
#: server that no test uses.
MLFLOW_SERVER_TEST_ENV = {"UVICORN_TIMEOUT_WORKER_HEALTHCHECK": "120", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """A real `mlflow server --serve-artifacts` on 127.0.0.1 with a SQLite backend."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env={**os.environ, **MLFLOW_SERVER_TEST_ENV},
    )
    try:
        wait_http(f"{uri}/health", timeout=300, proc=proc)  # generous: a loaded 2-core machine starts it slowly
    except Exception:
        proc.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield MlflowServer(uri, root)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


#: A kubeconfig naming a server nothing listens on: the Kubernetes provider builds pods with it, and
#: any call that would reach a cluster fails fast (no cluster runs here).
UNREACHABLE_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@dataclass
class StepRun:
    returncode: int
    output: str
    result: dict[str, Any] | None

    @property
    def error(self) -> str:
        """The entry point's last ``modelopt: error:`` line (the one-line reason a failed step gives)."""
        errors = [line for line in self.output.splitlines() if line.startswith("modelopt: error:")]
        assert errors, f"no 'modelopt: error:' line in the step's output: {self.output[-2000:]}"
        return errors[-1]


def run_step(step: str, spec: dict[str, Any], env: dict[str, str], timeout: float = 900) -> StepRun:
    """The container entry point in a subprocess (local mode without Airflow)."""
    proc = subprocess.run(
        [sys.executable, "-m", "airflow_modelopt", "run", step, "--spec", "-"],
        input=json.dumps(spec), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env},
    )
    result = None
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
    return StepRun(proc.returncode, proc.stdout + proc.stderr, result)


@pytest.fixture(scope="session")
def example_model(mlflow_server: MlflowServer) -> dict[str, Any]:
    """The example digits CNN trained once per session and logged to the test server."""
    run = run_step("train_example", {"context": {"experiment_name": "tests-example"}}, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run.result


@pytest.fixture(scope="session")
def example_onnx(mlflow_server: MlflowServer, example_model: dict[str, Any]) -> dict[str, Any]:
    """The example model exported to ONNX once per session (a models:/ URI of the onnx flavor)."""
    spec = {"model_uri": example_model["artifacts"]["model_pt2"], "data_uri": example_model["artifacts"]["eval_data"],
            "context": {"experiment_name": "tests-example"}}
    run = run_step("torch_to_onnx", spec, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run.result


@dataclass
class AirflowHome:
    path: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 1200, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), *args], capture_output=True, text=True,
            timeout=timeout, env={**self.env, **(extra_env or {})}, cwd=self.path,
        )


def make_airflow_home(path: Path, extra_env: dict[str, str]) -> AirflowHome:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(path),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        **extra_env,
    }
    home = AirflowHome(path, env)
    done = home.run("db", "migrate", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return home


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> AirflowHome:
    """A SQLite Airflow home whose mlflow_default connection points at the test server."""
    return make_airflow_home(
        tmp_path_factory.mktemp("airflow-home"), {"AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server.uri}
    )


def docker_available() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"no Docker engine answers ({proc.stderr.strip()[:200]})"
    return None


def skip_unless_available(reason: str | None, require_var: str, what: str) -> None:
    """Skip a tier whose service is missing, or fail when CI set ``require_var=1``."""
    if reason is None:
        return
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{require_var}=1 but {reason}")
    pytest.skip(f"{what}: {reason}")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    skip_unless_available(docker_available(), "MODELOPT_REQUIRE_DOCKER",
                          "container tests need a Docker engine (start dockerd, or see .ci/run)")


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    socket_dir: str

    def connect(self, **kwargs: Any) -> Any:
        import psycopg2

        return psycopg2.connect(host=kwargs.pop("host", self.host), port=self.port, **kwargs)


def postgres_unavailable() -> str | None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if shutil.which(tool) is None]
    if missing:
        return f"PostgreSQL server tools not on PATH: {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user 'nobody' to run PostgreSQL as"
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1: superuser over the socket (trust), others by password."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(f"this test needs a PostgreSQL server: {reason}")
    root = Path(tempfile.mkdtemp(prefix="modelopt-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data, port = root / "data", free_port()
    try:
        subprocess.run(["initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120, cwd=root, **run_as)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(["pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60",
                        "start"], check=True, capture_output=True, timeout=90, cwd=root, **run_as)
    except subprocess.CalledProcessError as exc:
        log = (root / "postgres.log").read_text()[-2000:] if (root / "postgres.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"{exc.cmd[0]} failed: {exc.stderr.decode()[-2000:]}\n{log}")
    try:
        yield Postgres("127.0.0.1", port, str(root))
    finally:
        subprocess.run(["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60, cwd=root, **run_as)
        shutil.rmtree(root, ignore_errors=True)
