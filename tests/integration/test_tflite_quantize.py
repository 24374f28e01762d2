"""tflite_quantize against a real MLflow server over HTTP, in local mode (the entry point as a
subprocess), on the example digits CNN through each converter path:

- PyTorch (.pt2 for fp32, the MLflow pytorch model for int8) -> litert-torch, in the separate litert venv
  (``scripts/make-litert-venv.sh``; litert-torch cannot share .venv with Airflow). Those tests
  skip, saying so, when that venv does not exist.
- ONNX (the MLflow onnx model) -> onnx2tf -> TFLiteConverter, in this venv.
- Keras (the same network with the same weights, rebuilt channel-last) -> TFLiteConverter.
- The pipeline's tflite builds (``targets.builds()``): the PyTorch model with litert-torch, the ONNX
  export as ``fallback_model_uri``; the step runs in this venv and reaches litert-torch through
  ``MODELOPT_LITERT_PYTHON`` (what the operator sets from ``[modelopt] litert_python`` in local
  mode). CI provisions the litert venv (scripts/make-litert-venv.sh); the litert-torch case skips
  without it, the fallback case does not need it.

Each TFLite model is checked here with the LiteRT interpreter, fed as its recorded signature says
(NHWC where it records NHWC, quantized where it records int8/uint8), against torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, MlflowServer, StepRun

LITERT_PYTHON = Path(os.environ.get("MODELOPT_LITERT_PYTHON", REPO / ".venv-litert" / "bin" / "python"))
EXPERIMENT = "tests-tflite-quantize"


# -- helpers ------------------------------------------------------------------------------------


def run_tflite_step(spec: dict[str, Any], server: MlflowServer, *, python: str | Path = sys.executable,
                    experiment: str = EXPERIMENT, timeout: float = 600, env: dict[str, str | None] | None = None) -> StepRun:
    """``<python> -m airflow_modelopt run tflite_quantize --spec -`` as tests/conftest.py's run_step,
    with a chosen interpreter (the litert venv for the PyTorch path)."""
    spec = {**spec, "context": {"experiment_name": experiment, "force": True}}
    environment = {**os.environ, **server.env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name, value in (env or {}).items():  # None removes a variable
        environment.pop(name, None)
        if value is not None:
            environment[name] = value
    proc = subprocess.run(
        [str(python), "-m", "airflow_modelopt", "run", "tflite_quantize", "--spec", "-"],
        input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, env=environment,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return StepRun(proc.returncode, proc.stdout + proc.stderr, result)


def ok(run: StepRun) -> dict[str, Any]:
    assert run.returncode == 0, run.output[-4000:]
    assert run.result is not None
    return run.result


def error_line(run: StepRun) -> str:
    """The entry point's error message (it may span several lines), without the prefix."""
    head, sep, message = run.output.rpartition("modelopt: error:")
    assert sep, run.output[-3000:]
    return " ".join(message.split())


@pytest.fixture(scope="session")  # session: decided before the session fixtures train anything
def litert_python() -> Path:
    if not LITERT_PYTHON.exists():
        pytest.skip(
            f"the PyTorch -> TFLite path runs in the litert venv ({LITERT_PYTHON}), which does not exist: "
            "create it with scripts/make-litert-venv.sh (litert-torch pins pydantic below Airflow's)"
        )
    return LITERT_PYTHON


def download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def tflite_folder(result: dict[str, Any], server: MlflowServer, dest: Path) -> Path:
    assert result["artifacts"]["tflite_model"].startswith("models:/m-")  # the MLflow (pyfunc) model
    uri = result["artifacts"]["tflite_model_files"]  # the raw folder, where it always was
    assert uri.startswith("runs:/") and uri.endswith("/tflite_model"), uri
    folder = download(uri, server, dest)
    assert sorted(p.name for p in folder.iterdir()) == ["model.tflite", "modelopt_signature.json"]
    return folder


def run_tflite(folder: Path, x_nchw: np.ndarray) -> np.ndarray:
    """Logits of the TFLite model for NCHW float images, fed as its signature file says."""
    from ai_edge_litert.interpreter import Interpreter

    sig = json.loads((folder / "modelopt_signature.json").read_text())
    (inp,), (out,) = sig["inputs"], sig["outputs"]
    x = x_nchw
    if inp["layout"] == "NHWC":
        assert sig["source_layout"] == "NCHW"
        x = x.transpose(0, 2, 3, 1)
    if inp["dtype"] in ("int8", "uint8"):
        q = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.rint(x / q["scale"]) + q["zero_point"], info.min, info.max)
    x = np.ascontiguousarray(x.astype(inp["dtype"]))
    it = Interpreter(model_path=str(folder / "model.tflite"), num_threads=1)
    in_index = {d["name"]: d["index"] for d in it.get_input_details()}[inp["name"]]
    out_index = {d["name"]: d["index"] for d in it.get_output_details()}[out["name"]]
    batch = inp["shape"][0] or len(x)
    it.resize_tensor_input(in_index, [batch, *x.shape[1:]], strict=False)
    it.allocate_tensors()
    outs = []
    for start in range(0, len(x), batch):
        part = x[start:start + batch]
        got = len(part)
        if got < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - got, axis=0)])
        it.set_tensor(in_index, part)
        it.invoke()
        outs.append(it.get_tensor(out_index)[:got].copy())
    y = np.concatenate(outs)
    if out["dtype"] in ("int8", "uint8"):
        q = out["quantization"]
        y = (y.astype(np.float32) - q["zero_point"]) * q["scale"]
    return y


