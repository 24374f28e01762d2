"""A warm interpreter for local-mode steps: ``airflow-modelopt warm --socket PATH``.

A local-mode step is a fresh Python process, and before its step starts it pays for importing
MLflow, pydantic and this package: over a second on a quiet CPU, several on a busy one, for every
task. This server pays that once. It imports what every step imports before its MLflow run
starts (:data:`PRELOAD`; then, while idle, the plotting library, :data:`OPTIONAL_PRELOAD`, and the
registered steps' modules; no torch, TensorFlow or ONNX Runtime, whose thread pools and
environment settings belong to the step) and what its first MLflow request sets up (:func:`_prime`),
then listens on a Unix socket. Per request it forks twice:

* a waiter, which reads the request (the entry point's arguments, environment, working folder)
  and two file descriptors (the step's stdin, and the pipe its stdout and stderr go to), forks the
  step, sends back the step's pid, waits for it and sends back its exit status as ``subprocess``
  reports one (negative: killed by that signal);
* the step: a new session (the launcher stops it with ``killpg``, as a ``Popen`` step), the
  descriptors as 0, 1 and 2, exactly the request's environment and folder, then the entry point
  (:func:`airflow_modelopt.container.cli.main`) and its fast exit. What it does from there is
  what a fresh process does.

The server ends when its stdin reaches end of file: the worker that started it is gone (or let
it go). It never runs step code itself, so a failing step cannot take it down. The Airflow side
(``operators/warm_start.py``) starts it with the step's own interpreter and environment, and
restarts it when the package's sources change.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

#: Printed on stdout once the server listens.
READY = "modelopt-warm ready"
#: Imported before the first fork: what ``airflow-modelopt run`` imports before its step's code.
PRELOAD = ("mlflow", "mlflow.tracking", "airflow_modelopt.specs", "airflow_modelopt.container.runner",
           "airflow_modelopt.container.tracking")
#: Imported too when installed, once the server has been idle for ``IDLE_S`` after it is ready:
#: the plotting the promote and benchmark steps do (half a second).
OPTIONAL_PRELOAD = ("matplotlib.pyplot",)
IDLE_S = 0.2
#: The largest request (argv and environment as JSON) a waiter reads.
MAX_REQUEST = 1 << 20


def serve(path: str, entry: Callable[[list[str]], int], exit_now: Callable[[int], None]) -> int:
    """Preload, listen on ``path``, serve until stdin closes; the exit code. ``entry``: the entry
    point's ``main`` (called with the request's arguments); ``exit_now``: its exit, which a step
    ends with (``cli`` passes both: this module does not import it)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    _prime()
    # imported while idle: the first request need not wait for them
    later = [*OPTIONAL_PRELOAD, *_step_modules()]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    print(READY, flush=True)
    try:
        while True:
            ready, _, _ = select.select([listener, sys.stdin.fileno()], [], [], IDLE_S if later else None)
            if not ready and later:
                try:
                    importlib.import_module(later.pop(0))
                except Exception:  # noqa: BLE001 - optional: the step imports it itself, and reports
                    pass
                continue
            if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 4096):
                return 0  # the worker is gone, or done with us
            if listener in ready:
                conn, _ = listener.accept()
                if os.fork() == 0:
                    listener.close()
                    _wait_for_step(conn, entry, exit_now)  # never returns
                conn.close()
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _prime() -> None:
    """Set up what each step would set up before its first MLflow request, minus the request:
    the tracking URI and retry budget (``tracking.configure``, which loads MLflow's tracing
    exporters) and the request-header providers; about 20 ms a step. The step configures again
    from its own environment (cheap once loaded). Nothing here opens a connection: a socket made
    before the fork would be shared by every step. A failure is the step's to report."""
    try:
        from mlflow.tracking.request_header.registry import resolve_request_headers

        from airflow_modelopt.container import tracking

        tracking.configure()
        resolve_request_headers()
    except Exception as exc:  # noqa: BLE001 - e.g. a bad retry budget: the step itself says so
        logging.getLogger(__name__).info("not primed: %s", exc)


def _step_modules() -> list[str]:
    """The registered steps' modules (no ML framework at import: ``test_import_boundary``)."""
    from airflow_modelopt.container.steps import STEP_MODULES

    return sorted(set(STEP_MODULES.values()))


def _wait_for_step(conn: socket.socket, entry: Callable[[list[str]], int], exit_now: Callable[[int], None]) -> None:
    """The waiter: start the requested step, report its pid, then its exit status; then exit."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process waits for its child itself
        message, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 2)
        request = json.loads(message)
        if len(fds) != 2:
            raise ValueError(f"expected 2 file descriptors, got {len(fds)}")
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_step(request, fds, entry, exit_now)  # never returns
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
    except BaseException as exc:  # noqa: BLE001 - tell the launcher, which falls back or fails the task
        try:
            _send(conn, {"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        code = 1
    finally:
        os._exit(code)


def _run_step(request: dict[str, Any], fds: list[int], entry: Callable[[list[str]], int],
              exit_now: Callable[[int], None]) -> None:
    """The step process: the request's descriptors, environment, folder and argv, then the entry point."""
    code = 1
    try:
        os.setsid()
        os.dup2(fds[0], 0)
        os.dup2(fds[1], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["airflow-modelopt", *request["args"]]
        root = logging.getLogger()  # as a fresh process has it: the entry point configures it from the step's env
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        code = entry(list(request["args"]))
        exit_now(code)  # the same fast exit as a fresh process's
    except SystemExit as exc:  # argparse on bad arguments
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - never back into the server's loop
        print(f"modelopt: error: warm step process: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    os._exit(code)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


__all__ = ["MAX_REQUEST", "OPTIONAL_PRELOAD", "PRELOAD", "READY", "serve"]
