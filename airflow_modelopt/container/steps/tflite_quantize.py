"""Step tflite_quantize: a PyTorch, ONNX or TensorFlow/Keras model -> TFLite, optionally quantized.

1. Detect the source (``source_format`` auto): a torch.export ``.pt2`` or MLflow pytorch model
   takes litert-torch (inputs stay NCHW); an ONNX model takes onnx2tf (channel-first inputs become
   NHWC); a SavedModel or Keras model takes TFLiteConverter. The path is tagged on the run
   (``modelopt.tflite.path``) and returned in ``info``.
2. Check the calibration data against the model's inputs (names, ranks, static dimensions, not
   empty) before converting anything.
3. Convert and quantize: fp32, fp16, dynamic-range int8, or full int8 calibrated on the
   calibration data with int8/uint8/float32 I/O.
4. Read the flatbuffer: ops left in float, Flex and custom ops; full int8 must leave no op in float.
5. Run source and TFLite model on calibration samples and log their agreement.
6. Log a folder artifact ``tflite_model`` holding ``model.tflite`` and ``modelopt_signature.json``
   (input/output names, shapes, dtypes, layouts, int8 quantization parameters).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.signature import SIGNATURE_FILE, ModelSignature, Quantization, TensorSpec
from airflow_modelopt.container.steps._tflite_common import (
    SourceModel,
    TensorIO,
    batches,
    check_calibration,
    from_tflite_layout,
    to_tflite_layout,
)
from airflow_modelopt.container.steps._tflite_flatbuffer import FlatbufferReport, TensorInfo, analyze
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

log = logging.getLogger("airflow_modelopt.container.steps.tflite_quantize")

TAG_PATH = "modelopt.tflite.path"
TAG_MODE = "modelopt.tflite.mode"
MODEL_FILE = "model.tflite"

#: Files of an MLflow model folder that are not the model itself (left out of source_bytes).
_MLFLOW_METADATA = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
                    "serving_input_example.json", "registered_model_meta", "metadata.json"}
_KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}


# -- what model_uri holds ---------------------------------------------------------------------


def detect_source(path: Path, spec: TFLiteQuantizeSpec) -> SourceModel:
    """The converter path for the fetched model artifact, checked against ``source_format``."""
    found = _detect(path, spec.model_uri)
    if spec.source_format != "auto" and spec.source_format != found.format:
        raise InputError(
            f"source_format={spec.source_format!r} but model_uri {spec.model_uri} holds a {found.format} model "
            f"({found.kind}); set source_format='auto' or give a {spec.source_format} model"
        )
    found.bytes = source_bytes(found)
    return found


def _detect(path: Path, uri: str) -> SourceModel:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".pt2":
            return SourceModel("pytorch", "exported_program", path, path)
        if suffix == ".onnx":
            return SourceModel("onnx", "onnx", path, path)
        if suffix in _KERAS_SUFFIXES:
            return SourceModel("tensorflow", "keras", path, path)
        if suffix in _TORCHSCRIPT_SUFFIXES:
            return SourceModel("pytorch", "torchscript", path, path)
        if suffix == ".tflite":
            raise InputError(f"model_uri: {uri} is already a TFLite model; give the source model it was made from")
        raise InputError(
            f"model_uri: cannot tell what {path.name} is; expected a .pt2 ExportedProgram, an .onnx model, a "
            ".keras/.h5 Keras model, or a folder (SavedModel, ONNX folder, MLflow model)"
        )
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        return _detect_mlflow(path, mlmodel, uri)
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return SourceModel("tensorflow", "saved_model", path, path)
    for pattern, fmt, kind in (("*.onnx", "onnx", "onnx"), ("*.pt2", "pytorch", "exported_program"),
                               ("*.keras", "tensorflow", "keras")):
        found = sorted(path.rglob(pattern))
        if len(found) == 1:
            return SourceModel(fmt, kind, found[0], path)
    saved = sorted(p.parent for p in path.rglob("saved_model.pb"))
    if len(saved) == 1:
        return SourceModel("tensorflow", "saved_model", saved[0], path)
    raise InputError(
        f"model_uri: {uri} is a folder without a model this step converts; expected an MLflow model (MLmodel "
        "file), a SavedModel (saved_model.pb), or exactly one .onnx, .pt2 or .keras file"
    )


def _detect_mlflow(path: Path, mlmodel: Path, uri: str) -> SourceModel:
    import yaml

    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"model_uri: {uri} has an unreadable MLmodel file: {exc}") from None
    flavors = meta.get("flavors") or {}
    if "pytorch" in flavors:
        return SourceModel("pytorch", "mlflow_pytorch", path, path)
    if "onnx" in flavors:
        data = (flavors["onnx"] or {}).get("data") or "model.onnx"
        onnx_file = path / data
        if not onnx_file.is_file():
            candidates = sorted(path.rglob("*.onnx"))
            if len(candidates) != 1:
                raise InputError(f"model_uri: {uri} is an MLflow onnx model without its {data}")
            onnx_file = candidates[0]
        return SourceModel("onnx", "mlflow_onnx", onnx_file, path)
    if "tensorflow" in flavors or "keras" in flavors:
        keras_files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _KERAS_SUFFIXES)
        if len(keras_files) == 1:
            return SourceModel("tensorflow", "mlflow_keras", keras_files[0], path)
        saved = sorted(p.parent for p in path.rglob("saved_model.pb"))
        if len(saved) == 1:
            return SourceModel("tensorflow", "mlflow_tensorflow", saved[0], path)
        raise InputError(f"model_uri: {uri} is an MLflow tensorflow model without a .keras file or SavedModel")
    raise InputError(
        f"model_uri: {uri} is an MLflow model of flavor(s) {sorted(f for f in flavors if f != 'python_function')}; "
        "this step converts the pytorch, onnx and tensorflow flavors"
    )


def source_bytes(source: SourceModel) -> int:
    """Bytes of the source model itself (an MLflow folder's metadata files left out)."""
    root = source.root
    if root.is_file():
        return root.stat().st_size
    if source.kind in ("onnx", "mlflow_onnx") and source.path.is_file():
        # the graph plus its external data files, which sit beside it
        folder = source.path.parent
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name not in _MLFLOW_METADATA)
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in _MLFLOW_METADATA
             and "metadata" not in p.relative_to(root).parts[:1]]
    return sum(p.stat().st_size for p in files)