@pytest.fixture(scope="module")
def reference(example_model: dict[str, Any], mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example model's .pt2 (as torch runs it) and its eval data."""
    import torch

    root = tmp_path_factory.mktemp("tflite-reference")
    pt2 = download(example_model["artifacts"]["model_pt2"], mlflow_server, root / "pt2")
    data = np.load(download(example_model["artifacts"]["eval_data"], mlflow_server, root / "eval"))
    program = torch.export.load(str(pt2))
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(data["x"])).numpy()
    return {"pt2": pt2, "program": program, "x": data["x"], "y": data["y"], "logits": logits}


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def measured(label: str, result: dict[str, Any], logits: np.ndarray, reference: dict[str, Any]) -> None:
    """One line of the numbers the issue note reports (``pytest -s ... | grep TFLITE-MEASURE``)."""
    m = result["metrics"]
    torch_acc = accuracy(reference["logits"], reference["y"])
    acc = accuracy(logits, reference["y"])
    print(f"TFLITE-MEASURE {label:<28} bytes={int(m['tflite_bytes']):>7} source={int(m['source_bytes']):>7} "
          f"size_ratio={m['size_ratio']:.3f} accuracy={acc:.4f} (torch {torch_acc:.4f}, drop {torch_acc - acc:+.4f}) "
          f"float_ops={int(m['float_op_count'])} conversion_s={m['conversion_time_s']:.1f}")


def assert_failed_without_artifact(server: MlflowServer, experiment: str) -> None:
    """Every run of the experiment failed, and none holds a tflite_model artifact."""
    client = server.client()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert runs
    for run in runs:
        assert run.info.status == "FAILED"
        assert run.data.tags.get("modelopt.status") == "failed"
        assert "modelopt.error" in run.data.tags
        assert "tflite_model" not in {a.path for a in client.list_artifacts(run.info.run_id)}


# -- PyTorch path (litert venv) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt_fp32(litert_python, example_model, mlflow_server) -> dict[str, Any]:
    spec = {"model_uri": example_model["artifacts"]["model_pt2"], "mode": "fp32",
            "calibration_data_uri": example_model["artifacts"]["calibration_data"]}
    return ok(run_tflite_step(spec, mlflow_server, python=litert_python))


@pytest.fixture(scope="module")
def pt_int8(litert_python, example_model, mlflow_server) -> dict[str, Any]:
    """Full int8 from the MLflow pytorch model (the other PyTorch input kind)."""
    spec = {"model_uri": example_model["artifacts"]["pytorch_model"], "mode": "int8", "io_type": "int8",
            "calibration_data_uri": example_model["artifacts"]["calibration_data"]}
    return ok(run_tflite_step(spec, mlflow_server, python=litert_python))


