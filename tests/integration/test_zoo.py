"""The model zoo (``airflow_modelopt.container.examples.zoo``) and a CI-sized slice of the coverage
matrix (``scripts/coverage_matrix.py``, ``docs/coverage.md``).

- Every zoo model trains (deterministically, one thread) to its stated accuracy on the eval split,
  and its ExportedProgram exports to ONNX (dynamo, as torch_to_onnx exports) with ONNX Runtime's
  top-1 agreeing with PyTorch on >= 99% of the eval split, at a batch size the export never saw.
- Representative cells through the real steps against a real MLflow server (local mode): the
  two-input / two-output model through torch_to_onnx, onnx_quantize (static int8) and tflite_quantize
  (full int8), the GRU through tflite_quantize int8 (a clear error naming op and converter), and MNN
  on a residual CNN, an LSTM and a dynamic sequence length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MlflowServer, run_step

ZOO_NAMES = ("mobilenet", "resnet", "unet", "detector", "bert_tiny", "vit_tiny", "lstm", "gru", "two_io",
             "dynamic_seq")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every zoo model trained once for this module: model, splits, eval metrics, its .pt2."""
    import torch

    from airflow_modelopt.container.examples.zoo import ZOO

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("zoo")
    out = {}
    try:
        for name in ZOO_NAMES:
            entry = ZOO[name]
            data = entry.splits()
            model = entry.build()
            entry.train(model, data["train"])
            out[name] = {"entry": entry, "model": model, "data": data, "metrics": entry.evaluate(model, data["eval"]),
                         "pt2": entry.export(model, data["eval"], tmp / f"{name}.pt2")}
    finally:
        torch.set_num_threads(threads)
    return out


def test_the_zoo_holds_every_shape_the_issue_names():
    from airflow_modelopt.container.examples.zoo import ZOO

    assert set(ZOO) == set(ZOO_NAMES)
    assert ZOO["two_io"].input_names == ("image", "profile") and len(ZOO["two_io"].output_names) == 2
    assert len(ZOO["detector"].output_names) == 2
    assert ZOO["dynamic_seq"].dynamic_axes == {"x": {2: "time"}}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_trains_to_its_accuracy(trained, name):
    t = trained[name]
    assert t["metrics"]["accuracy"] >= t["entry"].min_accuracy, t["metrics"]
    if name == "detector":
        assert t["metrics"]["box_iou"] > 0.7, t["metrics"]
    if name == "two_io":
        assert t["metrics"]["parity_accuracy"] > 0.85, t["metrics"]