def make_path(source: SourceModel, spec: TFLiteQuantizeSpec, workdir: Path) -> Any:
    if source.format == "pytorch":
        from airflow_modelopt.container.steps._tflite_torch import TorchPath

        return TorchPath(source, spec)
    if source.format == "onnx":
        from airflow_modelopt.container.steps._tflite_tf import OnnxPath

        return OnnxPath(source, spec, workdir)
    if spec.keep_nchw:
        raise InputError("keep_nchw applies to ONNX sources only; model_uri holds a TensorFlow model")
    from airflow_modelopt.container.steps._tflite_tf import TensorFlowPath

    return TensorFlowPath(source, spec, workdir)


def _check_options(source: SourceModel, spec: TFLiteQuantizeSpec) -> None:
    """Options that do not apply to the detected source (source_format auto)."""
    if source.format == "pytorch" and spec.keep_nchw:
        raise InputError("keep_nchw applies to ONNX sources only; litert-torch keeps the PyTorch model's NCHW inputs")
    if source.format == "pytorch" and spec.allow_select_tf_ops:
        raise InputError(
            "allow_select_tf_ops applies to the TensorFlow and ONNX paths only; model_uri holds a PyTorch model "
            "(litert-torch never emits Flex ops)"
        )


# -- signature --------------------------------------------------------------------------------


def _pair(tflite: list[tuple[str, TensorInfo]], source: list[TensorIO], kind: str) -> list[tuple[TensorIO, TensorInfo, str]]:
    """Source tensors with their TFLite tensors: by signature name, else by position."""
    if len(tflite) != len(source):
        raise ConversionFailed(
            f"the TFLite model has {len(tflite)} {kind}s {[n for n, _ in tflite]} but the source model has "
            f"{len(source)}: {[s.name for s in source]}"
        )
    by_name = {name: (name, t) for name, t in tflite}
    if all(s.name in by_name for s in source):
        return [(s, by_name[s.name][1], s.name) for s in source]
    return [(s, t, name) for s, (name, t) in zip(source, tflite)]


def _tensor_spec(io_: TensorIO, t: TensorInfo) -> TensorSpec:
    quant = None
    if t.scale and np.dtype(t.dtype).kind in "iu":
        quant = Quantization(scale=t.scale, zero_point=int(t.zero_point or 0))
    return TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype, layout=io_.tflite_layout,
                      quantization=quant, source_name=io_.name)


