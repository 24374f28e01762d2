"""The container entry point: ``airflow-modelopt run <step> --spec <file | - | JSON>``.

It validates the spec, runs the step, prints the result JSON as the last stdout line, and writes
it to /airflow/xcom/return.json when that folder exists (the Kubernetes result channel). Logs go
to stderr. Exit codes (airflow_modelopt.exceptions): 0 done, 2 bad spec or input (do not retry),
3 a gate failed and 5 a converter refused the model (neither retried),
6 this worker cannot run the step (no GPU; not retried), 4 MLflow unreachable, 1 any
other failure, 143 (128 + the signal) terminated by SIGTERM, 130 interrupted (SIGINT): the
step's MLflow run is then marked KILLED and its temporary folder removed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from airflow_modelopt.exceptions import EXIT_FAILED, EXIT_OK, ModelOptError, SpecError
from airflow_modelopt.version import __version__

XCOM_DIR = Path("/airflow/xcom")
#: Kubernetes makes this file in every container and shows its text as the container's termination
#: message (the pod operator puts it in the task's error). Elsewhere it does not exist.
TERMINATION_LOG = Path(os.environ.get("MODELOPT_TERMINATION_LOG", "/dev/termination-log"))


def _report_error(message: str) -> None:
    """The one-line error on stderr, and as the termination message where Kubernetes reads it."""
    print(f"modelopt: error: {message}", file=sys.stderr, flush=True)
    if TERMINATION_LOG.is_file():
        try:
            TERMINATION_LOG.write_text(message[-4000:])  # Kubernetes keeps at most 4096 bytes
        except OSError:
            pass


def _read_spec(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    if value.lstrip().startswith("{"):
        return value
    path = Path(value)
    if not path.is_file():
        raise SpecError(f"--spec {value!r} is neither '-', a JSON object, nor a readable file")
    return path.read_text()


def _stop_on_sigterm() -> None:
    """Turn the first SIGTERM (Airflow's kill, ``docker stop``, a pod's deletion) into
    ``StepTerminated`` in the main thread, so the runner marks the run KILLED and removes its
    temporary folder; MLflow calls after it give up within ``tracking.WIND_DOWN_S``. Later
    SIGTERMs are ignored while that cleanup runs (the orchestrator's SIGKILL still ends it)."""
    from airflow_modelopt.container import tracking
    from airflow_modelopt.container.runner import StepTerminated

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)
        tracking.BUDGET.wind_down()
        raise StepTerminated(signum, signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, terminate)


def _parser() -> argparse.ArgumentParser:
    from airflow_modelopt.specs import StepSpec

    steps = sorted(StepSpec.registry)
    parser = argparse.ArgumentParser(prog="airflow-modelopt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"airflow-modelopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one step from its spec")
    run.add_argument("step", choices=steps)
    run.add_argument("--spec", required=True, help="spec JSON: a file path, '-' for stdin, or the JSON itself")
    sub.add_parser("steps", help="list the steps and their image families")
    schema = sub.add_parser("schema", help="print a step's spec as JSON Schema")
    schema.add_argument("step", choices=steps)
    warm = sub.add_parser("warm", help="serve local-mode steps from a preloaded interpreter (container/warm.py)")
    warm.add_argument("--socket", required=True, help="Unix socket path to listen on")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The entry point. Called as the program (``argv`` None), a ``run`` ends the process itself
    (:func:`_exit_now`) once its result is out, skipping the interpreter's teardown."""
    code = _main(argv)
    if argv is None and sys.argv[1:2] == ["run"]:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exit as ``sys.exit`` would, less the teardown of every loaded module: with torch, onnxruntime
    and MLflow loaded that takes 1 to 2.5 s per step process, after the result is already out.
    What the interpreter's own exit does first still happens, in its order: ``threading._shutdown``
    (thread pools are told to stop, then non-daemon threads are waited for) and the atexit handlers
    (MLflow's, logging's flush)."""
    shutdown_threads = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown_threads is None or run_exitfuncs is None:  # not CPython: the normal exit
        return
    shutdown_threads()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to deliver to
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(
        level=os.environ.get("MODELOPT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from airflow_modelopt.specs import StepSpec

    args = _parser().parse_args(argv)
    if args.command == "steps":
        for name, cls in sorted(StepSpec.registry.items()):
            print(f"{name}\t{cls.image_family}\t{(cls.__doc__ or '').strip().splitlines()[0]}")
        return EXIT_OK
    if args.command == "schema":
        print(json.dumps(StepSpec.registry[args.step].model_json_schema(), indent=2))
        return EXIT_OK
    if args.command == "warm":
        from airflow_modelopt.container.warm import serve

        return serve(args.socket, main, _exit_now)

    from airflow_modelopt.container.runner import StepTerminated, run_step

    log = logging.getLogger("airflow_modelopt")
    _stop_on_sigterm()
    try:
        result = run_step(args.step, _read_spec(args.spec))
    except ModelOptError as exc:
        _report_error(str(exc))
        return exc.exit_code
    except StepTerminated as exc:
        _report_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _report_error("interrupted (SIGINT)")
        return 128 + signal.SIGINT
    except Exception as exc:  # a bug or a library error: keep the traceback in the log
        log.exception("step %s failed", args.step)
        _report_error(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # done: nothing left to clean up
    line = result.to_line()
    if XCOM_DIR.is_dir():
        (XCOM_DIR / "return.json").write_text(line)
    sys.stderr.flush()
    print(line, flush=True)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