def test_pytorch_fp32_matches_torch_and_keeps_nchw(pt_fp32, reference, mlflow_server, tmp_path):
    folder = tflite_folder(pt_fp32, mlflow_server, tmp_path)
    logits = run_tflite(folder, reference["x"])
    assert np.max(np.abs(logits - reference["logits"])) < 1e-4
    measured("pytorch .pt2 fp32", pt_fp32, logits, reference)
    info = pt_fp32["info"]
    assert info["conversion_path"] == "litert_torch" and info["source_kind"] == "exported_program"
    run = mlflow_server.client().get_run(pt_fp32["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.path"] == "litert_torch"
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["format"] == "tflite" and sig["source_layout"] == "NCHW"
    assert sig["inputs"][0]["layout"] == "NCHW" and sig["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert sig["inputs"][0]["source_name"] == "x" and sig["inputs"][0]["quantization"] is None
    assert info["layout_change"] == {} and info["signature"] == sig
    m = pt_fp32["metrics"]
    assert m["float_op_count"] == m["op_count"] > 0 and m["flex_op_count"] == 0 and m["custom_op_count"] == 0
    assert m["tflite_bytes"] == (folder / "model.tflite").stat().st_size
    assert m["size_ratio"] == pytest.approx(m["tflite_bytes"] / m["source_bytes"])
    assert m["max_abs_error"] < 1e-4 and m["top1_agreement"] == 1.0 and m["conversion_time_s"] > 0


def test_pytorch_full_int8_keeps_accuracy_and_is_3x_smaller(pt_fp32, pt_int8, reference, mlflow_server, tmp_path):
    fp32 = run_tflite(tflite_folder(pt_fp32, mlflow_server, tmp_path / "fp32"), reference["x"])
    folder = tflite_folder(pt_int8, mlflow_server, tmp_path / "int8")
    int8 = run_tflite(folder, reference["x"])
    measured("pytorch mlflow int8 (int8 io)", pt_int8, int8, reference)
    assert pt_int8["info"]["source_kind"] == "mlflow_pytorch" and pt_int8["info"]["conversion_path"] == "litert_torch"
    assert accuracy(int8, reference["y"]) >= accuracy(fp32, reference["y"]) - 0.02
    assert pt_fp32["metrics"]["tflite_bytes"] / pt_int8["metrics"]["tflite_bytes"] >= 3.0
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    for tensor in (sig["inputs"][0], sig["outputs"][0]):
        assert tensor["dtype"] == "int8"
        assert tensor["quantization"]["scale"] > 0 and -128 <= tensor["quantization"]["zero_point"] <= 127
    # inputs in [0, 1]: the calibrated input range maps 0 to -128
    assert sig["inputs"][0]["quantization"]["zero_point"] == -128
    assert sig["inputs"][0]["layout"] == "NCHW"
    m = pt_int8["metrics"]
    assert m["float_op_count"] == 0 and m["quantize_op_count"] == 0 and m["calibration_samples"] == 200
    assert pt_int8["info"]["io_type"] == "int8" and pt_int8["info"]["quantizer"] == "ai_edge_quantizer"


@pytest.fixture(scope="module")
def wide_pt2(tmp_path_factory) -> tuple[Path, int]:
    """A random-weight CNN with over 256 Ki parameters, exported with a fixed batch of 1 (no dynamic
    dimension): the .pt2 and its parameter count."""
    import torch

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(16 * 8 * 8, 384), torch.nn.ReLU(), torch.nn.Linear(384, 10)).eval()
    pt2 = tmp_path_factory.mktemp("wide") / "wide.pt2"
    torch.export.save(torch.export.export(wide, (torch.zeros(1, 1, 8, 8),)), pt2)
    return pt2, sum(p.numel() for p in wide.parameters())


def test_pytorch_full_int8_with_int8_io_keeps_weights_stored_after_the_flatbuffer(litert_python, example_model,
                                                                                 mlflow_server, tmp_path, wide_pt2):
    """Over 256 KiB of int8 weights, ai-edge-quantizer stores them after the flatbuffer; int8 I/O
    then goes through TFLite's model-interface tool, which must not drop them (it did: the model
    came out 37 KB and failed to load with "Constant buffer ... out of range offset"). The model's
    batch is fixed at 1, so the agreement check feeds the source one sample at a time."""
    pt2, params = wide_pt2
    result = ok(run_tflite_step({"model_uri": str(pt2), "mode": "int8", "io_type": "int8",
                                 "calibration_data_uri": example_model["artifacts"]["calibration_data"]},
                                mlflow_server, python=litert_python))
    m = result["metrics"]
    assert m["tflite_bytes"] > params > 256 * 1024  # a byte per weight, all of them kept
    assert m["size_ratio"] < 0.3
    assert m["top1_agreement"] >= 0.9  # the check loads and runs the written model
    folder = tflite_folder(result, mlflow_server, tmp_path / "out")
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["inputs"][0]["dtype"] == sig["outputs"][0]["dtype"] == "int8"


def test_batch_size_other_than_a_fixed_exported_batch_is_refused(litert_python, example_model, mlflow_server,
                                                                 wide_pt2):
    run = run_tflite_step({"model_uri": str(wide_pt2[0]), "mode": "fp32", "batch_size": 4}, mlflow_server,
                          python=litert_python)
    assert run.returncode == 2, run.output[-3000:]
    assert error_line(run).startswith("batch_size: the model was exported with a fixed batch of 1 (input 'input')")


# -- ONNX path -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_fp32(example_onnx, example_model, mlflow_server) -> dict[str, Any]:
    spec = {"model_uri": example_onnx["artifacts"]["onnx_model"], "mode": "fp32",
            "calibration_data_uri": example_model["artifacts"]["calibration_data"]}
    return ok(run_tflite_step(spec, mlflow_server))


def test_onnx_fp32_matches_torch_fed_nhwc(onnx_fp32, reference, mlflow_server, tmp_path):
    folder = tflite_folder(onnx_fp32, mlflow_server, tmp_path)
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["source_layout"] == "NCHW"
    assert sig["inputs"][0]["layout"] == "NHWC" and sig["inputs"][0]["shape"] == [None, 8, 8, 1]
    assert onnx_fp32["info"]["layout_change"] == {"x": "NCHW->NHWC"}
    assert onnx_fp32["info"]["conversion_path"] == "onnx2tf" and onnx_fp32["info"]["source_kind"] == "mlflow_onnx"
    run = mlflow_server.client().get_run(onnx_fp32["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.path"] == "onnx2tf"
    logits = run_tflite(folder, reference["x"])  # transposed to NHWC as the signature says
    measured("onnx fp32", onnx_fp32, logits, reference)
    assert np.max(np.abs(logits - reference["logits"])) < 1e-4
    assert onnx_fp32["metrics"]["max_abs_error"] < 1e-4
    assert onnx_fp32["metrics"]["top1_agreement"] == 1.0


def test_onnx_source_bytes_count_the_graph_and_its_external_data(onnx_fp32, example_onnx, mlflow_server, tmp_path):
    import onnx

    src = download(example_onnx["artifacts"]["onnx_model"], mlflow_server, tmp_path / "onnx") / "model.onnx"
    model = onnx.load(str(src), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert data, "the example ONNX model keeps its weights in external data"
    expected = src.stat().st_size + sum((src.parent / name).stat().st_size for name in data)
    assert onnx_fp32["metrics"]["source_bytes"] == expected, "graph + external data, no MLflow metadata files"


def test_onnx_full_int8_with_uint8_io(onnx_fp32, example_onnx, example_model, reference, mlflow_server, tmp_path):
    spec = {"model_uri": example_onnx["artifacts"]["onnx_model"], "mode": "int8", "io_type": "uint8",
            "calibration_data_uri": example_model["artifacts"]["calibration_data"]}
    result = ok(run_tflite_step(spec, mlflow_server))
    folder = tflite_folder(result, mlflow_server, tmp_path / "int8")
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["inputs"][0]["dtype"] == "uint8" and sig["inputs"][0]["layout"] == "NHWC"
    assert 0 <= sig["inputs"][0]["quantization"]["zero_point"] <= 255 and sig["outputs"][0]["dtype"] == "uint8"
    fp32 = run_tflite(tflite_folder(onnx_fp32, mlflow_server, tmp_path / "fp32"), reference["x"])
    int8 = run_tflite(folder, reference["x"])
    measured("onnx int8 (uint8 io)", result, int8, reference)
    assert accuracy(int8, reference["y"]) >= accuracy(fp32, reference["y"]) - 0.02
    assert onnx_fp32["metrics"]["tflite_bytes"] / result["metrics"]["tflite_bytes"] >= 3.0
    assert result["metrics"]["float_op_count"] == 0


# -- Keras / TensorFlow path ------------------------------------------------------------------


def keras_copy_of_example(program: Any, path: Path) -> Path:
    """The example CNN in Keras (channel-last) with the torch model's weights."""
    import keras

    w = {k: v.detach().numpy() for k, v in program.state_dict.items()}
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="x"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    conv1, conv2, _, _, dense1, dense2 = model.layers
    conv1.set_weights([w["features.0.weight"].transpose(2, 3, 1, 0), w["features.0.bias"]])
    conv2.set_weights([w["features.2.weight"].transpose(2, 3, 1, 0), w["features.2.bias"]])
    # torch flattens (C, H, W), Keras (H, W, C)
    kernel = w["classifier.1.weight"].reshape(64, 32, 4, 4).transpose(2, 3, 1, 0).reshape(512, 64)
    dense1.set_weights([kernel, w["classifier.1.bias"]])
    dense2.set_weights([w["classifier.3.weight"].T, w["classifier.3.bias"]])
    model.save(path)
    return path


def test_keras_model_fp32_matches_torch_and_fp16_is_half(reference, mlflow_server, tmp_path):
    keras_file = keras_copy_of_example(reference["program"], tmp_path / "digits.keras")
    nhwc = np.ascontiguousarray(reference["x"].transpose(0, 2, 3, 1))
    np.savez(tmp_path / "calibration.npz", x=nhwc[:100])
    fp32 = ok(run_tflite_step({"model_uri": str(keras_file), "mode": "fp32",
                               "calibration_data_uri": str(tmp_path / "calibration.npz")}, mlflow_server))
    assert fp32["info"]["conversion_path"] == "tflite_converter" and fp32["info"]["source_kind"] == "keras"
    folder = tflite_folder(fp32, mlflow_server, tmp_path / "fp32")
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["source_layout"] == "NHWC" and sig["inputs"][0]["layout"] == "NHWC"
    assert fp32["info"]["layout_change"] == {}
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(folder / "model.tflite"))
    runner = it.get_signature_runner()
    logits = next(iter(runner(x=nhwc).values()))
    assert np.max(np.abs(logits - reference["logits"])) < 1e-4
    measured("keras fp32", fp32, logits, reference)
    fp16 = ok(run_tflite_step({"model_uri": str(keras_file), "mode": "fp16"}, mlflow_server))
    ratio = fp16["metrics"]["tflite_bytes"] / fp32["metrics"]["tflite_bytes"]
    assert 0.4 <= ratio <= 0.6, ratio
    assert fp16["info"]["check"] == "skipped: no calibration data"
    it = Interpreter(model_path=str(tflite_folder(fp16, mlflow_server, tmp_path / "fp16") / "model.tflite"))
    half = next(iter(it.get_signature_runner()(x=nhwc).values()))
    measured("keras fp16", fp16, half, reference)
    assert np.max(np.abs(half - reference["logits"])) < 0.05
    assert accuracy(half, reference["y"]) == accuracy(reference["logits"], reference["y"])


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"image": np.zeros((4, 1, 8, 8), np.float32)}, ["calibration_data_uri", "input 'x'", "['image']"]),
        ({"x": np.zeros((4, 3, 8, 8), np.float32)}, ["calibration_data_uri", "'x'", "dimension 1 is 3, expected 1"]),
        ({"x": np.zeros((0, 1, 8, 8), np.float32)}, ["calibration_data_uri", "empty"]),
    ],
    ids=["wrong-name", "wrong-shape", "empty"],
)
def test_calibration_data_that_does_not_fit_is_refused(arrays, expected, example_onnx, mlflow_server, tmp_path, request):
    np.savez(tmp_path / "calibration.npz", **arrays)
    experiment = f"{EXPERIMENT}-{request.node.callspec.id}"
    run = run_tflite_step({"model_uri": example_onnx["artifacts"]["onnx_model"], "mode": "int8",
                           "calibration_data_uri": str(tmp_path / "calibration.npz")}, mlflow_server,
                          experiment=experiment)
    assert run.returncode == 2, run.output[-3000:]
    message = error_line(run)
    for part in expected:
        assert part in message, message
    assert_failed_without_artifact(mlflow_server, experiment)


