"""mnn_convert on the example digits CNN's ONNX export with the real MNN converter, quantization
tool and runtime, against a real MLflow server: fp32 (same outputs as ONNX Runtime, checked with
MNN's own Interpreter API), int8 weights and full int8 (smaller, still classifying), validated and
benchmarked through the real steps (the runtimes layer's MNN backend); a non-ONNX source refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MlflowServer, run_step

pytest.importorskip("MNN")

EXPERIMENT = "tests-mnn-convert"


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _spec(example_model: dict[str, Any], example_onnx: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model_uri": example_onnx["artifacts"]["onnx_model"], "eval_data_uri": example_model["artifacts"]["eval_data"],
            "context": {"experiment_name": EXPERIMENT}, **fields}


@pytest.fixture(scope="module")
def reference(mlflow_server, example_model, example_onnx, tmp_path_factory) -> dict[str, Any]:
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("mnn-reference")
    folder = _download(example_onnx["artifacts"]["onnx_model"], mlflow_server, tmp / "onnx")
    data = np.load(_download(example_model["artifacts"]["eval_data"], mlflow_server, tmp / "eval"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return {"x": data["x"], "logits": session.run(None, {session.get_inputs()[0].name: data["x"]})[0]}


def _mnn_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Sample by sample through MNN's Interpreter/Session API (not the runtimes layer's Module API)."""
    import MNN

    interpreter = MNN.Interpreter(str(path))
    session = interpreter.createSession({"numThread": 1, "precision": "high"})
    inp = interpreter.getSessionInput(session)
    rows = []
    for sample in x:
        tensor = MNN.Tensor((1, *sample.shape), MNN.Halide_Type_Float, np.ascontiguousarray(sample[None], np.float32),
                            MNN.Tensor_DimensionType_Caffe)
        inp.copyFrom(tensor)
        interpreter.runSession(session)
        out = interpreter.getSessionOutput(session)  # an int8 model's output may be channel-packed (NC4HW4)
        host = MNN.Tensor(out.getShape(), MNN.Halide_Type_Float, np.zeros(out.getShape(), np.float32),
                          MNN.Tensor_DimensionType_Caffe)
        out.copyToHostTensor(host)
        rows.append(np.array(host.getNumpyData(), copy=True).reshape(-1))
    return np.stack(rows)


def test_fp32_mnn_computes_what_onnx_runtime_does(mlflow_server, example_model, example_onnx, reference, tmp_path):
    run = run_step("mnn_convert", _spec(example_model, example_onnx), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    folder = _download(run.result["artifacts"]["mnn_model_files"], mlflow_server, tmp_path / "mnn")
    assert {p.name for p in folder.iterdir()} == {"model.mnn", "modelopt_signature.json"}
    logits = _mnn_logits(folder / "model.mnn", reference["x"][:50])
    assert np.abs(logits - reference["logits"][:50]).max() < 1e-3
    m = run.result["metrics"]
    assert m["max_abs_error"] < 1e-3 and m["top1_agreement"] == 1.0
    assert m["mnn_bytes"] == (folder / "model.mnn").stat().st_size
    # the record keeps the source's dynamic batch (the .mnn file fixes it to 1)
    assert run.result["info"]["signature"]["inputs"][0]["shape"][0] in (None, "batch")


@pytest.mark.parametrize(("precision", "max_ratio", "min_error"), [("int8_weights", 0.35, 1e-4), ("int8", 0.35, 1e-3)])
def test_int8_mnn_is_smaller_and_still_classifies(mlflow_server, example_model, example_onnx, reference, tmp_path,
                                                  precision, max_ratio, min_error):
    fields = {"calibration_data_uri": example_model["artifacts"]["calibration_data"]} if precision == "int8" else {}
    run = run_step("mnn_convert", _spec(example_model, example_onnx, precision=precision, **fields), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["size_ratio"] < max_ratio, m
    assert m["top1_agreement"] >= 0.95 and m["accuracy_drop"] < 0.03, m
    folder = _download(run.result["artifacts"]["mnn_model_files"], mlflow_server, tmp_path / precision)
    logits = _mnn_logits(folder / "model.mnn", reference["x"][:100])
    assert np.mean(logits.argmax(1) == reference["logits"][:100].argmax(1)) >= 0.95
    assert np.abs(logits - reference["logits"][:100]).max() > min_error  # quantized, not a copy of fp32
    if precision == "int8":
        ir = run.result["artifacts"]["mnn_model"]
        context = {"experiment_name": EXPERIMENT}
        val = run_step("validate", {"reference_uri": example_onnx["artifacts"]["onnx_model"], "candidate_uri": ir,
                                    "data_uri": example_model["artifacts"]["eval_data"], "max_accuracy_drop": 0.03,
                                    "context": context}, mlflow_server.env())
        assert val.returncode == 0, val.output[-3000:]
        assert val.result["verdict"]["passed"]
        bench = run_step("benchmark", {"model_uri": ir, "data_uri": example_model["artifacts"]["eval_data"],
                                       "batch_sizes": [1, 8], "warmup_runs": 2, "timed_runs": 20, "context": context},
                         mlflow_server.env())
        assert bench.returncode == 0, bench.output[-3000:]
        assert bench.result["info"]["format"] == "mnn" and bench.result["info"]["runtime"].startswith("MNN")
        assert bench.result["metrics"]["latency_ms_p50_b8"] > 0


def test_a_non_onnx_source_is_refused_naming_the_field(mlflow_server, example_model, example_onnx):
    run = run_step("mnn_convert", _spec(example_model, example_onnx, model_uri=example_model["artifacts"]["model_pt2"]),
                   mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert "model_uri:" in run.output and "this step converts onnx models" in run.output
