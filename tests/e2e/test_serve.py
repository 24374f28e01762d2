"""The champion serves over HTTP with MLflow's own server: ``mlflow models serve -m
models:/<name>@champion --env-manager local`` on loopback answers ``/invocations`` for the TFLite
int8 deployable (NHWC, int8 I/O inside) fed NCHW float images, with what the runtimes layer (the
validate step's) computes from the raw files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, run_step, wait_http
from tests.integration._models import download

MODEL_NAME = "serve-digits"


@pytest.fixture(scope="module")
def champion(mlflow_server, example_model, example_onnx) -> dict[str, str]:
    import mlflow

    art = example_model["artifacts"]
    run = run_step("tflite_quantize", {
        "model_uri": example_onnx["artifacts"]["onnx_model"], "mode": "int8",
        "calibration_data_uri": art["calibration_data"], "calibration_samples": 64, "check_samples": 0,
        "context": {"experiment_name": "tests-serve"}}, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    mlflow.set_tracking_uri(mlflow_server.uri)
    version = mlflow.register_model(run.result["artifacts"]["tflite_model"], MODEL_NAME, await_registration_for=60)
    mlflow_server.client().set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return run.result["artifacts"]


def test_mlflow_models_serve_answers_invocations_for_the_tflite_int8_champion(champion, mlflow_server, example_model,
                                                                             tmp_path):
    from airflow_modelopt.container.runtimes import load

    x = np.load(download(example_model["artifacts"]["eval_data"], mlflow_server.uri, tmp_path / "eval"))["x"][:8]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        # PATH as in an activated environment: MLflow execs the environment's uvicorn by name
        env={**os.environ, **mlflow_server.env(), "OMP_NUM_THREADS": "1",
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", timeout=240, proc=proc)
        except Exception:
            pytest.fail("mlflow models serve did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        body = json.dumps({"inputs": x.astype(np.float32).tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.loads(response.read())
        got = np.asarray(answer["predictions"], dtype=np.float32)

        # A request the model cannot take (NHWC images) is refused with the expected shape named.
        bad = json.dumps({"inputs": x.transpose(0, 2, 3, 1).astype(np.float32).tolist()}).encode()
        bad_request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=bad,
                                             headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad_request, timeout=60)
        assert refused.value.code == 400
        assert "(-1, 1, 8, 8)" in refused.value.read().decode()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    raw = download(champion["tflite_model_files"], mlflow_server.uri, tmp_path / "raw")
    with load(Path(raw), "tflite") as rt:
        (expected,) = rt.run({rt.feed_names[0]: x.astype(np.float32)})
    assert got.shape == (8, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