def test_full_int8_without_calibration_data_is_refused_before_anything_runs(example_onnx, mlflow_server):
    experiment = f"{EXPERIMENT}-no-calibration"
    run = run_tflite_step({"model_uri": example_onnx["artifacts"]["onnx_model"], "mode": "int8"}, mlflow_server,
                          experiment=experiment)
    assert run.returncode == 2
    assert "calibration_data_uri is required for mode='int8'" in error_line(run)
    assert mlflow_server.client().get_experiment_by_name(experiment) is None  # nothing ran, nothing logged


def test_op_litert_torch_cannot_lower_is_named(litert_python, mlflow_server, tmp_path):
    import torch

    class Bessel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(x) * 2.0

    program = torch.export.export(Bessel(), (torch.randn(1, 4),))
    torch.export.save(program, tmp_path / "bessel.pt2")
    experiment = f"{EXPERIMENT}-litert-op"
    run = run_tflite_step({"model_uri": str(tmp_path / "bessel.pt2"), "mode": "fp32"}, mlflow_server,
                          python=litert_python, experiment=experiment)
    assert run.returncode == 5, run.output[-3000:]
    assert "litert-torch cannot convert op aten.special_bessel_j0" in error_line(run)
    assert_failed_without_artifact(mlflow_server, experiment)


