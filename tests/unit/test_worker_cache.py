"""The worker-side cache lookup's parts that need no server: the key is the step's own, the digest
scheme is pinned (recorded digests name it), only immutable URIs have a digest record, and every
case the worker cannot decide for certain launches the step (quickly, without failing the task)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from airflow_modelopt import caching
from airflow_modelopt.operators import launchers, worker_cache
from airflow_modelopt.operators.torch_to_onnx import TorchToOnnxOperator
from airflow_modelopt.specs import parse_spec


def test_digest_scheme_is_pinned(tmp_path):
    """A change to ``caching.digest`` that changes this value must bump ``DIGEST_SCHEME``: digests
    recorded by older code would otherwise be read as the new scheme's."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "MLmodel").write_text("flavors:\n  onnx: {data: model.onnx}\nrun_id: abc\nutc_time_created: x\n")
    (model / "model.onnx").write_bytes(b"ONNXBYTES")
    (model / "conda.yaml").write_text("deps")
    assert caching.DIGEST_SCHEME == "v1"
    assert caching.digest(model) == "c95dea8dc99d36c5b38cfe248e42c0050741413b9845b82e717efd98f54d169a"
    assert caching.digest(model / "model.onnx") == hashlib.sha256(b"ONNXBYTES").hexdigest()


@pytest.mark.parametrize(("uri", "expected"), [
    ("runs:/abc/model/model.pt2", ("run", "abc", "modelopt.digest.v1/model/model.pt2")),
    ("runs:/abc/onnx_model/", ("run", "abc", "modelopt.digest.v1/onnx_model")),
    ("models:/m-0123abcd", ("model", "m-0123abcd", "modelopt.digest.v1")),
    ("runs:/abc", None), ("runs:/abc/../x", None), ("models:/digits/3", None), ("models:/digits@champion", None),
    ("s3://bucket/model.onnx", None), ("/data/model.pt2", None), ("mlflow-artifacts:/1/abc/artifacts/m", None),
])
def test_only_immutable_mlflow_uris_have_a_digest_record(uri, expected):
    assert caching.digest_record(uri) == expected


def test_worker_and_step_compute_one_key():
    from airflow_modelopt.container import runner

    spec = parse_spec("validate", {"reference_uri": "/r.pt2", "candidate_uri": "/c.onnx", "data_uri": "/d.npz",
                                   "context": {"experiment_name": "e", "task_id": "t", "try_number": 3}})
    digests = {"reference_uri": "1" * 64, "candidate_uri": "2" * 64, "data_uri": "3" * 64}
    assert caching.cache_key(spec, digests, code=worker_cache.local_code_digest()) == runner.cache_key(spec, digests)
    bench = parse_spec("benchmark", {"model_uri": "/m.onnx", "model_format": "onnx"})
    assert caching.cache_key(bench, {}, code=worker_cache.local_code_digest()) == runner.cache_key(bench, {})
    # The URIs are not in the key, the content is; the try number is not either.
    other = spec.model_copy(update={"reference_uri": "/elsewhere.pt2", "context": spec.context.model_copy(
        update={"try_number": 1})})
    assert runner.cache_key(other, digests) == runner.cache_key(spec, digests)


class _Hook:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def tracking_config(self):
        from airflow_modelopt.hooks.mlflow import TrackingConfig

        return TrackingConfig(self.uri, {"MLFLOW_TRACKING_URI": self.uri})

    def get_connection(self, conn_id):
        raise LookupError(conn_id)


@pytest.mark.parametrize(("mode", "uri", "force", "said"), [
    ("local", "http://127.0.0.1:1", False, "MLflow did not answer"),
    ("local", "sqlite:////tmp/none.db", False, "not an HTTP server"),
    ("kubernetes", "http://127.0.0.1:1", False, "not known before it runs"),
    ("local", "http://127.0.0.1:1", True, None),
])
def test_whatever_the_worker_cannot_decide_launches_the_step(monkeypatch, mode, uri, force, said):
    launched, lines = [], []

    class Recorder(launchers.Launcher):
        def launch(self, context):
            launched.append(self.request.spec.step)
            raise RuntimeError("launched")

        def known_image(self):
            return (None, None) if mode == "local" else None

    monkeypatch.setitem(launchers.LAUNCHERS, mode, Recorder)
    op = TorchToOnnxOperator(task_id="export", model_uri="/m.pt2", input_shapes={"x": [1, 4]}, execution_mode=mode,
                             force=force, retries=0)
    op.__dict__["mlflow_hook"] = _Hook(uri)
    monkeypatch.setattr(TorchToOnnxOperator, "log", property(lambda self: SimpleNamespace(
        info=lambda msg, *a: lines.append(msg % a), warning=lambda msg, *a: lines.append(msg % a))))
    with pytest.raises(RuntimeError, match="launched"):
        op.execute({"ti": SimpleNamespace(try_number=1, dag_id="d", run_id="r")})
    assert launched == ["torch_to_onnx"]
    worker_lines = [line for line in lines if "Cache lookup on the worker" in line]
    if said is None:
        assert not worker_lines, worker_lines
    else:
        assert worker_lines and said in worker_lines[0], lines


