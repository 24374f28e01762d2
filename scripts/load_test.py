#!/usr/bin/env python
"""Load test of the real stack: N concurrent ``modelopt_optimize`` runs, optionally through an
MLflow outage.

It starts, on 127.0.0.1 only, and stops again whatever happens:

* a throwaway PostgreSQL (``initdb`` + ``pg_ctl``; as user ``nobody`` when run as root) holding two
  databases, ``airflow`` and ``mlflow``, each with its own password role reached over TCP;
* ``mlflow server --serve-artifacts`` on the ``mlflow`` database (``postgresql+psycopg2://``);
* Airflow 3 on the ``airflow`` database (``postgresql+psycopg2://``; its async engine uses
  ``asyncpg``): ``api-server``, ``scheduler`` (LocalExecutor, ``parallelism`` 4) and
  ``dag-processor`` on the project's ``dags/``, steps in local mode, ``mlflow_default`` on the
  server above, a short ``retry_delay`` so retried steps come back in seconds.

Then it trains the example model once (``train_example``, 2 epochs), triggers N runs of
``modelopt_optimize`` at once through the REST API, with registered model names that overlap
(run i promotes into ``loadtest-<i mod names>``), and with ``--outage`` kills the MLflow server
(SIGKILL, whole process group) as soon as a step is in flight, keeps it down ``--outage-seconds``,
and starts it again on the same port and store. ``--failing-runs K`` makes K of the runs request a
target that cannot be built here (TensorRT without a GPU), so their promotion has no passing
candidate.

Checks, once every run has ended (all bounded by ``--timeout``):

* no duplicate model versions: per registered name, each ``modelopt.candidate_key`` once;
* no MLflow run left RUNNING, in any experiment;
* every DAG run's state is truthful: ``failed`` when its promotion had no passing candidate (no
  validation of that DAG run passed, or the parent run's ``modelopt.outcome`` says none_passed or
  error), ``success`` otherwise;
* every DAG run ended within the time limit.

It prints one row per DAG run and a last line
``load test: 6 runs in 129 s (2.8 runs/min); duplicate versions 0; RUNNING runs 0; DAG states truthful: yes``,
and exits 1 when a check failed, 2 when the stack could not be set up. ``--json PATH`` writes the
same numbers for a test to read.

    .venv/bin/python scripts/load_test.py --runs 6 --outage
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "modelopt_optimize"
#: Tags the steps write (airflow_modelopt/container/steps/promote.py, validate.py, tracking.py).
TAG_KEY = "modelopt.candidate_key"
TAG_OUTCOME = "modelopt.outcome"
TAG_VERDICT = "modelopt.verdict"
TAG_ROLE = "modelopt.role"
TAG_RUN_ID = "airflow.run_id"
TAG_DAG_ID = "airflow.dag_id"
TAG_TASK_ID = "airflow.task_id"
PASSING_OUTCOMES = ("all_passed", "some_failed")
#: Task ids of the steps whose MLflow calls an outage interrupts (the others run no step).
STEP_TASK_PREFIXES = ("optimize.export_onnx", "optimize.validate_", "optimize.benchmark_", "optimize.promote")
#: Same as the tests' MLflow servers (tests/conftest.py): no worker restarts on a slow machine, no job runner.
MLFLOW_SERVER_ENV = {"UVICORN_TIMEOUT_WORKER_HEALTHCHECK": "120", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class SetupError(RuntimeError):
    """The stack could not be started (exit 2, not a failed check)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, without HTTP access lines."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"<no {path}>"
    return "\n".join([line for line in text if "[http.access]" not in line and '"GET /' not in line][-lines:])


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"time limit reached while {what}")


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Service:
    """A long-running process in its own session, so stopping it ends every worker it forked."""

    name: str
    argv: list[str]
    env: dict[str, str]
    logfile: Path
    cwd: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # whatever of the group is left
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Postgres:
    root: Path
    port: int
    run_as: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        if os.geteuid() == 0:  # initdb refuses to run as root
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self.run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        try:
            subprocess.run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                           check=True, capture_output=True, timeout=180, cwd=self.root, **self.run_as)
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                       "-c fsync=off -c max_connections=200")
            subprocess.run(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                            "-w", "-t", "120", "start"], check=True, capture_output=True, timeout=150,
                           cwd=self.root, **self.run_as)
        except subprocess.CalledProcessError as exc:
            raise SetupError(f"{exc.cmd[0]} failed: {exc.stderr.decode()[-2000:]}\n"
                             f"{tail(self.root / 'postgres.log')}") from None

    def create_database(self, name: str) -> str:
        """A role and database ``name`` with a fresh password; returns the password."""
        import psycopg2

        password = secrets.token_hex(16)
        conn = psycopg2.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {name} OWNER {name}")
        conn.close()
        return password

    def url(self, name: str, password: str) -> str:
        return f"postgresql+psycopg2://{name}:{password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60, cwd=self.root, **self.run_as)