def build_signature(report: FlatbufferReport, path: Any) -> tuple[ModelSignature, dict[str, Any]]:
    ins = _pair(report.signature.inputs, path.inputs, "input")
    outs = _pair(report.signature.outputs, path.outputs, "output")
    layouts = [io_.layout for io_, _, _ in ins if io_.layout and io_.layout not in ("NC",)]
    signature = ModelSignature(
        format="tflite",
        inputs=[_tensor_spec(io_, t) for io_, t, _ in ins],
        outputs=[_tensor_spec(io_, t) for io_, t, _ in outs],
        source_layout=layouts[0] if layouts else None,
    )
    changes = {io_.name: f"{io_.layout}->{io_.tflite_layout}" for io_, _, _ in (*ins, *outs)
               if io_.layout and io_.tflite_layout and io_.layout != io_.tflite_layout}
    names = {
        "signature_key": report.signature.key,
        "inputs": {io_.name: name for io_, _, name in ins},
        "outputs": {io_.name: name for io_, _, name in outs},
    }
    return signature, {"layout_change": changes, "signature_names": names}


# -- checks -----------------------------------------------------------------------------------


def check_integer_only(report: FlatbufferReport, spec: TFLiteQuantizeSpec) -> None:
    if spec.mode != "int8":
        return
    left = {op: n for op, n in report.float_ops.items() if op not in report.flex_ops}
    if left:
        names = ", ".join(f"{op} (x{n})" for op, n in left.items())
        raise ConversionFailed(
            f"mode='int8' asks for integer-only ops, but op {names} stays in float after quantization (no int8 kernel "
            "for it); use mode='dynamic_int8' or 'fp16', or change the model"
        )


def _interpreter(content: bytes) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=content, num_threads=1)


def run_tflite(content: bytes, signature: ModelSignature, path: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """TFLite outputs (real values, source layout) for source-layout real-valued feeds."""
    it = _interpreter(content)
    details_in = {d["name"]: d for d in it.get_input_details()}
    details_out = {d["name"]: d for d in it.get_output_details()}
    by_source = {io_.name: io_ for io_ in (*path.inputs, *path.outputs)}
    fixed = signature.inputs[0].shape[0] if signature.inputs and signature.inputs[0].shape else None
    n = next(iter(feeds.values())).shape[0]
    step = fixed if isinstance(fixed, int) else n
    chunks: list[list[np.ndarray]] = []
    allocated: tuple[int, ...] | None = None
    for start in range(0, n, step):
        part = {k: v[start:start + step] for k, v in feeds.items()}
        got = next(iter(part.values())).shape[0]
        if got < step:
            part = {k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in part.items()}
        shapes = []
        for spec in signature.inputs:
            a = to_tflite_layout(part[spec.source_name or spec.name], by_source[spec.source_name or spec.name])
            detail = details_in[spec.name]
            if tuple(detail["shape"]) != a.shape:
                it.resize_tensor_input(detail["index"], list(a.shape), strict=False)
            shapes.append(a.shape)
        if allocated != tuple(shapes):
            it.allocate_tensors()
            allocated = tuple(shapes)
            details_in = {d["name"]: d for d in it.get_input_details()}
        for spec in signature.inputs:
            a = to_tflite_layout(part[spec.source_name or spec.name], by_source[spec.source_name or spec.name])
            dtype = np.dtype(spec.dtype)
            if dtype.kind in "iu" and spec.quantization is not None:
                info = np.iinfo(dtype)
                a = np.clip(np.rint(a / spec.quantization.scale) + spec.quantization.zero_point, info.min, info.max)
            it.set_tensor(details_in[spec.name]["index"], np.ascontiguousarray(a.astype(dtype)))
        it.invoke()
        outs = []
        for spec in signature.outputs:
            o = it.get_tensor(details_out[spec.name]["index"])
            if spec.quantization is not None and o.dtype.kind in "iu":
                o = (o.astype(np.float32) - spec.quantization.zero_point) * spec.quantization.scale
            outs.append(from_tflite_layout(o, by_source[spec.source_name or spec.name])[:got])
        chunks.append(outs)
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(signature.outputs))]


def agreement(content: bytes, signature: ModelSignature, path: Any, calibration: dict[str, np.ndarray],
              samples: int) -> dict[str, float]:
    feeds = next(batches(calibration, min(samples, next(iter(calibration.values())).shape[0]), samples))
    reference = path.run_source(feeds)
    outputs = run_tflite(content, signature, path, feeds)
    metrics: dict[str, float] = {"check_samples": float(next(iter(feeds.values())).shape[0])}
    worst = 0.0
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64).reshape(ref.shape) if out.size == ref.size else out
        if out.shape != ref.shape:
            raise ConversionFailed(
                f"output {signature.outputs[i].source_name!r} of the TFLite model has shape {list(out.shape)} but the "
                f"source model gives {list(ref.shape)} for the same inputs"
            )
        worst = max(worst, float(np.abs(ref - out).max()) if ref.size else 0.0)
        if i == 0 and ref.ndim == 2 and ref.shape[1] > 1:
            metrics["top1_agreement"] = float((ref.argmax(1) == out.argmax(1)).mean())
    metrics["max_abs_error"] = worst
    return metrics


