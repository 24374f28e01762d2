"""What ``model_uri`` holds, which converter path takes it, and how many bytes the source model is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_modelopt.container.artifacts import mlflow_flavors
from airflow_modelopt.container.steps.tflite_quantize.common import SourceModel
from airflow_modelopt.exceptions import InputError
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

#: Files of an MLflow model folder that are not the model itself (left out of source_bytes).
_MLFLOW_METADATA = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
                    "serving_input_example.json", "registered_model_meta", "metadata.json"}
_KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript", ".jit"}


def detect_source(path: Path, spec: TFLiteQuantizeSpec) -> SourceModel:
    """The converter path for the fetched model artifact, checked against ``source_format``."""
    found = _detect(path, spec.model_uri)
    if spec.source_format != "auto" and spec.source_format != found.format:
        raise InputError(
            f"source_format={spec.source_format!r} but model_uri {spec.model_uri} holds a {found.format} model "
            f"({found.kind}); set source_format='auto' or give a {spec.source_format} model"
        )
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
    flavors = mlflow_flavors(path, uri)
    if flavors is not None:
        return _detect_mlflow(path, flavors, uri)
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


def _detect_mlflow(path: Path, flavors: dict[str, Any], uri: str) -> SourceModel:
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
    """Bytes of the source model itself: an ONNX graph and the external data it names (the runtimes
    layer's count), else the file, or the folder without MLflow's metadata files."""
    if source.format == "onnx":
        from airflow_modelopt.container.runtimes.onnx_backend import onnx_files

        return sum(p.stat().st_size for p in onnx_files(source.path))
    root = source.root
    if root.is_file():
        return root.stat().st_size
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in _MLFLOW_METADATA
             and "metadata" not in p.relative_to(root).parts[:1]]
    return sum(p.stat().st_size for p in files)


def make_path(source: SourceModel, spec: TFLiteQuantizeSpec, workdir: Path) -> Any:
    """The converter path for the source, its options checked first (``source_format`` auto)."""
    if source.format == "pytorch":
        if spec.keep_nchw:
            raise InputError("keep_nchw applies to ONNX sources only; litert-torch keeps the PyTorch model's NCHW "
                             "inputs")
        if spec.allow_select_tf_ops:
            raise InputError(
                "allow_select_tf_ops applies to the TensorFlow and ONNX paths only; model_uri holds a PyTorch model "
                "(litert-torch never emits Flex ops)"
            )
        from airflow_modelopt.container.steps.tflite_quantize.torch_path import TorchPath

        return TorchPath(source, spec)
    if source.format == "onnx":
        from airflow_modelopt.container.steps.tflite_quantize.tf_paths import OnnxPath

        return OnnxPath(source, spec, workdir)
    if spec.keep_nchw:
        raise InputError("keep_nchw applies to ONNX sources only; model_uri holds a TensorFlow model")
    from airflow_modelopt.container.steps.tflite_quantize.tf_paths import TensorFlowPath

    return TensorFlowPath(source, spec, workdir)


__all__ = ["detect_source", "make_path", "source_bytes"]