def test_op_onnx2tf_cannot_convert_is_named(mlflow_server, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Swish", ["r"], ["y"], name="swish_1")],
        "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "swish.onnx")
    experiment = f"{EXPERIMENT}-onnx2tf-op"
    run = run_tflite_step({"model_uri": str(tmp_path / "swish.onnx"), "mode": "fp32"}, mlflow_server,
                          experiment=experiment)
    assert run.returncode == 5, run.output[-3000:]
    message = error_line(run)
    assert "onnx2tf cannot convert op Swish" in message and "swish_1" in message
    assert_failed_without_artifact(mlflow_server, experiment)


def test_tf_op_without_builtin_fails_unless_flex_is_allowed(mlflow_server, tmp_path):
    import tensorflow as tf

    class Det(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32, name="m")])
        def __call__(self, m: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"det": tf.linalg.det(m)}

    module = Det()
    tf.saved_model.save(module, str(tmp_path / "det"), signatures=module.__call__)
    experiment = f"{EXPERIMENT}-flex-op"
    run = run_tflite_step({"model_uri": str(tmp_path / "det"), "mode": "fp32"}, mlflow_server, experiment=experiment)
    assert run.returncode == 5, run.output[-3000:]
    message = error_line(run)
    assert "op tf.MatrixDeterminant has no TFLite builtin" in message and "allow_select_tf_ops" in message
    assert_failed_without_artifact(mlflow_server, experiment)

    result = ok(run_tflite_step({"model_uri": str(tmp_path / "det"), "mode": "fp32", "allow_select_tf_ops": True},
                                mlflow_server))
    assert result["metrics"]["flex_op_count"] == 1
    assert result["info"]["flex_ops"] == {"FlexMatrixDeterminant": 1}
    assert result["info"]["source_kind"] == "saved_model"