# -- the step ---------------------------------------------------------------------------------


def run(spec: TFLiteQuantizeSpec, ctx: StepContext) -> StepOutput:
    model_path = ctx.input("model_uri")
    assert model_path is not None
    source = detect_source(model_path, spec)
    _check_options(source, spec)
    path = make_path(source, spec, ctx.workdir)
    ctx.client.set_tag(ctx.run_id, TAG_PATH, path.name)
    ctx.client.set_tag(ctx.run_id, TAG_MODE, spec.mode)
    ctx.log.info("Source: %s model (%s, %d bytes) -> %s, mode %s", source.format, source.kind, source.bytes,
                 path.name, spec.mode)

    path.load()
    calibration = None
    calibration_path = ctx.input("calibration_data_uri")
    if calibration_path is not None:
        from airflow_modelopt.container.data import load_npz

        arrays = load_npz(calibration_path, field="calibration_data_uri")
        calibration = check_calibration(arrays, path.inputs, field="calibration_data_uri")
        ctx.log.info("Calibration data: %s", {k: list(v.shape) for k, v in calibration.items()})
    if not path.outputs and hasattr(path, "describe_outputs"):
        path.describe_outputs(path.sample(calibration))

    conversion = path.convert(calibration, ctx.workdir)
    report = analyze(conversion.content)
    check_integer_only(report, spec)
    signature, layout_info = build_signature(report, path)
    ctx.log.info("Converted in %.2f s: %d bytes, %d ops (%d in float, %d Flex, %d custom)",
                 conversion.conversion_time_s, len(conversion.content), report.op_count,
                 sum(report.float_ops.values()), sum(report.flex_ops.values()), sum(report.custom_ops.values()))

    metrics: dict[str, float] = {
        "tflite_bytes": float(len(conversion.content)),
        "source_bytes": float(source.bytes),
        "size_ratio": len(conversion.content) / source.bytes if source.bytes else 0.0,
        "compression_ratio": source.bytes / len(conversion.content) if conversion.content else 0.0,
        "op_count": float(report.op_count),
        "float_op_count": float(sum(report.float_ops.values())),
        "flex_op_count": float(sum(report.flex_ops.values())),
        "custom_op_count": float(sum(report.custom_ops.values())),
        "quantize_op_count": float(report.conversion_ops),
        "conversion_time_s": conversion.conversion_time_s,
    }
    if calibration is not None:
        metrics["calibration_samples"] = float(min(spec.calibration_samples, next(iter(calibration.values())).shape[0]))
    check: str = "skipped: no calibration data" if calibration is None else "skipped: check_samples is 0"
    if calibration is not None and spec.check_samples > 0:
        if report.flex_ops:
            check = "skipped: the model has Flex ops, which the LiteRT interpreter cannot run"
        else:
            metrics.update(agreement(conversion.content, signature, path, calibration, spec.check_samples))
            check = "done"
            ctx.log.info("Agreement with the source on %d samples: max abs error %.3g, top-1 agreement %s",
                         int(metrics["check_samples"]), metrics["max_abs_error"], metrics.get("top1_agreement"))

    out_dir = ctx.workdir / "tflite_model"
    out_dir.mkdir()
    (out_dir / MODEL_FILE).write_bytes(conversion.content)
    signature.write(out_dir)
    uri = ctx.log_artifact(out_dir, "tflite_model")
    info: dict[str, Any] = {
        "conversion_path": path.name,
        "source_format": source.format,
        "source_kind": source.kind,
        "mode": spec.mode,
        "io_type": spec.interface_type,
        "quantizer": conversion.quantizer,
        "signature": signature.model_dump(mode="json"),
        "signature_file": SIGNATURE_FILE,
        "model_file": MODEL_FILE,
        "check": check,
        **layout_info,
        **report.as_info(),
        **conversion.notes,
    }
    ctx.log_dict(info, "tflite_report.json")
    return StepOutput(artifacts={"tflite_model": uri}, metrics=metrics, info=info)


__all__ = ["agreement", "build_signature", "detect_source", "run", "run_tflite"]
