"""E2E tier: a real Airflow 3 on loopback and its UI in headless Chromium.

The stack is what a user runs: `airflow api-server`, `airflow scheduler` (LocalExecutor) and
`airflow dag-processor` as separate processes on a temporary SQLite AIRFLOW_HOME, SimpleAuthManager
with every user an admin (no login form), the project's dags/ folder, steps in local mode, and the
`mlflow_default` connection on the session's real MLflow server.

The browser is Debian's Chromium (/usr/bin/chromium, or $MODELOPT_CHROMIUM) driven by the
`playwright` Python package; no browser is ever downloaded (never `playwright install`).
Without Chromium or playwright the tier skips, unless MODELOPT_REQUIRE_E2E=1 (CI sets it), which
turns the skip into a failure. scripts/ci-install-browser.sh provisions both.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MlflowServer, free_port, make_airflow_home, skip_unless_available, wait_http

CHROMIUM = Path(os.environ.get("MODELOPT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
    "--disable-component-update", "--disable-sync",
]
STARTUP_TIMEOUT = 180.0
PROCESSES = ("dag-processor", "scheduler", "api-server")
FAILED_STATES = ("failed", "upstream_failed")


def e2e_unavailable() -> str | None:
    """None when the browser tier can run here, else why not."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium, or run scripts/ci-install-browser.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _e2e_requirements() -> None:
    """Skip (or, with MODELOPT_REQUIRE_E2E=1, fail) before any server starts."""
    skip_unless_available(e2e_unavailable(), "MODELOPT_REQUIRE_E2E", "e2e tests need Chromium and playwright")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """On a failure, append the Airflow processes' and the last DAG run's log tails to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    if report.failed and report.when in ("setup", "call"):
        stack = getattr(item, "funcargs", {}).get("airflow_ui")
        if isinstance(stack, AirflowUI):
            report.sections.append(("Airflow diagnostics", stack.diagnostics()))


_FAILED = pytest.StashKey[bool]()


def _tail(path: Path, lines: int) -> str:
    """The last lines of a log, without the api-server's access log (one line per UI request)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join([line for line in text.splitlines() if "[http.access]" not in line][-lines:])


@dataclass
class AirflowUI:
    """A running Airflow: its UI/API base URL, home and processes."""

    url: str
    home: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    last_run: tuple[str, str] | None = None  # (dag_id, run_id) the diagnostics report on

    def log(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def start(self) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        port = self.url.rsplit(":", 1)[1]
        commands = {
            "dag-processor": [airflow, "dag-processor"],
            "scheduler": [airflow, "scheduler"],
            "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", port, "--workers", "1"],
        }
        for name in PROCESSES:
            with open(self.log(name), "wb") as out:
                # Own session, so stop() ends the process and every worker it forked.
                self.procs[name] = subprocess.Popen(
                    commands[name], stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                    start_new_session=True,
                )

    def assert_running(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"Airflow process(es) exited: {dead}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever of the group is still there (the process or its workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """Call the REST API v2 (the all-admins middleware authorizes every request)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/api/v2/{path.lstrip('/')}", data=data, method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_until_ready(self, dag_id: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """The API answers, the scheduler heartbeats and the DAG is parsed (without import errors)."""
        deadline = time.monotonic() + timeout
        wait_http(f"{self.url}/api/v2/monitor/health", timeout=timeout, proc=self.procs["api-server"])
        last: Any = None
        while time.monotonic() < deadline:
            self.assert_running()
            status, dag = self.api("GET", f"dags/{dag_id}")
            _, health = self.api("GET", "monitor/health")
            scheduler_ok = isinstance(health, dict) and (health.get("scheduler") or {}).get("status") == "healthy"
            if status == 200 and scheduler_ok:
                return
            _, errors = self.api("GET", "importErrors")
            if isinstance(errors, dict) and errors.get("import_errors"):
                raise RuntimeError(f"DAG import errors: {json.dumps(errors['import_errors'])[:3000]}")
            last = (status, dag, health)
            time.sleep(2)
        raise TimeoutError(f"Airflow not ready within {timeout:.0f} s (DAG {dag_id!r}, last answer {last})")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        status, body = self.api("GET", f"dags/{dag_id}/dagRuns?limit=100")
        assert status == 200, body
        return body["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Poll until the run is success or failed; returns the state (raises on timeout)."""
        self.last_run = (dag_id, run_id)
        path = f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            self.assert_running()
            status, run = self.api("GET", path)
            if status == 200:
                state = run["state"]
                if state in ("success", "failed"):
                    return state
            time.sleep(3)
        raise TimeoutError(f"DAG run {run_id} still {state!r} after {timeout:.0f} s")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        status, body = self.api(
            "GET", f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances?limit=200")
        if status != 200:
            return {"<error>": f"{status} {body}"}
        return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}

    def diagnostics(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            parts.append(f"--- {name} (pid {proc.pid}, exit {proc.poll()}) {self.log(name)}\n{_tail(self.log(name), 40)}")
        if self.last_run:
            dag_id, run_id = self.last_run
            try:
                states = self.task_states(dag_id, run_id)
            except OSError as exc:
                states = {"<error>": str(exc)}
            parts.append(f"--- task states of {dag_id} / {run_id}\n{json.dumps(states, indent=1)}")
            failed = {t for t, s in states.items() if s in FAILED_STATES}
            for path in sorted((self.home / "logs").rglob("*.log")):
                task = next((p.split("=", 1)[1] for p in path.parts if p.startswith("task_id=")), None)
                if f"run_id={run_id}" in str(path) and task in failed:
                    parts.append(f"--- task log {path}\n{_tail(path, 40)}")
        return "\n".join(parts)


@pytest.fixture(scope="session")
def airflow_ui(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> AirflowUI:
    """api-server + scheduler + dag-processor on a fresh SQLite home; stopped at session end."""
    home_dir = tmp_path_factory.mktemp("airflow-e2e")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # One secret for the api-server and the task processes the scheduler starts.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        # Loopback ports of their own: other suites or engineers may run an Airflow beside this one.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__MODELOPT__EXECUTION_MODE": "local",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server.uri,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    home = make_airflow_home(home_dir, env)  # `airflow db migrate`
    migrated = time.monotonic()
    stack = AirflowUI(url=url, home=home_dir, env=home.env)
    stack.start()
    try:
        stack.wait_until_ready("modelopt_optimize")
        print(f"Airflow at {url}: db migrate {migrated - started:.0f} s, "
              f"processes ready and DAG parsed {time.monotonic() - migrated:.0f} s later")
    except BaseException as exc:
        diagnostics = stack.diagnostics()
        stack.stop()
        raise RuntimeError(f"Airflow did not start: {exc}\n{diagnostics}") from None
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A fresh browser context per test; a screenshot `failure.png` in tmp_path when the test fails."""
    from playwright.sync_api import expect

    # A busy CI machine renders slowly: 30 s for every action and assertion (not Playwright's 5 s).
    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    try:
        yield pg
    finally:
        if request.node.stash.get(_FAILED, False):
            try:
                pg.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
            except Exception as exc:  # the page may be gone; the test's own error matters more
                print(f"no failure screenshot: {exc}")
        context.close()