def test_outputs_named_otherwise_by_onnx2tf_are_paired_by_shape_not_by_position():
    """onnx2tf names a SavedModel's outputs its own way and TFLite orders a signature's tensors its own
    way: a two-output model (class logits (N, 10), a box (N, 4)) came back with its outputs swapped.
    Where names do not match, a shape that fits exactly one TFLite tensor decides; where shapes do not
    tell (two outputs alike), position still does."""
    from airflow_modelopt.container.steps.tflite_quantize.check import _pair
    from airflow_modelopt.container.steps.tflite_quantize.common import TensorIO
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import TensorInfo

    tflite = [("PartitionedCall:0", TensorInfo(7, "box", "float32", [1, 4])),
              ("PartitionedCall:1", TensorInfo(9, "logits", "float32", [1, 10]))]
    source = [TensorIO("logits", [None, 10]), TensorIO("box", [None, 4])]
    assert [(s.name, t.index) for s, t, _ in _pair(tflite, source, "output")] == [("logits", 9), ("box", 7)]
    alike = [TensorIO("a", [None, 4]), TensorIO("b", [None, 4])]
    twins = [("o0", TensorInfo(1, "o0", "float32", [1, 4])), ("o1", TensorInfo(2, "o1", "float32", [1, 4]))]
    assert [(s.name, t.index) for s, t, _ in _pair(twins, alike, "output")] == [("a", 1), ("b", 2)]
    # a channel-last output (N, C, H, W) -> (N, H, W, C) still fits its source
    nchw = [TensorIO("mask", [None, 2, 8, 8]), TensorIO("logits", [None, 10])]
    nhwc = [("x0", TensorInfo(3, "x0", "float32", [1, 10])), ("x1", TensorInfo(4, "x1", "float32", [1, 8, 8, 2]))]
    assert [(s.name, t.index) for s, t, _ in _pair(nhwc, nchw, "output")] == [("mask", 4), ("logits", 3)]


# -- the pipeline's tflite builds: litert-torch on the PyTorch model, onnx2tf on the ONNX export as fallback --


def pipeline_spec(target: str, model_uri: str, onnx_uri: str, calibration_uri: str) -> dict[str, Any]:
    """The spec the pipeline's build of ``target`` gives the step (targets.builds(), filled as pipelines.py does)."""
    from airflow_modelopt.targets import builds

    build = builds()[target]
    fills = {"{model}": model_uri, "{calibration}": calibration_uri}
    spec = {k: fills.get(v, v) if isinstance(v, str) else v for k, v in build.kwargs.items()}
    spec[build.model_field] = onnx_uri
    assert (spec["model_uri"], spec["fallback_model_uri"]) == (model_uri, onnx_uri)
    return spec


def pipeline_int8_with_litert(model: dict[str, Any], litert_python: Path, server: MlflowServer,
                              experiment: str) -> dict[str, Any]:
    """The pipeline's tflite_int8 build of ``model`` (its .pt2 first, its ONNX export as the fallback),
    the step in this venv and litert-torch in the configured Python, as a worker runs it."""
    spec = pipeline_spec("tflite_int8", model["pt2"], model["onnx"], model["calibration"])
    return ok(run_tflite_step(spec, server, experiment=experiment, env={"MODELOPT_LITERT_PYTHON": str(litert_python)}))