def test_the_worker_hashes_the_code_the_step_hashes():
    from airflow_modelopt.container import runner

    assert worker_cache.local_code_digest() == worker_cache.local_code_digest() == runner.code_digest()



# -- a local TFLite entry names the converter it could reach (caching.reachable_converters) ---------


def _tflite(mode: str = "local"):
    return parse_spec("tflite_quantize", {"model_uri": "/m.pt2", "fallback_model_uri": "/m.onnx", "mode": "fp16",
                                          "context": {"experiment_name": "e", "execution_mode": mode}})


def test_a_tflite_entry_built_without_litert_is_not_reused_once_litert_is_reachable(monkeypatch, tmp_path):
    """Without litert-torch a local TFLite step converts the ONNX fallback (another model); once
    ``[modelopt] litert_python`` names a Python, or this one has it, that entry must not be reused."""
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch"
                        else real_find_spec(name, *a))
    monkeypatch.delenv("MODELOPT_LITERT_PYTHON", raising=False)
    digests, code = {"model_uri": "1" * 64, "fallback_model_uri": "2" * 64}, "c" * 64
    spec = _tflite()
    fallback_only = caching.cache_key(spec, digests, code=code)
    assert caching.cache_key(spec, digests, code=code, environ={"MODELOPT_LITERT_PYTHON": str(tmp_path / "gone")}) \
        == fallback_only  # a Python that is not there: the fallback again
    other_python = caching.cache_key(spec, digests, code=code, environ={"MODELOPT_LITERT_PYTHON": sys.executable})
    assert other_python != fallback_only
    # The step process gets the variable in its environment; the worker passes what it will give it.
    monkeypatch.setenv("MODELOPT_LITERT_PYTHON", sys.executable)
    assert caching.cache_key(spec, digests, code=code) == other_python
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "litert_torch"
                        else real_find_spec(name, *a))
    here = caching.cache_key(spec, digests, code=code)
    assert here not in (fallback_only, other_python)
    # An image fixes its converters (its digest or reference is in the key); other steps: no change.
    docker = _tflite("docker")
    assert caching.cache_key(docker, digests, code=code, environ={}) == caching.cache_key(docker, digests, code=code)
    assert caching.reachable_converters(parse_spec("benchmark", {"model_uri": "/m.onnx"})) is None


def test_the_worker_looks_up_with_the_litert_python_the_step_would_get(monkeypatch):
    import sys

    from airflow_modelopt.operators.tflite_quantize import TFLiteQuantizeOperator

    seen = {}

    def lookup(self, spec, *, python=None, environ=None):
        seen.update(environ or {})
        raise worker_cache.Uncertain("recorded")

    monkeypatch.setattr(worker_cache.WorkerCache, "lookup", lookup)
    monkeypatch.setattr(launchers.LocalLauncher, "launch", lambda self, context: (_ for _ in ()).throw(
        RuntimeError(self.request.tracking.public_env.get("MODELOPT_LITERT_PYTHON"))))
    op = TFLiteQuantizeOperator(task_id="tflite", model_uri="/m.pt2", mode="fp16", execution_mode="local",
                                litert_python=sys.executable, retries=0)
    op.__dict__["mlflow_hook"] = _Hook("http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="python"):
        op.execute({"ti": SimpleNamespace(try_number=1, dag_id="d", run_id="r")})
    assert seen["MODELOPT_LITERT_PYTHON"] == sys.executable


# -- the step process ends without the interpreter's teardown (container/cli.py) ---------------------

_EXIT_PROBE = """
import atexit, sys, threading, time
from pathlib import Path
marker = Path(sys.argv[1])
atexit.register(lambda: print("atexit handler ran", file=sys.stderr, flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), marker.write_text("thread finished"))).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)  # idle non-daemon workers: they stop only when the exit tells them to
pool.submit(time.sleep, 0.1)
class TornDown:
    def __del__(self):
        print("module teardown ran", file=sys.stderr, flush=True)
keep = TornDown()
sys.argv = ["airflow-modelopt", "run", "validate", "--spec", "{}"]
from airflow_modelopt.container.cli import main
raise SystemExit(main())
"""


def test_a_step_process_exits_early_yet_keeps_its_exit_code_log_threads_and_atexit_handlers(tmp_path):
    """``airflow-modelopt run`` skips the module teardown (seconds with torch and MLflow loaded),
    but what a normal exit does for the step still happens: its exit code (2: bad spec), its error
    line, a running non-daemon thread's work, idle thread-pool workers stopped (not waited for
    forever), and the atexit handlers (MLflow's, logging's flush)."""
    import subprocess
    import sys

    marker = tmp_path / "thread.txt"
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(marker)], capture_output=True, text=True,
                          timeout=60)  # an exit that waits for idle pool workers never ends
    assert proc.returncode == 2, proc.stderr
    assert "modelopt: error: invalid" in proc.stderr
    assert "atexit handler ran" in proc.stderr
    assert marker.read_text() == "thread finished"
    assert "module teardown ran" not in proc.stderr  # the seconds this saves


def test_main_called_in_process_returns_instead_of_exiting(monkeypatch):
    from airflow_modelopt.container import cli

    monkeypatch.setattr(cli, "_exit_now", lambda code: pytest.fail("an in-process call must not end the process"))
    assert cli.main(["run", "validate", "--spec", "{}"]) == 2
