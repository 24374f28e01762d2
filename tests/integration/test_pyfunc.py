"""Every deployable a step builds loads through MLflow's own API: ``mlflow.pyfunc.load_model`` of the
registered version (``models:/<name>@<alias>``) predicts what the runtimes layer (the one validation
and benchmark use) computes from the raw files, fed in the source model's layout (NCHW float32).

TFLite (NHWC, int8 I/O), OpenVINO IR, MNN and the PT2E int8 .pt2 are pyfunc models
(``airflow_modelopt.container.pyfunc``); ONNX is MLflow's onnx flavor. A TensorRT engine's pyfunc
refuses at load on a machine without TensorRT, naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_step
from tests.integration._models import download

EXPERIMENT = "tests-pyfunc"
ROWS = 16


def _ctx() -> dict[str, Any]:
    return {"experiment_name": EXPERIMENT}


@pytest.fixture(scope="module")
def eval_x(mlflow_server, example_model, tmp_path_factory) -> np.ndarray:
    data = np.load(download(example_model["artifacts"]["eval_data"], mlflow_server.uri,
                            tmp_path_factory.mktemp("pyfunc-eval")))
    return data["x"][:ROWS].astype(np.float32)


def _build(step: str, spec: dict[str, Any], server: Any) -> dict[str, Any]:
    run = run_step(step, {**spec, "context": _ctx()}, server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run.result


@pytest.fixture(scope="module")
def built(mlflow_server, example_model, example_onnx) -> dict[str, tuple[str, str, str | None]]:
    """target -> (format, MLflow model URI the step reports, raw files URI) for one build of each format."""
    onnx = example_onnx["artifacts"]["onnx_model"]
    art = example_model["artifacts"]
    out: dict[str, tuple[str, str, str | None]] = {"onnx_fp32": ("onnx", onnx, None)}
    tfl = _build("tflite_quantize", {"model_uri": onnx, "mode": "int8", "calibration_data_uri": art["calibration_data"],
                                     "calibration_samples": 64, "check_samples": 0}, mlflow_server)
    out["tflite_int8"] = ("tflite", tfl["artifacts"]["tflite_model"], tfl["artifacts"]["tflite_model_files"])
    ov = _build("openvino_convert", {"model_uri": onnx, "precision": "fp32", "throughput_seconds": 0}, mlflow_server)
    out["openvino_fp32"] = ("openvino", ov["artifacts"]["openvino_model"], ov["artifacts"]["openvino_model_files"])
    mnn = _build("mnn_convert", {"model_uri": onnx, "precision": "fp32"}, mlflow_server)
    out["mnn_fp32"] = ("mnn", mnn["artifacts"]["mnn_model"], mnn["artifacts"]["mnn_model_files"])
    tq = _build("torch_quantize", {"model_uri": art["model_pt2"], "mode": "static", "export_onnx": False,
                                   "calibration_data_uri": art["calibration_data"], "eval_data_uri": art["eval_data"]},
                mlflow_server)
    out["torch_int8"] = ("pt2", tq["artifacts"]["model_pt2"], tq["artifacts"]["model_pt2_file"])
    return out


REGISTERED = "pyfunc-digits"
#: Benchmark figures handed to promote: TFLite int8 the fastest, so it becomes the champion (the demo's outcome).
LATENCY = {"tflite_int8": 0.5, "onnx_fp32": 2.0, "openvino_fp32": 1.5, "mnn_fp32": 1.8, "torch_int8": 1.0}


@pytest.fixture(scope="module")
def promoted(built, mlflow_server) -> dict[str, str]:
    """The promote step registers every candidate (as the pipeline hands them over) -> target: version URI."""
    candidates = [{"target": t, "model_uri": uri, "passed": True, "candidate_key": f"pyfunc-{t}",
                   "metrics": {"latency_ms_p50": LATENCY[t], "model_bytes": 10_000.0, "accuracy_drop": 0.0},
                   "source_model_uri": "models:/digits-source/1", "lineage": []}
                  for t, (_, uri, _) in built.items()]
    run = run_step("promote", {"registered_model_name": REGISTERED, "candidates": candidates,
                               "context": {**_ctx(), "dag_id": "pyfunc_test", "run_id": "manual__pyfunc"}},
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    client = mlflow_server.client()
    versions = {v.tags["modelopt.target"]: v.version for v in client.search_model_versions(f"name = '{REGISTERED}'")}
    assert set(versions) == set(built), versions
    assert client.get_model_version_by_alias(REGISTERED, "champion").version == versions["tflite_int8"]
    return {t: f"models:/{REGISTERED}/{v}" for t, v in versions.items()}


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server.client()
    mlflow.set_tracking_uri(before)


@pytest.mark.parametrize("target", ["onnx_fp32", "tflite_int8", "openvino_fp32", "mnn_fp32", "torch_int8"])
def test_registered_version_loads_with_pyfunc_and_predicts_what_validation_computes(
        target, built, promoted, eval_x, tracking, mlflow_server, tmp_path):
    import mlflow.pyfunc

    from airflow_modelopt.container.runtimes import load

    fmt, model_uri, files_uri = built[target]
    assert model_uri.startswith("models:/m-"), model_uri
    # The champion (TFLite int8, as in the demo) by its alias; the others by their version.
    registered = f"models:/{REGISTERED}@champion" if target == "tflite_int8" else promoted[target]
    model = mlflow.pyfunc.load_model(registered)

    # The signature speaks the source model's language: NCHW float32 images, whatever the format's own I/O.
    (inp,) = model.metadata.get_input_schema().inputs
    assert (inp.type, tuple(inp.shape)) == (np.dtype("float32"), (-1, 1, 8, 8)), (inp.type, inp.shape)

    got = model.predict(eval_x)
    if isinstance(got, dict):  # MLflow's onnx flavor answers {output name: array}
        (got,) = got.values()
    got = np.asarray(got)
    assert got.shape == (ROWS, 10) and got.dtype == np.float32
    # What the validate step computes: the runtimes layer on the raw files the step logged (the MLflow
    # model's own folder for ONNX, which has no separate raw folder).
    raw = download(files_uri or model_uri, mlflow_server.uri, tmp_path / "raw")
    with load(raw, fmt) as rt:
        (expected,) = rt.run({rt.feed_names[0]: eval_x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if fmt != "onnx":  # a pyfunc deployable pins its runtime's package at the installed version
        import importlib.metadata

        reqs = Path(mlflow.pyfunc.get_model_dependencies(registered)).read_text().split()
        dist = {"tflite": "ai-edge-litert", "openvino": "openvino", "mnn": "MNN", "pt2": "torch"}[fmt]
        assert f"{dist}=={importlib.metadata.version(dist)}" in reqs, reqs


def test_tflite_int8_model_answers_mlflow_models_predict_with_its_input_example(built, eval_x, tracking, tmp_path):
    """``mlflow.models.predict`` in this environment, fed the logged input example (NCHW floats, not
    the model's NHWC int8)."""
    import mlflow.models
    import mlflow.pyfunc

    _, model_uri, _ = built["tflite_int8"]
    model = mlflow.pyfunc.load_model(model_uri)
    example = model.input_example
    if isinstance(example, dict):  # named by the source model's input
        example = example["x"]
    assert np.asarray(example).shape[1:] == (1, 8, 8)
    out = tmp_path / "predictions.json"
    mlflow.models.predict(model_uri=model_uri, input_data=np.asarray(example, dtype=np.float32), env_manager="local",
                          output_path=str(out))
    predicted = json.loads(out.read_text())["predictions"]
    np.testing.assert_allclose(np.asarray(predicted, dtype=np.float32),
                               model.predict(np.asarray(example, dtype=np.float32)), atol=1e-6)


def test_tensorrt_pyfunc_refuses_at_load_without_tensorrt_naming_what_is_missing(tracking, tmp_path):
    """A TensorRT engine's MLflow model on a machine without TensorRT: load_model fails at once and says
    it needs the tensorrt package and an NVIDIA GPU (the model itself logs fine, its signature from
    the recorded modelopt_signature.json)."""
    import importlib.util

    import mlflow
    import mlflow.pyfunc

    from airflow_modelopt.container.pyfunc import log_deployable
    from airflow_modelopt.container.signature import ModelSignature, TensorSpec

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the refusal is for machines without it")
    folder = tmp_path / "tensorrt_engine"
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"not an engine this machine could run")
    ModelSignature(format="tensorrt", inputs=[TensorSpec(name="x", shape=[None, 1, 8, 8], dtype="float16")],
                   outputs=[TensorSpec(name="logits", shape=[None, 10], dtype="float16")]).write(folder)
    found = tracking.get_experiment_by_name(EXPERIMENT)
    experiment_id = found.experiment_id if found else tracking.create_experiment(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id):  # no set_experiment: in-process steps of later tests
        info = log_deployable(folder, "tensorrt", name="tensorrt_engine")
    (inp,) = info.signature.inputs.inputs
    assert (inp.type, tuple(inp.shape)) == (np.dtype("float32"), (-1, 1, 8, 8))
    with pytest.raises(Exception, match=r"tensorrt deployable .* cannot run here: .*tensorrt Python package and an "
                                        r"NVIDIA GPU\. Load or serve it on an NVIDIA GPU in an environment") as refused:
        mlflow.pyfunc.load_model(info.model_uri)
    assert "run this step" not in str(refused.value)  # the step's advice is for steps, not for someone serving
