"""Local-mode steps started from a warm interpreter (``[modelopt] warm_start``, on by default).

The first local-mode task of an ``airflow dags test`` process (Airflow's in-process supervisor),
else a worker process's second, starts ``airflow-modelopt warm`` (the container side's
``container/warm.py``) in the background, with the step's own interpreter and environment;
it imports MLflow and this package once. Each later local step of that process is forked from it,
instead of a fresh Python importing them again: under ``airflow dags test``, which runs every task
of a DAG run in one process, that is over a second a step (issue 12's overhead). A task whose
result is cached on the worker still starts the server, so the steps after it (promotion) find
it warm. Otherwise a process's first task starts none: a scheduler runs each task in a process of
its own, which would pay for a server it never reuses.

A step forked from the server behaves like a ``Popen`` one: its own session, its stdout and stderr
in one pipe to the task log, its spec on stdin, exactly the environment a fresh process would get,
its exit status (negative when a signal ended it), ``killpg`` to stop it. Whatever keeps the
server from starting the step (not ready in time, gone, a refused request) is :class:`Unavailable`
and the launcher starts a fresh process instead: the warm path can make a step faster, never fail
it. A server belongs to one (interpreter, environment, source stamp): a changed environment or an
edited package gets a new server, and the old one is let go. Servers end with the worker
process (their stdin is a pipe from it).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

#: What the server prints once it listens (``container/warm.py``'s ``READY``; the Airflow side does
#: not import the container side).
READY = "modelopt-warm ready"
#: Seconds a step waits for a server still starting before it starts a fresh process instead.
READY_TIMEOUT_S = 60.0
#: Seconds the server may take to answer with the step's pid.
SPAWN_TIMEOUT_S = 30.0
#: Environment variables that differ between tasks but do not matter to what a server preloads:
#: Airflow's per-task context and its task runner's own (``__AIRFLOW_SUPERVISOR_FD``). The step
#: still gets them, exactly.
VOLATILE_PREFIXES = ("AIRFLOW_CTX_", "__AIRFLOW_")


class Unavailable(Exception):  # noqa: N818 - not an error: the reason a fresh process is started
    """The warm server cannot start this step; start a fresh process."""


class WarmServer:
    """One ``airflow-modelopt warm`` process and its socket."""

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="modelopt-warm-"))
        self.socket_path = str(self.folder / "socket")
        self.log_path = self.folder / "server.log"
        self._ready = threading.Event()
        with open(self.log_path, "wb") as errors:
            self.process = subprocess.Popen(
                [python, "-m", "airflow_modelopt", "warm", "--socket", self.socket_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=dict(env),
                start_new_session=True, cwd=self.folder,
            )
        threading.Thread(target=self._watch, name="modelopt-warm-ready", daemon=True).start()

    def _watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.decode(errors="replace").strip() == READY:
                self._ready.set()
                return

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise Unavailable("the warm interpreter is " + ("gone" if self.process.poll() is not None
                                                             else f"not ready after {timeout:.0f} s")
                              + self._log_tail())
        if self.process.poll() is not None:
            raise Unavailable(f"the warm interpreter exited ({self.process.returncode}){self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            return ""
        return (": " + " | ".join(tail)) if tail else ""

    def close(self, wait: bool = True) -> None:
        """Let the server go (its stdin closes: it stops listening; running steps finish); with
        ``wait``, wait for it to exit, else let a thread reap it."""

        def finish() -> None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self.folder, ignore_errors=True)

        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        if wait:
            finish()
        else:
            threading.Thread(target=finish, name="modelopt-warm-close", daemon=True).start()

    def spawn(self, args: list[str], env: Mapping[str, str], stdin_text: str) -> WarmStep:
        """Start ``airflow-modelopt <args>`` as a child of the server; :class:`Unavailable` when it
        cannot be started there (nothing ran)."""
        self.wait_ready(READY_TIMEOUT_S)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stdin_read, stdin_write = os.pipe()
        out_read, out_write = os.pipe()
        try:
            conn.settimeout(SPAWN_TIMEOUT_S)
            conn.connect(self.socket_path)
            request = {"args": args, "env": dict(env), "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(request).encode()], [stdin_read, out_write])
            answers = _lines(conn)
            first = next(answers, None)
        except (OSError, ValueError) as exc:  # ValueError: an answer that is not JSON
            for fd in (stdin_read, stdin_write, out_read, out_write):
                os.close(fd)
            conn.close()
            raise Unavailable(f"the warm interpreter did not take the step: {exc}") from None
        os.close(stdin_read)
        os.close(out_write)
        if not first or "pid" not in first:
            os.close(stdin_write)
            os.close(out_read)
            conn.close()
            raise Unavailable(f"the warm interpreter did not start the step: {(first or {}).get('error', 'no answer')}")
        conn.settimeout(None)  # the step runs as long as it runs
        with os.fdopen(stdin_write, "w") as stdin:
            try:
                stdin.write(stdin_text)
            except BrokenPipeError:  # the step ended before reading its spec: its exit status says why
                pass
        return WarmStep(int(first["pid"]), os.fdopen(out_read, "r", errors="replace"), conn, answers)


def _lines(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The server's JSON answers on ``conn``, one per line."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


class WarmStep:
    """A step forked from the warm server, used like a ``subprocess.Popen``: ``pid``, ``stdout``
    (text lines), ``wait()``, ``poll()``, ``returncode``."""

    def __init__(self, pid: int, stdout: IO[str], conn: socket.socket, answers: Iterator[dict[str, Any]]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._conn = conn
        self._answers = answers

    def wait(self) -> int:
        if self.returncode is None:
            answer = next(self._answers, None)
            self._conn.close()
            self.stdout.close()
            # No answer: the waiter was killed (SIGKILL of the server's process group); say what kill -9 says.
            self.returncode = int(answer["exit"]) if answer and "exit" in answer else -9
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return self.wait()
            except PermissionError:
                pass
        return self.returncode


log = logging.getLogger(__name__)
_lock = threading.Lock()
_servers: dict[tuple[Any, ...], WarmServer] = {}


def _key(python: str, env: Mapping[str, str]) -> tuple[Any, ...]:
    from airflow_modelopt.operators.worker_cache import local_code_digest

    stable = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(VOLATILE_PREFIXES)))
    return os.path.abspath(python), stable, local_code_digest()


#: Local-mode tasks this process has started (:func:`note_task`).
_tasks = 0


def note_task() -> None:
    """Count a local-mode task of this process (its operator calls this as it starts)."""
    global _tasks
    _tasks += 1


#: Set in this process's environment while Airflow's in-process supervisor runs a task (``airflow
#: dags test``, ``dag.test()``); a task process a scheduler's executor forked has no such variable.
IN_PROCESS_MARKER = "__AIRFLOW_SUPERVISOR_FD"


def runs_many_tasks() -> bool:
    """This process runs a DAG run's tasks one after another: it has run a local-mode task before,
    or Airflow runs its tasks in-process (``airflow dags test``)."""
    return _tasks >= 2 or IN_PROCESS_MARKER in os.environ


def usable(python: str) -> bool:
    """Warm starts are on, the step runs in this worker's interpreter (whose sources the server's
    key stamps), and this process runs many tasks (:func:`runs_many_tasks`): a process that runs one
    task (a scheduler's task process) would only pay for a server it never reuses, while under
    ``airflow dags test`` the first local task starts it and every step of the run is forked from it."""
    from airflow_modelopt import config

    return (runs_many_tasks() and config.get_bool("warm_start") and sys.platform != "win32"
            and os.path.abspath(python) == os.path.abspath(sys.executable))


def server(python: str, env: Mapping[str, str]) -> WarmServer:
    """The server for this interpreter, environment and sources, started when there is none; a
    server of another key (an edited package, another environment) is let go."""
    key = _key(python, env)
    with _lock:
        current = _servers.get(key)
        if current is not None and current.process.poll() is None:
            return current
        for old_key, other in list(_servers.items()):
            if old_key != key:
                changed = sorted(dict(old_key[1]).items() ^ dict(key[1]).items())
                log.info("Warm interpreter restarted: %s changed", "the package's sources" if old_key[2] != key[2]
                         else "the interpreter" if old_key[0] != key[0]
                         else "the environment (" + ", ".join(sorted({k for k, _ in changed})) + ")")
            other.close(wait=False)
        _servers.clear()
        try:
            _servers[key] = WarmServer(python, env)
        except OSError as exc:
            raise Unavailable(f"the warm interpreter could not be started: {exc}") from None
        return _servers[key]


def prestart(python: str, env: Mapping[str, str]) -> None:
    """Start the server in the background when warm starts are usable; never fails."""
    try:
        if usable(python):
            server(python, env)
    except Exception:  # noqa: BLE001, S110 - a missed warm-up costs a fresh process, nothing more
        pass


@atexit.register
def _close_all() -> None:
    with _lock:
        for s in _servers.values():
            s.close()
        _servers.clear()


__all__ = ["Unavailable", "WarmServer", "WarmStep", "note_task", "prestart", "runs_many_tasks", "server", "usable"]
