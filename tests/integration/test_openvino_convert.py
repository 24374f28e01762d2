"""openvino_convert on the example digits CNN's ONNX export with real OpenVINO and NNCF, against a
real MLflow server (the entry point as a subprocess): fp16 and int8 IR, checked here with
OpenVINO's own API against ONNX Runtime, then validated and benchmarked through the real steps
(the runtimes layer's OpenVINO backend); accuracy-aware int8; bad eval data refused (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MlflowServer, run_step

pytest.importorskip("openvino")
pytest.importorskip("nncf")

EXPERIMENT = "tests-openvino-convert"


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _spec(example_model: dict[str, Any], example_onnx: dict[str, Any], **fields: Any) -> dict[str, Any]:
    # 100 calibration samples: NNCF's own inference keeps OpenVINO's pinned threads, slow on a busy machine
    return {"model_uri": example_onnx["artifacts"]["onnx_model"], "eval_data_uri": example_model["artifacts"]["eval_data"],
            "throughput_seconds": 0.5, "calibration_samples": 100, "context": {"experiment_name": EXPERIMENT}, **fields}


@pytest.fixture(scope="module")
def reference(mlflow_server, example_model, example_onnx, tmp_path_factory) -> dict[str, Any]:
    """ONNX Runtime's logits on the eval split, and the split."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("openvino-reference")
    folder = _download(example_onnx["artifacts"]["onnx_model"], mlflow_server, tmp / "onnx")
    data = np.load(_download(example_model["artifacts"]["eval_data"], mlflow_server, tmp / "eval"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return {"x": data["x"], "y": data["y"], "logits": session.run(None, {session.get_inputs()[0].name: data["x"]})[0]}


def _ir_logits(folder: Path, x: np.ndarray) -> np.ndarray:
    """The IR run with OpenVINO's own API (not the runtimes layer), in f32."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.outputs[0]]


def test_fp16_ir_halves_the_weights_and_computes_the_same(mlflow_server, example_model, example_onnx, reference, tmp_path):
    run = run_step("openvino_convert", _spec(example_model, example_onnx, precision="fp16"), mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    folder = _download(run.result["artifacts"]["openvino_model_files"], mlflow_server, tmp_path / "ir")
    assert {p.name for p in folder.iterdir()} >= {"model.xml", "model.bin", "modelopt_signature.json"}
    assert m["ir_bytes"] == (folder / "model.xml").stat().st_size + (folder / "model.bin").stat().st_size
    assert (folder / "model.bin").stat().st_size < 0.6 * m["source_bytes"]  # fp16 weights: half of fp32's
    logits = _ir_logits(folder, reference["x"])
    assert np.abs(logits - reference["logits"]).max() < 0.05
    assert m["top1_agreement"] >= 0.99 and m["max_abs_error"] < 0.05
    assert m["latency_ms_p50"] > 0 and m["source_latency_ms_p50"] > 0 and m["throughput_mode_items_per_s"] > 0


@pytest.fixture(scope="module")
def int8_run(mlflow_server, example_model, example_onnx) -> Any:
    run = run_step("openvino_convert", _spec(example_model, example_onnx, precision="int8",
                                             calibration_data_uri=example_model["artifacts"]["calibration_data"]),
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_int8_ir_is_quantized_and_still_classifies(mlflow_server, int8_run, reference, tmp_path):
    m = int8_run.result["metrics"]
    assert int8_run.result["info"]["quantization"]["method"] == "nncf.quantize"
    assert m["fake_quantize_nodes"] >= 4  # conv and linear inputs and weights
    folder = _download(int8_run.result["artifacts"]["openvino_model_files"], mlflow_server, tmp_path / "ir8")
    logits = _ir_logits(folder, reference["x"])
    agreement = float(np.mean(logits.argmax(1) == reference["logits"].argmax(1)))
    assert agreement >= 0.95
    assert m["top1_agreement"] == pytest.approx(agreement, abs=0.01)
    assert m["accuracy_drop"] < 0.03
    assert np.abs(logits - reference["logits"]).max() > 1e-4  # int8 arithmetic, not a copy of fp32


def test_int8_ir_passes_validate_and_benchmark_through_the_openvino_backend(mlflow_server, example_model, example_onnx,
                                                                            int8_run):
    ir = int8_run.result["artifacts"]["openvino_model"]
    context = {"experiment_name": EXPERIMENT}
    val = run_step("validate", {"reference_uri": example_onnx["artifacts"]["onnx_model"], "candidate_uri": ir,
                                "data_uri": example_model["artifacts"]["eval_data"], "max_accuracy_drop": 0.03,
                                "context": context}, mlflow_server.env())
    assert val.returncode == 0, val.output[-3000:]
    assert val.result["verdict"]["passed"] and val.result["metrics"]["passed"] == 1.0
    bench = run_step("benchmark", {"model_uri": ir, "data_uri": example_model["artifacts"]["eval_data"],
                                   "batch_sizes": [1, 8], "warmup_runs": 2, "timed_runs": 20, "context": context},
                     mlflow_server.env())
    assert bench.returncode == 0, bench.output[-3000:]
    assert bench.result["info"]["format"] == "openvino" and bench.result["info"]["runtime"].startswith("openvino")
    bm = bench.result["metrics"]
    assert bm["model_bytes"] == int8_run.result["metrics"]["ir_bytes"]  # .xml + .bin
    assert bm["latency_ms_p50_b1"] > 0 and bm["peak_rss_mb"] > 0


def test_accuracy_aware_int8(mlflow_server, example_model, example_onnx):
    run = run_step("openvino_convert", _spec(example_model, example_onnx, precision="int8", max_accuracy_drop=0.02,
                                             calibration_data_uri=example_model["artifacts"]["calibration_data"]),
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    quantization = run.result["info"]["quantization"]
    assert (quantization["method"], quantization["max_drop"]) == ("nncf.quantize_with_accuracy_control", 0.02)
    assert run.result["metrics"]["accuracy_drop"] <= 0.02 + 1e-9


def test_accuracy_control_without_labels_is_refused(mlflow_server, example_model, example_onnx, reference, tmp_path):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=reference["x"])
    run = run_step("openvino_convert", _spec(example_model, example_onnx, precision="int8", max_accuracy_drop=0.02,
                                             eval_data_uri=str(unlabelled),
                                             calibration_data_uri=example_model["artifacts"]["calibration_data"]),
                   mlflow_server.env())
    assert run.returncode == 2, run.output[-3000:]
    assert "eval_data_uri: max_accuracy_drop needs labels" in run.output
