"""tensorrt_build on a real GPU with real TensorRT: build engines for the example ONNX model and
compare their outputs with ONNX Runtime's on the evaluation data.

gpu tier (by folder). Skips, saying what is missing, on a machine without the tensorrt package,
cuda-python or an NVIDIA GPU (this project's CI machines have none; run it where one is lent:
``pytest -m gpu``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from airflow_modelopt.container.steps import tensorrt_build
from tests.conftest import run_step

MISSING = tensorrt_build.unavailable_reason()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT, cuda-python and an NVIDIA GPU: {MISSING}")

EXPERIMENT = "tests-tensorrt-gpu"


def _download(server, uri: str, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


@pytest.fixture(scope="module")
def reference(mlflow_server, example_model, example_onnx, tmp_path_factory):
    """ONNX Runtime's outputs on the evaluation data, and the data itself."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("trt-ref")
    folder = _download(mlflow_server, example_onnx["artifacts"]["onnx_model"], tmp / "onnx")
    data = np.load(_download(mlflow_server, example_model["artifacts"]["eval_data"], tmp / "eval"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return {"x": data["x"], "y": data["y"], "logits": session.run(None, {name: data["x"]})[0]}


def _build(mlflow_server, example_model, example_onnx, **fields):
    spec = {"model_uri": example_onnx["artifacts"]["onnx_model"], "context": {"experiment_name": EXPERIMENT,
                                                                               "force": True}, **fields}
    if fields.get("precision") == "int8":
        spec["calibration_data_uri"] = example_model["artifacts"]["calibration_data"]
    run = run_step("tensorrt_build", spec, mlflow_server.env(), timeout=1800)
    assert run.returncode == 0, run.output[-4000:]
    return run.result


def _engine_outputs(mlflow_server, result, x, tmp: Path) -> np.ndarray:
    from airflow_modelopt.container.runtimes import load

    folder = _download(mlflow_server, result["artifacts"]["tensorrt_engine"], tmp)
    assert (folder / "model.engine").is_file() and (folder / "modelopt_signature.json").is_file()
    with load(folder) as rt:
        assert rt.format == "tensorrt"
        return rt.run({"x": x}, batch_size=64)[0]


@pytest.mark.parametrize(("precision", "max_abs", "min_agreement"), [
    ("fp32", 1e-2, 0.995),   # TF32 kernels may be chosen for fp32 layers on Ampere and newer
    ("fp16", 5e-2, 0.99),
    ("int8", None, 0.97),
])
def test_engine_matches_onnx_runtime(mlflow_server, example_model, example_onnx, reference, tmp_path, precision,
                                     max_abs, min_agreement):
    result = _build(mlflow_server, example_model, example_onnx, precision=precision)
    assert result["metrics"]["engine_bytes"] > 0 and result["metrics"]["num_layers"] >= 1
    assert result["info"]["tensorrt_version"] and result["info"]["gpu"]["name"]
    got = _engine_outputs(mlflow_server, result, reference["x"], tmp_path / precision)
    want = reference["logits"]
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    if max_abs is not None:
        assert float(np.abs(got - want).max()) <= max_abs * max(scale, 1.0)
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    assert agreement >= min_agreement, f"{precision}: top-1 agreement with ONNX Runtime {agreement:.4f}"
    accuracy_drop = float((want.argmax(1) == reference["y"]).mean() - (got.argmax(1) == reference["y"]).mean())
    assert accuracy_drop <= 0.02


def test_timing_cache_from_one_build_is_reused_by_the_next(mlflow_server, example_model, example_onnx, tmp_path):
    first = _build(mlflow_server, example_model, example_onnx, precision="fp16")
    assert first["metrics"]["timing_cache_reused"] == 0 and first["metrics"]["timing_cache_bytes"] > 0
    second = _build(mlflow_server, example_model, example_onnx, precision="fp16",
                    timing_cache_uri=first["artifacts"]["timing_cache"])
    assert second["metrics"]["timing_cache_reused"] == 1


def test_batches_outside_the_default_profile_are_fed_in_chunks(mlflow_server, example_model, example_onnx,
                                                               reference, tmp_path):
    result = _build(mlflow_server, example_model, example_onnx, precision="fp32", opt_batch_size=4,
                    max_batch_size=16)
    assert result["info"]["profiles"][0]["x"]["max"][0] == 16
    got = _engine_outputs(mlflow_server, result, reference["x"][:37], tmp_path / "chunks")
    assert got.shape == (37, 10)
    assert float((got.argmax(1) == reference["logits"][:37].argmax(1)).mean()) >= 0.99