def postgres_unavailable() -> str | None:
    """None when this machine can run the load test's PostgreSQL, else why not."""
    missing_mods = []
    for module, package in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg")):
        try:
            __import__(module)
        except ImportError:
            missing_mods.append(package)
    if missing_mods:
        return f"not installed: {', '.join(missing_mods)} (pip install 'airflow-modelopt[airflow,postgres]')"
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if shutil.which(tool) is None]
    if missing:
        return f"PostgreSQL server tools not on PATH: {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user 'nobody' to run PostgreSQL as"
    return None


# -- the stack ---------------------------------------------------------------------------------


class Stack:
    def __init__(self, work: Path, parallelism: int, retry_delay: int, max_active_runs: int,
                 execution_api_timeout: float = 30.0) -> None:
        self.work = work
        self.python = sys.executable
        self.bin = Path(sys.executable).parent
        # PostgreSQL runs as 'nobody' when we are root: its folder must be reachable by that user, so it
        # lives in a fresh folder of its own under the system temp dir, not under the work folder
        # (pytest's tmp_path, for one, is private to root).
        self.pg = Postgres(Path(tempfile.mkdtemp(prefix="modelopt-load-pg-")), free_port())
        self.mlflow_port = free_port()
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.home = work / "airflow"
        self.home.mkdir()
        self.parallelism = parallelism
        self.retry_delay = retry_delay
        self.max_active_runs = max_active_runs
        self.execution_api_timeout = execution_api_timeout
        self.mlflow: Service | None = None
        self.airflow: list[Service] = []
        self.mlflow_backend = ""
        self.airflow_env: dict[str, str] = {}

    # MLflow
    def start_mlflow(self, timeout: float) -> None:
        root = self.work / "mlflow"
        root.mkdir(exist_ok=True)
        argv = [self.python, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                "--backend-store-uri", self.mlflow_backend, "--artifacts-destination", str(root / "artifacts"),
                "--serve-artifacts", "--workers", "1"]
        env = {**os.environ, **MLFLOW_SERVER_ENV}
        self.mlflow = Service("mlflow", argv, env, root / "server.log", root)
        self.mlflow.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.mlflow.alive():
                raise SetupError(f"mlflow server exited with {self.mlflow.proc.returncode}:\n"
                                 f"{tail(self.mlflow.logfile)}")
            if http_ok(f"{self.mlflow_uri}/health"):
                return
            time.sleep(1)
        raise SetupError(f"mlflow server did not answer within {timeout:.0f} s:\n{tail(self.mlflow.logfile)}")

    # Airflow
    def airflow_environment(self, airflow_db: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": str(self.max_active_runs),
            # Paused: the scheduled modelopt_retrain_and_optimize must not compete; the test unpauses its DAG.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # Retried steps (exit 4: MLflow unreachable) come back in seconds, not 5 minutes.
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": str(self.retry_delay),
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # A task process gives up when the api-server does not answer its Execution API calls in
            # time (5 retries of this timeout) and is killed; a loaded CI machine needs more than 5 s.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": str(self.execution_api_timeout),
            "AIRFLOW__MODELOPT__EXECUTION_MODE": "local",
            "AIRFLOW_CONN_MLFLOW_DEFAULT": self.mlflow_uri,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start_airflow(self, airflow_db: str, timeout: float) -> None:
        self.airflow_env = self.airflow_environment(airflow_db)
        airflow = str(self.bin / "airflow")
        migrate = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, timeout=timeout,
                                 env=self.airflow_env, cwd=self.home)
        if migrate.returncode != 0:
            raise SetupError(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-3000:]}")
        commands = {
            "dag-processor": [airflow, "dag-processor"],
            "scheduler": [airflow, "scheduler"],
            "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                           "--workers", "1"],
        }
        for name, argv in commands.items():
            service = Service(name, argv, self.airflow_env, self.home / f"{name}.log", self.home)
            service.start()
            self.airflow.append(service)

    def assert_airflow_running(self) -> None:
        dead = {s.name: s.proc.returncode for s in self.airflow if not s.alive()}
        if dead:
            raise SetupError(f"Airflow process(es) exited: {dead}\n" + self.diagnostics())

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.api_url}/api/v2/{path.lstrip('/')}", data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError as exc:  # not up yet, or too busy to answer in time
            return 0, str(exc)
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_airflow_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.assert_airflow_running()
            status, dag = self.api("GET", f"dags/{DAG_ID}", timeout=10)
            _, health = self.api("GET", "monitor/health", timeout=10)
            healthy = isinstance(health, dict) and (health.get("scheduler") or {}).get("status") == "healthy"
            if status == 200 and healthy:
                if dag.get("is_paused"):
                    self.api("PATCH", f"dags/{DAG_ID}", {"is_paused": False})
                    continue
                return
            _, errors = self.api("GET", "importErrors", timeout=10)
            if isinstance(errors, dict) and errors.get("import_errors"):
                raise SetupError(f"DAG import errors: {json.dumps(errors['import_errors'])[:3000]}")
            last = (status, health)
            time.sleep(3)
        raise SetupError(f"Airflow not ready within {timeout:.0f} s (last answer {last})\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = [f"--- {s.name} (exit {s.proc.poll() if s.proc else None}) {s.logfile}\n{tail(s.logfile)}"
                 for s in [*self.airflow, *([self.mlflow] if self.mlflow else [])]]
        return "\n".join(parts)

    def stop(self) -> None:
        for service in reversed(self.airflow):
            service.stop()
        if self.mlflow is not None:
            self.mlflow.stop()
        self.pg.stop()
        shutil.rmtree(self.pg.root, ignore_errors=True)