def test_data_is_deterministic_and_splits_are_disjoint():
    from airflow_modelopt.container.examples.zoo import splits

    a, b = splits("tokens"), splits("tokens")
    assert all(np.array_equal(a[s]["x"], b[s]["x"]) for s in a)
    assert a["eval"]["x"].dtype == np.int64 and a["eval"]["x"].shape[1:] == (32,)
    rows = {s: {r.tobytes() for r in splits("image")[s]["x"]} for s in ("train", "calibration", "eval")}
    # the digits hold a few exact duplicates; disjoint indices leave overlaps only among those
    assert len(rows["eval"] & rows["train"]) < 5


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_exports_to_onnx_and_agrees(trained, name, tmp_path):
    import onnxruntime as ort
    import torch

    t = trained[name]
    entry, data = t["entry"], t["data"]["eval"]
    program = torch.export.load(str(t["pt2"]))
    dynamic = {n: {0: "batch", **entry.dynamic_axes.get(n, {})} for n in entry.input_names}
    dynamic.update({n: {0: "batch"} for n in entry.output_names})
    path = tmp_path / "model.onnx"
    example = tuple(torch.from_numpy(data[n][:2]) for n in entry.input_names)
    torch.onnx.export(program, example, str(path), input_names=list(entry.input_names),
                      output_names=list(entry.output_names), dynamic_axes=dynamic, opset_version=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(entry.input_names)
    reference = entry.predict(t["model"], data)
    got = [np.concatenate(parts) for parts in zip(*(
        session.run(None, {n: data[n][i : i + 37] for n in entry.input_names})  # 37: a batch the export never saw
        for i in range(0, len(data[entry.input_names[0]]), 37)))]
    assert len(got) == len(entry.output_names)
    agreement = float((got[0].argmax(1) == reference[0].argmax(1)).mean())
    assert agreement >= 0.99, f"{name}: ONNX Runtime top-1 agrees with PyTorch on {agreement:.3f}"
    if entry.dynamic_axes:  # the dynamic time axis: a sequence length the export never saw runs
        short = {n: data[n][:4, ..., :5] for n in entry.input_names}
        with torch.no_grad():
            want = entry.predict(t["model"], short)[0]
        np.testing.assert_allclose(session.run(None, short)[0], want, atol=1e-4, rtol=1e-3)


def _save(path: Path, arrays: dict[str, np.ndarray]) -> str:
    np.savez(path, **arrays)
    return str(path)


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _export(t: dict[str, Any], server: MlflowServer, tmp: Path, experiment: str) -> tuple[dict[str, Any], str, str]:
    """torch_to_onnx on a zoo model's .pt2 (eval data as the sample) -> (result, eval npz, calibration npz)."""
    entry, data = t["entry"], t["data"]
    ev = _save(tmp / "eval.npz", {**entry.inputs(data["eval"]), "y": data["eval"]["y"]})
    cal = _save(tmp / "cal.npz", entry.inputs(data["calibration"]))
    spec = {"model_uri": str(t["pt2"]), "data_uri": ev, "output_names": list(entry.output_names),
            "context": {"experiment_name": experiment}}
    if entry.dynamic_axes:  # as the coverage matrix exports it
        spec["dynamic_axes"] = {k: {str(a): n for a, n in v.items()} for k, v in entry.dynamic_axes.items()}
    run = run_step("torch_to_onnx", spec, server.env())
    assert run.returncode == 0, run.output[-3000:]
    return run.result, ev, cal


def _mnn_fp32_agrees(t: dict[str, Any], server: MlflowServer, tmp: Path) -> Any:
    """Export a zoo model, convert it to fp32 MNN checked on its eval split; >= 0.99 top-1 agreement."""
    tmp.mkdir()
    exported, ev, _ = _export(t, server, tmp, "tests-zoo")
    run = run_step("mnn_convert", {"model_uri": exported["artifacts"]["onnx_model"], "eval_data_uri": ev,
                                   "context": {"experiment_name": "tests-zoo"}}, server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert run.result["metrics"]["top1_agreement"] >= 0.99, run.result["metrics"]
    return run


def test_two_input_two_output_model_through_export_static_int8_and_tflite_int8(trained, mlflow_server, tmp_path):
    """The multi-input / multi-output cell: both inputs by name, both outputs kept, int8 agrees."""
    import onnxruntime as ort

    t = trained["two_io"]
    exported, ev, cal = _export(t, mlflow_server, tmp_path, "tests-zoo")
    run = run_step("onnx_quantize", {"model_uri": exported["artifacts"]["onnx_model"], "mode": "static",
                                     "calibration_data_uri": cal, "context": {"experiment_name": "tests-zoo"}},
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    folder = _download(run.result["artifacts"]["onnx_model"], mlflow_server, tmp_path / "int8")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    data = t["data"]["eval"]
    assert sorted(i.name for i in session.get_inputs()) == ["image", "profile"]
    digit, parity = session.run(["digit", "parity"], {n: data[n] for n in ("image", "profile")})
    ref_digit, ref_parity = t["entry"].predict(t["model"], data)
    assert float((digit.argmax(1) == ref_digit.argmax(1)).mean()) >= 0.97
    assert float((parity.argmax(1) == ref_parity.argmax(1)).mean()) >= 0.97
    assert float((digit.argmax(1) == data["y"]).mean()) >= t["metrics"]["accuracy"] - 0.03

    # the same export through onnx2tf + TFLiteConverter full int8: both outputs come back as themselves
    # (they came back swapped before outputs were paired by shape), and agree with PyTorch
    from airflow_modelopt.container.runtimes import load

    run = run_step("tflite_quantize", {"model_uri": exported["artifacts"]["onnx_model"], "mode": "int8",
                                       "calibration_data_uri": cal, "context": {"experiment_name": "tests-zoo"}},
                   mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert run.result["metrics"]["top1_agreement"] >= 0.95, run.result["metrics"]
    folder = _download(run.result["artifacts"]["tflite_model"], mlflow_server, tmp_path / "tflite")
    with load(folder, "tflite", threads=1, field="tflite_model") as runtime:
        digit, parity = runtime.run({n: data[n] for n in ("image", "profile")}, batch_size=64)
    assert digit.shape == ref_digit.shape and parity.shape == ref_parity.shape
    assert float((digit.argmax(1) == ref_digit.argmax(1)).mean()) >= 0.95
    assert float((parity.argmax(1) == ref_parity.argmax(1)).mean()) >= 0.95


def test_gru_tflite_int8_cell(trained, mlflow_server, tmp_path):
    """The recurrent cell of the issue: the GRU through onnx2tf + TFLiteConverter full int8 fails with an
    error that names the op and the converter (exit 5, ConversionFailed), not a traceback. (Still red:
    see docs/coverage.md; fixing the batch at 1 did not give a correct int8 model here.)"""
    t = trained["gru"]
    exported, ev, cal = _export(t, mlflow_server, tmp_path, "tests-zoo")
    run = run_step("tflite_quantize", {"model_uri": exported["artifacts"]["onnx_model"], "mode": "int8",
                                       "calibration_data_uri": cal, "context": {"experiment_name": "tests-zoo"}},
                   mlflow_server.env())
    assert run.returncode == 5, run.output[-3000:]
    error = run.error
    assert "TensorListReserve" in error and "TFLiteConverter" in error, error


def test_lstm_openvino_int8_keeps_the_lstm_in_floating_point(trained, mlflow_server, tmp_path):
    """NNCF's int8 LSTMSequence carries quantization error from step to step: on this LSTM its top-1
    agreement with the fp32 IR fell to 0.62 (docs/coverage.md before the fix). openvino_convert leaves
    LSTM ops in floating point by default (``fp32_op_types``) and says so; the rest is still int8."""
    pytest.importorskip("nncf")
    t = trained["lstm"]
    exported, ev, cal = _export(t, mlflow_server, tmp_path, "tests-zoo")
    run = run_step("openvino_convert", {"model_uri": exported["artifacts"]["onnx_model"], "precision": "int8",
                                        "calibration_data_uri": cal, "eval_data_uri": ev, "throughput_seconds": 0,
                                        "context": {"experiment_name": "tests-zoo"}}, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert run.result["info"]["quantization"]["fp32_op_types"] == ["LSTMSequence"]
    assert run.result["metrics"]["fake_quantize_nodes"] >= 1  # the classifier head is still quantized
    assert run.result["metrics"]["top1_agreement"] >= 0.97, run.result["metrics"]


def test_mnn_on_a_residual_cnn_an_lstm_a_dynamic_sequence_and_token_ids(trained, mlflow_server, tmp_path):
    """MNN's full int8 with ADMM feature calibration (the default) on the ResNet-style model, where
    MNN 3.6's KL calibration crashed (SIGSEGV). The LSTM converts with MNN's own RNN kernels: the
    converter's default While-loop rewrite crashed on it (SIGBUS), and the GRU's int8 model from that
    rewrite ran nothing. The 1-D conv net's dynamic sequence length, stored as -1 in the .mnn file,
    loads and runs at lengths the export never saw (it failed to load: "negative dimensions")."""
    pytest.importorskip("MNN")
    t = trained["resnet"]
    (tmp_path / "resnet").mkdir()
    exported, ev, cal = _export(t, mlflow_server, tmp_path / "resnet", "tests-zoo")
    spec = {"model_uri": exported["artifacts"]["onnx_model"], "precision": "int8", "calibration_data_uri": cal,
            "eval_data_uri": ev, "context": {"experiment_name": "tests-zoo"}}
    run = run_step("mnn_convert", spec, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert run.result["info"]["quantization"]["feature_quantize_method"] == "ADMM"
    assert run.result["metrics"]["top1_agreement"] >= 0.97 and run.result["metrics"]["size_ratio"] < 0.35

    lstm = trained["lstm"]
    (tmp_path / "lstm").mkdir()
    exported, ev, cal = _export(lstm, mlflow_server, tmp_path / "lstm", "tests-zoo")
    run = run_step("mnn_convert", {**spec, "model_uri": exported["artifacts"]["onnx_model"], "calibration_data_uri": cal,
                                   "eval_data_uri": ev}, mlflow_server.env())
    assert run.returncode == 0, run.output[-3000:]
    assert "--useOriginRNNImpl" in run.result["info"]["converter_options"]
    assert run.result["metrics"]["top1_agreement"] >= 0.99, run.result["metrics"]

    seq = trained["dynamic_seq"]
    run = _mnn_fp32_agrees(seq, mlflow_server, tmp_path / "seq")
    from airflow_modelopt.container.runtimes import load

    folder = _download(run.result["artifacts"]["mnn_model"], mlflow_server, tmp_path / "seq-mnn")
    x = seq["data"]["eval"]["x"][:3]
    with load(folder, threads=1) as runtime:
        for length in (x.shape[2], x.shape[2] + 5):
            longer = np.concatenate([x, x], axis=2)[:, :, :length]
            assert runtime.run({"x": longer})[0].shape == (3, 10)

    # Token ids are int64 in PyTorch and ONNX; MNN's converter stores the input as int32 and the
    # runtimes layer feeds it so (it refused int64 before).
    b = trained["bert_tiny"]
    _mnn_fp32_agrees(b, mlflow_server, tmp_path / "bert")
