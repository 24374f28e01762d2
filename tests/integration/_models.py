"""Test candidates built from the session's example model (the digits CNN), once per process.

- ``pt2``: the trained ExportedProgram; ``torchscript``: the same weights scripted.
- ``onnx_fp32``: the torch_to_onnx step's MLflow onnx folder (model.onnx + external data).
- ``onnx_int8``: ONNX Runtime static QDQ int8 (``quantize_static``, calibration split).
- ``tflite_fp32`` / ``tflite_int8``: a tf_keras twin of the CNN with the torch weights copied in
  (NHWC; the first Dense kernel permuted so Flatten's H,W,C order matches torch's C,H,W), converted
  with ``tf.lite.TFLiteConverter``: fp32, and full int8 with int8 I/O calibrated on the calibration
  split. Each folder holds ``model.tflite`` and ``modelopt_signature.json`` (layout NHWC, source
  layout NCHW, the I/O quantization read back from the flatbuffer).
- ``keras`` / ``savedmodel``: the same twin as a .keras file and a SavedModel, with signatures.
- ``onnx_broken``: the fp32 ONNX with every weight perturbed by noise (must fail its gates).
- ``onnx_nan``: the fp32 ONNX with a NaN in the last bias (every output row has a NaN).

Test modules load this file with ``pytest_plugins`` (not by importing the fixtures), so the
session fixture is one fixture, built once per test session; the builder is memoized besides.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_CACHE: dict[str, Any] = {}


@dataclass
class Candidates:
    root: Path
    eval_npz: Path
    calibration_npz: Path
    pt2: Path
    torchscript: Path
    onnx_fp32: Path
    onnx_int8: Path
    tflite_fp32: Path
    tflite_int8: Path
    keras: Path
    savedmodel: Path
    onnx_broken: Path
    onnx_nan: Path

    def path(self, name: str) -> Path:
        return getattr(self, name)


def download(uri: str, tracking_uri: str, dest: Path) -> Path:
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def torch_state(pt2: Path) -> dict[str, np.ndarray]:
    import torch

    program = torch.export.load(str(pt2))
    return {k: v.detach().cpu().numpy() for k, v in program.state_dict.items()}


def build_torchscript(state: dict[str, np.ndarray], dest: Path) -> Path:
    import torch

    from airflow_modelopt.container.examples.digits import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "model.pt"
    torch.jit.script(model).save(str(path))
    return path


def keras_twin(state: dict[str, np.ndarray]) -> Any:
    """The digits CNN in tf_keras (NHWC) with the torch weights."""
    import tf_keras as keras

    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPool2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(64, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out)
    conv = lambda w: w.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)  # noqa: E731
    model.get_layer("conv1").set_weights([conv(state["features.0.weight"]), state["features.0.bias"]])
    model.get_layer("conv2").set_weights([conv(state["features.2.weight"]), state["features.2.bias"]])
    # torch flattens (C, H, W), Keras (H, W, C): reorder the first Dense kernel's rows
    w1 = state["classifier.1.weight"].reshape(64, 32, 4, 4).transpose(2, 3, 1, 0).reshape(512, 64)
    model.get_layer("fc1").set_weights([w1, state["classifier.1.bias"]])
    model.get_layer("logits").set_weights([state["classifier.3.weight"].T, state["classifier.3.bias"]])
    return model


def _tflite_signature(model_path: Path) -> None:
    """modelopt_signature.json from what the flatbuffer says, plus the layouts we know."""
    from ai_edge_litert.interpreter import Interpreter

    from airflow_modelopt.container.signature import ModelSignature, Quantization, TensorSpec

    it = Interpreter(model_path=str(model_path))

    def spec(d: dict[str, Any], layout: str, source: str) -> TensorSpec:
        scale, zero = d["quantization"]
        shape = [None if s < 0 else int(s) for s in d["shape_signature"]]
        q = Quantization(scale=float(scale), zero_point=int(zero)) if scale else None
        return TensorSpec(name=d["name"], shape=shape, dtype=np.dtype(d["dtype"]).name, layout=layout,
                          quantization=q, source_name=source)

    sig = ModelSignature(
        format="tflite",
        inputs=[spec(d, "NHWC", "x") for d in it.get_input_details()],
        outputs=[spec(d, "NC", "output") for d in it.get_output_details()],
        source_layout="NCHW",
    )
    sig.write(model_path.parent)


def build_tflite(model: Any, calibration_nchw: np.ndarray, dest: Path, *, int8: bool) -> Path:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        cal = calibration_nchw.transpose(0, 2, 3, 1).astype(np.float32)

        def representative() -> Any:
            for i in range(0, len(cal), 10):
                yield [cal[i : i + 10]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "model.tflite"
    path.write_bytes(converter.convert())
    _tflite_signature(path)
    return path.parent


def build_keras(model: Any, root: Path) -> tuple[Path, Path]:
    import tensorflow as tf

    from airflow_modelopt.container.signature import ModelSignature, TensorSpec

    kdir = root / "keras"
    kdir.mkdir(parents=True, exist_ok=True)
    model.save(kdir / "model.keras")
    ModelSignature(format="keras", source_layout="NCHW",
                   inputs=[TensorSpec(name="x", shape=[None, 8, 8, 1], dtype="float32", layout="NHWC")],
                   outputs=[TensorSpec(name="logits", shape=[None, 10], dtype="float32", source_name="output")]).write(kdir)
    sdir = root / "savedmodel"
    tf.saved_model.save(model, str(sdir))
    ModelSignature(format="savedmodel", source_layout="NCHW",
                   inputs=[TensorSpec(name="x", shape=[None, 8, 8, 1], dtype="float32", layout="NHWC")],
                   outputs=[TensorSpec(name="logits", shape=[None, 10], dtype="float32", source_name="output")]).write(sdir)
    return kdir, sdir


def build_onnx_int8(onnx_fp32: Path, calibration: np.ndarray, dest: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i : i + 50]} for i in range(0, len(calibration), 50)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    dest.mkdir(parents=True, exist_ok=True)
    quantize_static(str(onnx_fp32), str(dest / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False)
    return dest


def build_onnx_variant(onnx_fp32: Path, dest: Path, *, noise: float = 0.0, nan_bias: bool = False) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_fp32))
    rng = np.random.default_rng(7)
    inits = list(model.graph.initializer)
    for init in inits:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32:
            continue
        if noise and w.ndim >= 2:
            w = w + rng.normal(0.0, noise * float(w.std()), w.shape).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    if nan_bias:
        bias = [i for i in inits if numpy_helper.to_array(i).shape == (10,)][-1]
        w = numpy_helper.to_array(bias).copy()
        w[3] = np.nan
        bias.CopyFrom(numpy_helper.from_array(w, bias.name))
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest / "model.onnx"))
    return dest


def build_candidates(root: Path, example_model: dict[str, Any], example_onnx: dict[str, Any], tracking_uri: str) -> Candidates:
    if "candidates" in _CACHE:
        return _CACHE["candidates"]
    root.mkdir(parents=True, exist_ok=True)
    arts = example_model["artifacts"]
    data = root / "data"
    eval_npz = download(arts["eval_data"], tracking_uri, data)
    calibration_npz = download(arts["calibration_data"], tracking_uri, data)
    pt2 = download(arts["model_pt2"], tracking_uri, root / "pt2")
    onnx_dir = download(example_onnx["artifacts"]["onnx_model"], tracking_uri, root / "onnx_fp32")
    calibration = np.load(calibration_npz)["x"]
    state = torch_state(pt2)
    torchscript = build_torchscript(state, root / "torchscript")
    onnx_file = onnx_dir / "model.onnx"
    onnx_int8 = build_onnx_int8(onnx_file, calibration, root / "onnx_int8")
    onnx_broken = build_onnx_variant(onnx_file, root / "onnx_broken", noise=1.5)
    onnx_nan = build_onnx_variant(onnx_file, root / "onnx_nan", nan_bias=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    twin = keras_twin(state)
    tflite_fp32 = build_tflite(twin, calibration, root / "tflite_fp32", int8=False)
    tflite_int8 = build_tflite(twin, calibration, root / "tflite_int8", int8=True)
    keras_dir, saved_dir = build_keras(twin, root)
    found = Candidates(root=root, eval_npz=eval_npz, calibration_npz=calibration_npz, pt2=pt2, torchscript=torchscript,
                       onnx_fp32=onnx_dir, onnx_int8=onnx_int8, tflite_fp32=tflite_fp32, tflite_int8=tflite_int8,
                       keras=keras_dir, savedmodel=saved_dir, onnx_broken=onnx_broken, onnx_nan=onnx_nan)
    _CACHE["candidates"] = found
    return found


@pytest.fixture(scope="session")
def candidates(tmp_path_factory: pytest.TempPathFactory, mlflow_server: Any, example_model: dict[str, Any],
               example_onnx: dict[str, Any]) -> Candidates:
    """Every test candidate of the example model (built once per test process)."""
    if "candidates" in _CACHE:
        return _CACHE["candidates"]
    return build_candidates(tmp_path_factory.mktemp("candidates"), example_model, example_onnx, mlflow_server.uri)


@pytest.fixture
def step_env(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """MLFLOW_TRACKING_URI for steps run in this process (runner.run_step) and in subprocesses."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.env()


def read_artifact_text(tracking_uri: str, run_id: str, path: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return Path(local).read_text()


def artifact_json(tracking_uri: str, run_id: str, path: str) -> dict[str, Any]:
    return json.loads(read_artifact_text(tracking_uri, run_id, path))


__all__ = ["Candidates", "artifact_json", "build_candidates", "candidates", "read_artifact_text", "step_env"]


def train_residual_digits(widths: tuple[int, int, int], epochs: int) -> tuple[Any, np.ndarray, np.ndarray, dict]:
    """A small ResNet (``scripts/_bench_common.residual_cnn``) trained with Adam on scikit-learn's
    digits rendered as tinted 3x32x32 images (seeded). Returns (model in eval mode, x, y, index
    splits ``eval`` 400 / ``calibration`` 200 / ``train`` the rest)."""
    import sys

    import torch
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from _bench_common import residual_cnn, to_rgb

    digits = load_digits()
    x = to_rgb((digits.images / 16.0).astype(np.float32)[:, None], 32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    ev, cal, tr = order[:400], order[400:600], order[600:]
    torch.manual_seed(0)
    model = residual_cnn(widths=widths)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(tr)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    return model, x, y, {"eval": ev, "calibration": cal, "train": tr}