@pytest.fixture(scope="module")
def gru(tmp_path_factory) -> dict[str, Any]:
    """A seeded GRU classifier over 8 rows of 8 (untrained: no training time), as the pipeline has it: a
    .pt2 with a dynamic batch and its ONNX export (a GRU's ONNX is what onnx2tf cannot convert, docs/coverage.md:
    tf.TensorListReserve); calibration and eval data; torch's logits on the eval data."""
    import torch

    class GRUClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(8, 24, batch_first=True)
            self.head = torch.nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.gru(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = GRUClassifier().eval()
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("gru")
    data = {split: rng.normal(size=(n, 8, 8)).astype(np.float32) for split, n in (("calibration", 64), ("eval", 128))}
    for split, x in data.items():
        np.savez(folder / f"{split}.npz", x=x)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.from_numpy(data["eval"][:2])
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), folder / "gru.pt2")
    torch.onnx.export(model, (example,), str(folder / "gru.onnx"), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    with torch.no_grad():
        logits = model(torch.from_numpy(data["eval"])).numpy()
    return {"pt2": str(folder / "gru.pt2"), "onnx": str(folder / "gru.onnx"), "eval": data["eval"], "logits": logits,
            "calibration": str(folder / "calibration.npz")}


def test_pipeline_tflite_int8_converts_a_gru_with_litert_torch_and_records_it(litert_python, gru, mlflow_server,
                                                                              tmp_path):
    """The step runs in this venv (no litert-torch, as a worker's Python), litert-torch in the configured one."""
    from airflow_modelopt.container.measure import cosine
    from airflow_modelopt.container.runtimes import load

    result = pipeline_int8_with_litert(gru, litert_python, mlflow_server, f"{EXPERIMENT}-pipeline-litert")
    info = result["info"]
    assert (info["conversion_path"], info["converter"], info["converted_from"]) == (
        "litert_torch", "litert-torch", "model_uri")
    assert info["fallback_reason"] is None and info["converter_python"] == str(litert_python)
    run = mlflow_server.client().get_run(result["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.path"] == "litert_torch"
    assert run.data.tags["modelopt.tflite.converter"] == f"litert-torch {info['converter_version']}"
    assert info["converter_version"][0].isdigit()
    assert "modelopt.tflite.fallback_reason" not in run.data.tags
    assert run.data.params["tflite_converter"] == "litert-torch"
    assert run.data.params["tflite_source"] == "model_uri"
    # The layout validate/benchmark read: the PyTorch layout kept, the batch fixed to 1, int8 at the edges.
    folder = tflite_folder(result, mlflow_server, tmp_path)
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["inputs"][0]["shape"] == [1, 8, 8] and sig["inputs"][0]["dtype"] == "int8"
    assert sig["inputs"][0]["layout"] != "NWC" and info["layout_change"] == {}
    assert result["metrics"]["float_op_count"] == 0 and result["metrics"]["flex_op_count"] == 0
    # Run as validation and benchmark run it: the runtimes layer, a batch of 64 split into the fixed batch.
    with load(folder, "tflite", threads=1) as runtime:
        (logits,) = runtime.run({"x": gru["eval"]}, batch_size=64)
    assert logits.shape == gru["logits"].shape
    agree = float((logits.argmax(1) == gru["logits"].argmax(1)).mean())
    print(f"\n  gru int8 via litert-torch: top-1 agreement {agree:.3f}, cosine "
          f"{cosine(logits.ravel(), gru['logits'].ravel()):.4f}, step's own {result['metrics']['top1_agreement']:.3f}")
    assert cosine(logits.ravel().astype(np.float64), gru["logits"].ravel().astype(np.float64)) > 0.98
    assert agree >= 0.85 and result["metrics"]["top1_agreement"] >= 0.85


def test_pipeline_tflite_build_falls_back_to_onnx2tf_when_litert_torch_is_unavailable(example_model, example_onnx,
                                                                                      reference, mlflow_server,
                                                                                      tmp_path):
    """No litert-torch here and no MODELOPT_LITERT_PYTHON: the same run converts the ONNX export and says why."""
    experiment = f"{EXPERIMENT}-pipeline-fallback"
    spec = pipeline_spec("tflite_fp16", example_model["artifacts"]["model_pt2"], example_onnx["artifacts"]["onnx_model"],
                         example_model["artifacts"]["calibration_data"])
    result = ok(run_tflite_step(spec, mlflow_server, experiment=experiment, env={"MODELOPT_LITERT_PYTHON": None}))
    info = result["info"]
    assert (info["conversion_path"], info["converter"], info["converted_from"], info["fallback_from"]) == (
        "onnx2tf", "onnx2tf", "fallback_model_uri", "litert_torch")
    assert info["fallback_reason"].startswith("litert_torch: litert-torch is not installed in this Python")
    run = mlflow_server.client().get_run(result["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.path"] == "onnx2tf"
    assert run.data.tags["modelopt.tflite.converter"] == f"onnx2tf {info['converter_version']}"
    assert "MODELOPT_LITERT_PYTHON" in run.data.tags["modelopt.tflite.fallback_reason"]
    assert run.data.params["tflite_source"] == "fallback_model_uri"
    # onnx2tf's layout, recorded so validation feeds it NHWC
    folder = tflite_folder(result, mlflow_server, tmp_path)
    sig = json.loads((folder / "modelopt_signature.json").read_text())
    assert sig["inputs"][0]["layout"] == "NHWC" and info["layout_change"] == {"x": "NCHW->NHWC"}
    logits = run_tflite(folder, reference["x"])
    assert float((logits.argmax(1) == reference["logits"].argmax(1)).mean()) >= 0.98


# -- token ids, LayerNorm, GELU, attention: the zoo's bert_tiny to full int8 ---------------------------


@pytest.fixture(scope="module")
def bert_tiny(tmp_path_factory) -> dict[str, Any]:
    """The zoo's bert_tiny trained (one thread, seconds) as the coverage matrix has it: its .pt2 (dynamic
    batch), its ONNX export (opset 18: exact GELU as Div, Erf, Add, Mul, Mul), calibration and eval splits,
    torch's logits on the eval split."""
    import torch

    from airflow_modelopt.container.examples.zoo import ZOO

    entry = ZOO["bert_tiny"]
    folder = tmp_path_factory.mktemp("bert_tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = entry.splits()
        model = entry.build()
        entry.train(model, data["train"])
        model.eval()
        pt2 = entry.export(model, data["eval"], folder / "bert_tiny.pt2")
        x = entry.inputs(data["eval"])["x"]
        torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(folder / "bert_tiny.onnx"), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, opset_version=18, dynamo=False)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
    finally:
        torch.set_num_threads(threads)
    np.savez(folder / "calibration.npz", **entry.inputs(data["calibration"]))
    return {"pt2": str(pt2), "onnx": str(folder / "bert_tiny.onnx"), "eval": x, "logits": logits,
            "calibration": str(folder / "calibration.npz")}


def bert_agreement(result: dict[str, Any], bert_tiny: dict[str, Any], server: MlflowServer, tmp_path: Path) -> float:
    """Top-1 agreement of the step's TFLite model with the torch model on bert_tiny's eval split."""
    from airflow_modelopt.container.runtimes import load

    with load(tflite_folder(result, server, tmp_path), "tflite", threads=1) as runtime:
        (logits,) = runtime.run({"x": bert_tiny["eval"]}, batch_size=64)
    return float((logits.argmax(1) == bert_tiny["logits"].argmax(1)).mean())


def test_pipeline_tflite_int8_of_token_ids_keeps_only_the_input_embedding_lookup_in_float(litert_python, bert_tiny,
                                                                                          mlflow_server, tmp_path):
    """litert-torch's int8 leaves the token embedding's EMBEDDING_LOOKUP in float, quantized right after it:
    where the int ids enter the integer graph. The integer-only check accepts that one op, records it, and
    the model agrees with torch (0.997 on the zoo's eval split in docs' coverage run)."""

    result = pipeline_int8_with_litert(bert_tiny, litert_python, mlflow_server, f"{EXPERIMENT}-bert-litert")
    info = result["info"]
    assert (info["conversion_path"], info["converted_from"], info["fallback_reason"]) == (
        "litert_torch", "model_uri", None)
    assert info["float_ops"] == {"EMBEDDING_LOOKUP": 1} and info["float_input_lookups"] == {"EMBEDDING_LOOKUP": 1}
    assert info["op_histogram"].get("GELU") == 2 and not info["flex_ops"] and not info["custom_ops"]
    run = mlflow_server.client().get_run(result["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.float_input_ops"].startswith("EMBEDDING_LOOKUP x1: a constant float table")
    agree = bert_agreement(result, bert_tiny, mlflow_server, tmp_path)
    print(f"\n  bert_tiny int8 via litert-torch: top-1 agreement {agree:.3f} on {len(bert_tiny['eval'])} eval samples")
    assert agree >= 0.95


def test_onnx_path_turns_exact_gelu_into_the_tflite_builtin_instead_of_a_flex_erf(bert_tiny, mlflow_server, tmp_path):
    """onnx2tf alone leaves tf.Erf (Flex only) for PyTorch's GELU order; fused into Gelu first, the int8 model
    is integer-only with two GELU builtins and no Flex op, and says so on the run. (Its int8 attention
    matmuls agree less than litert-torch's: 0.75 top-1 on the zoo eval split; the pipeline tries litert-torch
    first.)"""

    experiment = f"{EXPERIMENT}-bert-onnx2tf"
    spec = {"model_uri": bert_tiny["onnx"], "mode": "int8", "calibration_data_uri": bert_tiny["calibration"]}
    result = ok(run_tflite_step(spec, mlflow_server, experiment=experiment))
    info = result["info"]
    assert info["conversion_path"] == "onnx2tf" and info["lowered_ops"] == {"gelu_fused": 2}
    assert info["op_histogram"].get("GELU") == 2 and "Erf" not in json.dumps(info["op_histogram"])
    assert info["float_ops"] == {} and info["flex_ops"] == {} and info["float_input_lookups"] == {}
    run = mlflow_server.client().get_run(result["mlflow_run_id"])
    assert run.data.tags["modelopt.tflite.lowered_ops"] == "gelu_fused=2"
    agree = bert_agreement(result, bert_tiny, mlflow_server, tmp_path)
    print(f"\n  bert_tiny int8 via onnx2tf: top-1 agreement {agree:.3f}")
    assert agree >= 0.6


@pytest.mark.parametrize("allow_flex", [False, True])
def test_an_erf_that_is_no_gelu_is_built_from_builtins_unless_flex_is_allowed(allow_flex, mlflow_server, tmp_path):
    """(2 + erf(x / sqrt 2)) * x: onnx2tf builds the Erf from builtins (ABS, EXP, ...) when Flex ops are not
    allowed (recorded as lowered_ops), else it stays a Flex Erf (recorded as a Flex op)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "two"], ["a"]), helper.make_node("Mul", ["x", "a"], ["y"])]
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("sqrt2", 1.4142135), ("two", 2.0))]
    graph = helper.make_graph(nodes, "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), tmp_path / "erf.onnx")
    x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(8, 5)
    np.savez(tmp_path / "cal.npz", x=x)
    spec = {"model_uri": str(tmp_path / "erf.onnx"), "mode": "fp32", "calibration_data_uri": str(tmp_path / "cal.npz"),
            "allow_select_tf_ops": allow_flex}
    result = ok(run_tflite_step(spec, mlflow_server, experiment=f"{EXPERIMENT}-erf"))
    info = result["info"]
    if allow_flex:
        assert info["flex_ops"] == {"FlexErf": 1} and info["lowered_ops"] == {"erf_kept": 1}
        return
    assert info["flex_ops"] == {} and info["lowered_ops"] == {"pseudo_ops": ["Erf"]}
    assert {"ABS", "EXP"} <= set(info["op_histogram"])
    assert result["metrics"]["max_abs_error"] < 1e-5  # the step's own check against ONNX Runtime