# -- the load ----------------------------------------------------------------------------------


def train_example(stack: Stack, timeout: float) -> dict[str, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": stack.mlflow_uri}
    spec = {"epochs": 2, "context": {"experiment_name": "loadtest-inputs"}}
    proc = subprocess.run([str(stack.bin / "airflow-modelopt"), "run", "train_example", "--spec", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=stack.work)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise SetupError(f"train_example failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])["artifacts"]


def run_confs(n: int, failing: int, names: int, artifacts: dict[str, str], targets: list[str],
              force: bool) -> list[tuple[str, dict[str, Any], bool]]:
    """(dag_run_id, conf, expected to have a passing candidate) per run; names overlap round-robin."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    runs = []
    for i in range(n):
        doomed = i >= n - failing
        conf = {
            "model_uri": artifacts["model_pt2"],
            "calibration_data_uri": artifacts["calibration_data"],
            "eval_data_uri": artifacts["eval_data"],
            # TensorRT in local mode on a worker without a GPU: the target's gate refuses it, so the
            # promotion sees no passing candidate.
            "targets": ["tensorrt_fp16"] if doomed else targets,
            "registered_model_name": f"loadtest-{i % names}",
            "force": force,
        }
        runs.append((f"load__{stamp}__{i}{'_nocandidate' if doomed else ''}", conf, not doomed))
    return runs


@dataclass
class RunRecord:
    run_id: str
    name: str
    targets: list[str]
    state: str | None = None
    ended_after_s: float | None = None
    retried_tasks: int = 0
    outcome: str | None = None
    passed_validations: int = 0
    expected: str | None = None
    #: Whether the run was built to have a passing candidate (not one of --failing-runs).
    meant_to_pass: bool = True


def trigger(stack: Stack, runs: list[tuple[str, dict[str, Any], bool]]) -> list[RunRecord]:
    records = []
    for run_id, conf, meant in runs:
        status, body = stack.api("POST", f"dags/{DAG_ID}/dagRuns",
                                 {"dag_run_id": run_id, "logical_date": None, "conf": conf})
        if status not in (200, 201):
            raise SetupError(f"triggering {run_id} answered {status}: {body}")
        records.append(RunRecord(run_id, conf["registered_model_name"], conf["targets"], meant_to_pass=meant))
    return records


def task_instances(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    status, body = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
                                    "?limit=200", timeout=30)
    return body.get("task_instances", []) if status == 200 and isinstance(body, dict) else []


def step_in_flight(stack: Stack, records: list[RunRecord]) -> str | None:
    """A step task running in one of the runs (one light API call: the api-server also serves the tasks)."""
    status, body = stack.api("GET", f"dags/{DAG_ID}/dagRuns/~/taskInstances?state=running&limit=100", timeout=30)
    ours = {r.run_id for r in records}
    for ti in body.get("task_instances", []) if status == 200 and isinstance(body, dict) else []:
        if ti["dag_run_id"] in ours and ti["task_id"].startswith(STEP_TASK_PREFIXES):
            return f"{ti['dag_run_id']} / {ti['task_id']}"
    return None


def outage(stack: Stack, records: list[RunRecord], seconds: float, deadline: Deadline,
           report: dict[str, Any]) -> None:
    """Kill the MLflow server once a step is running, keep it down ``seconds``, start it again."""
    while True:
        deadline.check("waiting for a step to be in flight before the outage")
        victim = step_in_flight(stack, records)
        if victim:
            break
        if all(state in ("success", "failed") for state in poll_states(stack, records).values()):
            raise RuntimeError("every run ended before any step was seen running: no outage happened")
        time.sleep(5)
    log(f"MLflow outage: killing the server while {victim} runs")
    stack.mlflow.kill(signal.SIGKILL)
    stack.mlflow.proc.wait(30)
    down = time.monotonic()
    time.sleep(seconds)
    log(f"MLflow outage: restarting on port {stack.mlflow_port} after {time.monotonic() - down:.0f} s")
    stack.start_mlflow(timeout=max(60.0, min(600.0, deadline.left())))
    report["outage"] = {"during": victim, "down_s": round(time.monotonic() - down, 1)}
    log(f"MLflow back after {report['outage']['down_s']} s down")


def poll_states(stack: Stack, records: list[RunRecord]) -> dict[str, str | None]:
    status, body = stack.api("GET", f"dags/{DAG_ID}/dagRuns?limit=1000", timeout=30)
    if status != 200 or not isinstance(body, dict):
        return {r.run_id: r.state for r in records}
    states = {run["dag_run_id"]: run["state"] for run in body["dag_runs"]}
    return {r.run_id: states.get(r.run_id) for r in records}


def wait_for_runs(stack: Stack, records: list[RunRecord], started: float, deadline: Deadline) -> None:
    last_line = ""
    while True:
        stack.assert_airflow_running()
        states = poll_states(stack, records)
        for record in records:
            state = states[record.run_id]
            if state in ("success", "failed") and record.state not in ("success", "failed"):
                record.ended_after_s = round(time.monotonic() - started, 1)
            record.state = state or record.state
        counts = Counter(r.state for r in records)
        line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        if line != last_line:
            log(f"DAG runs: {line}")
            last_line = line
        if all(r.state in ("success", "failed") for r in records):
            return
        if deadline.left() <= 0:
            return
        time.sleep(5)


# -- the checks --------------------------------------------------------------------------------


def check(stack: Stack, records: list[RunRecord]) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    duplicates: dict[str, dict[str, int]] = {}
    versions_per_name: dict[str, int] = {}
    for name in sorted({r.name for r in records}):
        versions = client.search_model_versions(f"name = '{name}'")
        versions_per_name[name] = len(versions)
        per_key = Counter(v.tags.get(TAG_KEY, "<no candidate key>") for v in versions)
        dups = {key: n for key, n in per_key.items() if n > 1}
        if dups:
            duplicates[name] = dups
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", run_view_type=ViewType.ACTIVE_ONLY,
                                 max_results=1000)
    running_rows = [{"run_id": r.info.run_id, "name": r.info.run_name,
                     "dag_run": r.data.tags.get(TAG_RUN_ID), "task": r.data.tags.get(TAG_TASK_ID)} for r in running]
    untruthful = []
    for record in records:
        runs = client.search_runs(experiments, f"tags.`{TAG_RUN_ID}` = '{record.run_id}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "dag_run"]
        record.outcome = parents[0].data.tags.get(TAG_OUTCOME) if parents else None
        record.passed_validations = len({r.data.tags.get(TAG_TASK_ID) for r in runs
                                         if r.data.tags.get(TAG_VERDICT) == "passed"})
        had_passing = record.passed_validations > 0 and record.outcome in PASSING_OUTCOMES
        record.expected = "success" if had_passing else "failed"
        record.retried_tasks = sum(1 for ti in task_instances(stack, record.run_id)
                                   if (ti.get("try_number") or 1) > 1)
        if record.state != record.expected:
            untruthful.append(record.run_id)
    return {"duplicates": duplicates, "duplicate_versions": sum(n - 1 for d in duplicates.values() for n in d.values()),
            "versions_per_name": versions_per_name, "running": running_rows, "untruthful": untruthful}


def print_table(records: list[RunRecord]) -> None:
    header = ("dag run", "registered name", "targets", "state", "expected", "outcome", "passed", "retried", "ended s")
    rows = [(r.run_id, r.name, ",".join(r.targets), str(r.state), str(r.expected), str(r.outcome),
             str(r.passed_validations), str(r.retried_tasks), str(r.ended_after_s)) for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="concurrent DAG runs (default 6)")
    parser.add_argument("--outage", action="store_true", help="kill and restart the MLflow server during the runs")
    parser.add_argument("--outage-seconds", type=float, default=25.0, help="how long MLflow stays down (25)")
    parser.add_argument("--failing-runs", type=int, default=0,
                        help="runs (of --runs) that request a target this worker cannot build, so no candidate passes")
    parser.add_argument("--names", type=int, default=0,
                        help="registered model names the runs share round-robin (default: half the runs, at least 1)")
    parser.add_argument("--targets", default="onnx_fp32", help="comma-separated targets of each run (onnx_fp32)")
    parser.add_argument("--force", action="store_true", help="rebuild instead of reusing cached step runs")
    parser.add_argument("--parallelism", type=int, default=4, help="Airflow [core] parallelism (4)")
    parser.add_argument("--retry-delay", type=int, default=5, help="Airflow default task retry delay, seconds (5)")
    parser.add_argument("--execution-api-timeout", type=float, default=30.0,
                        help="Airflow [workers] execution_api_timeout, seconds (30; Airflow's 5 kills tasks on a busy machine)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="limit for the whole test, seconds (1800)")
    parser.add_argument("--workdir", type=Path, help="where the stack lives (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) after the test")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or not 0 <= args.failing_runs <= args.runs:
        parser.error("--runs must be at least 1 and --failing-runs between 0 and --runs")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    names = args.names or max(1, args.runs // 2)

    reason = postgres_unavailable()
    if reason:
        print(f"load test cannot run: {reason}", file=sys.stderr)
        return 2
    if args.failing_runs:
        sys.path.insert(0, str(REPO))
        from airflow_modelopt.pipelines import gpu_visible

        if gpu_visible():
            print("--failing-runs uses a TensorRT target on a worker without a GPU; this machine has one",
                  file=sys.stderr)
            return 2

    deadline = Deadline(args.timeout)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="modelopt-load-"))
    work.mkdir(parents=True, exist_ok=True)
    stack = Stack(work, args.parallelism, args.retry_delay, max(16, args.runs), args.execution_api_timeout)
    stopped = False

    def stop_everything() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            log("stopping the stack")
            stack.stop()
            if not args.keep and not args.workdir:
                shutil.rmtree(work, ignore_errors=True)

    atexit.register(stop_everything)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {"runs": args.runs, "failing_runs": args.failing_runs, "names": names,
                              "targets": targets, "outage_requested": args.outage, "workdir": str(work)}
    try:
        t0 = time.monotonic()
        log(f"work folder {work}; starting PostgreSQL on 127.0.0.1:{stack.pg.port}")
        stack.pg.start()
        stack.mlflow_backend = stack.pg.url("mlflow", stack.pg.create_database("mlflow"))
        airflow_db = stack.pg.url("airflow", stack.pg.create_database("airflow"))
        log(f"starting the MLflow server on {stack.mlflow_uri} (backend PostgreSQL, --serve-artifacts)")
        stack.start_mlflow(timeout=min(600.0, deadline.left()))
        log("starting Airflow (db migrate, dag-processor, scheduler, api-server) on PostgreSQL")
        stack.start_airflow(airflow_db, timeout=min(900.0, deadline.left()))
        log("training the example model (2 epochs) for the runs' inputs")
        artifacts = train_example(stack, timeout=min(900.0, deadline.left()))
        stack.wait_airflow_ready(timeout=min(900.0, deadline.left()))
        report["setup_s"] = round(time.monotonic() - t0, 1)
        log(f"stack ready after {report['setup_s']} s; triggering {args.runs} runs")

        runs = run_confs(args.runs, args.failing_runs, names, artifacts, targets, args.force)
        started = time.monotonic()
        records = trigger(stack, runs)
        if args.outage:
            outage(stack, records, args.outage_seconds, deadline, report)
        wait_for_runs(stack, records, started, deadline)
        unfinished = [r.run_id for r in records if r.state not in ("success", "failed")]
        elapsed = max((r.ended_after_s or 0.0 for r in records), default=0.0) or (time.monotonic() - started)
        if not stack.mlflow.alive() or not http_ok(f"{stack.mlflow_uri}/health"):
            raise SetupError(f"the MLflow server is not answering for the checks:\n{tail(stack.mlflow.logfile)}")
        results = check(stack, records)
    except (SetupError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"load test could not complete: {exc}", file=sys.stderr)
        try:
            print(stack.diagnostics(), file=sys.stderr)
        except Exception:
            pass
        report["error"] = str(exc)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        stop_everything()
        return 2
    except RuntimeError as exc:  # e.g. no outage could be made
        print(f"load test failed: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        stop_everything()
        return 1

    print()
    print_table(records)
    print()
    if results["duplicates"]:
        print(f"duplicate versions: {json.dumps(results['duplicates'])}")
    for row in results["running"]:
        print(f"left RUNNING: {row}")
    if unfinished:
        print(f"not finished within the time limit: {', '.join(unfinished)}")
    # Not a check (a failed run is truthful when nothing passed), but what a load test is for.
    lost = [r.run_id for r in records if r.meant_to_pass and r.state == "failed"]
    if lost:
        print(f"runs that had a buildable candidate but failed: {', '.join(lost)}")
    truthful = not results["untruthful"] and not unfinished
    per_minute = len(records) / elapsed * 60 if elapsed else 0.0
    report.update({
        "elapsed_s": round(elapsed, 1), "runs_per_minute": round(per_minute, 2),
        "duplicate_versions": results["duplicate_versions"], "duplicates": results["duplicates"],
        "versions_per_name": results["versions_per_name"], "running_runs": len(results["running"]),
        "running": results["running"], "truthful": truthful, "untruthful": results["untruthful"],
        "unfinished": unfinished, "lost_runs": lost, "dag_runs": [r.__dict__ for r in records],
    })
    outage_ok = not args.outage or "outage" in report
    ok = results["duplicate_versions"] == 0 and not results["running"] and truthful and outage_ok
    report["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    outage_note = f"; MLflow down {report['outage']['down_s']} s" if "outage" in report else ""
    print(f"load test: {len(records)} runs in {elapsed:.0f} s ({per_minute:.1f} runs/min){outage_note}; "
          f"duplicate versions {results['duplicate_versions']}; RUNNING runs {len(results['running'])}; "
          f"DAG states truthful: {'yes' if truthful else 'no'}", flush=True)
    if not ok and (args.keep or args.workdir):
        print(f"logs: {work}")
    stop_everything()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()  # the stack is stopped by now (an unexpected error stops it through atexit instead)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: after importing MLflow its final garbage collection alone
    # takes minutes on a loaded machine.
    os._exit(code)
