"""Container side: load a model of any supported format and run it behind one small interface.

    from airflow_modelopt.container.runtimes import load

    with load("model_folder_or_file", threads=1) as rt:   # format detected, or format="tflite"
        rt.inputs, rt.outputs        # TensorSpec lists: name, shape, dtype, layout, quantization
        outs = rt.run({"x": x})      # float inputs in the source layout -> float32 outputs

Formats and their runtimes:

| format | what | runtime |
| --- | --- | --- |
| ``pt2`` | torch.export ExportedProgram | torch |
| ``torchscript`` | TorchScript archive (.pt, .pth, .ts, ...) | torch |
| ``pytorch`` | an MLflow pytorch model folder without a .pt2 (pickled module) | mlflow.pytorch + torch |
| ``onnx`` | .onnx file, or an MLflow onnx folder (model.onnx + external data) | ONNX Runtime (CPU; CUDA / TensorRT EPs with ``device="auto"``) |
| ``tflite`` | .tflite flatbuffer | ai-edge-litert (LiteRT) interpreter, else tf.lite.Interpreter |
| ``savedmodel`` | TF SavedModel folder (saved_model.pb) | tensorflow (serving_default signature) |
| ``keras`` | .keras / .h5 | Keras 3 or tf_keras, chosen from the file's recorded Keras version |
| ``tensorrt`` | serialized engine (.engine, .plan, .trt) | tensorrt + CUDA (needs a GPU) |
| ``openvino`` | OpenVINO IR (.xml + its .bin) | OpenVINO CPU plugin |
| ``mnn`` | .mnn model | MNN CPU backend (Module API) |

Detection: the file suffix; for a folder, its MLflow ``MLmodel`` flavors (onnx, pytorch),
``saved_model.pb``, or the single model file inside. ``modelopt_signature.json`` beside the model
(``airflow_modelopt.container.signature``) completes what the model does not record: layout (NHWC models
converted from NCHW sources), int8/uint8 I/O quantization, source tensor names and output order.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from airflow_modelopt.container.artifacts import mlflow_flavors
from airflow_modelopt.container.runtimes.base import Runtime, dequantize, layout_perm, quantize
from airflow_modelopt.container.signature import SIGNATURE_FILE, ModelSignature
from airflow_modelopt.exceptions import InputError, ModelOptError
from airflow_modelopt.specs.formats import FORMAT_IMAGE_FAMILY, MODEL_FORMATS, SUFFIX_FORMATS

log = logging.getLogger("airflow_modelopt.container.runtimes")

#: format -> (module under airflow_modelopt.container.runtimes, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "pt2": ("torch_backend", "TorchRuntime"),
    "torchscript": ("torch_backend", "TorchRuntime"),
    "pytorch": ("torch_backend", "TorchRuntime"),
    "onnx": ("onnx_backend", "OnnxRuntime"),
    "tflite": ("tflite_backend", "TFLiteRuntime"),
    "savedmodel": ("tf_backend", "SavedModelRuntime"),
    "keras": ("tf_backend", "KerasRuntime"),
    "tensorrt": ("tensorrt_backend", "TensorRTRuntime"),
    "openvino": ("openvino_backend", "OpenVINORuntime"),
    "mnn": ("mnn_backend", "MNNRuntime"),
}

#: Files in a model folder that are metadata, never the model.
_METADATA = {"MLmodel", SIGNATURE_FILE, "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
             "serving_input_example.json", "registered_model_meta"}


def _formats_text() -> str:
    return ", ".join(MODEL_FORMATS)


def _read_signature(*folders: Path) -> ModelSignature | None:
    for folder in folders:
        try:
            sig = ModelSignature.read(folder)
        except Exception as exc:  # noqa: BLE001 - a broken record is the user's to fix
            raise InputError(f"{folder / SIGNATURE_FILE} is not a valid model signature: {exc}") from None
        if sig is not None:
            return sig
    return None


def _model_files(folder: Path, fmt: str | None) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in _METADATA:
            continue
        found = SUFFIX_FORMATS.get(p.suffix.lower())
        if found and (fmt is None or found == fmt or (fmt == "pt2" and found == "torchscript")):
            files.append(p)
    return files


def detect(path: Path | str, format: str | None = None, *, field: str = "model") -> tuple[str, Path, ModelSignature | None]:
    """(format, path to load, recorded signature or None) for a model file or folder."""
    path = Path(path)
    if format is not None and format not in MODEL_FORMATS:
        raise InputError(f"{field}: unknown model format {format!r}; expected one of {_formats_text()}")
    if not path.exists():
        raise InputError(f"{field}: {path} does not exist")
    fmt, target = _detect(path, format, field)
    base = target if target.is_dir() else target.parent
    sig = _read_signature(base, path) if path.is_dir() else _read_signature(base)
    if sig is not None and sig.format != fmt:
        log.warning("%s: %s records format %r but the model is %s; ignoring it", field, SIGNATURE_FILE, sig.format, fmt)
        sig = None
    return fmt, target, sig


def _detect(path: Path, fmt: str | None, field: str) -> tuple[str, Path]:
    if path.is_file():
        if path.name == "saved_model.pb" and fmt in (None, "savedmodel"):
            return "savedmodel", path.parent
        if fmt is not None:
            return fmt, path
        found = SUFFIX_FORMATS.get(path.suffix.lower())
        if found is None:
            sig = _read_signature(path.parent)
            if sig is not None and sig.format in MODEL_FORMATS:
                return sig.format, path
            raise InputError(
                f"{field}: cannot tell the format of {path.name} from its suffix; name it with a known suffix "
                f"({', '.join(sorted(SUFFIX_FORMATS))}) or give the format ({_formats_text()})"
            )
        return found, path

    flavors = mlflow_flavors(path, field=field)
    if flavors is not None:
        if "onnx" in flavors and fmt in (None, "onnx"):
            target = path / str(flavors["onnx"].get("data") or "model.onnx")
            if not target.is_file():
                raise InputError(f"{field}: MLflow onnx model {path} has no {target.name}")
            return "onnx", target
        if "pytorch" in flavors and fmt in (None, "pt2", "torchscript", "pytorch"):
            data = path / str(flavors["pytorch"].get("model_data") or "data")
            if fmt != "pytorch":
                pt2 = sorted(data.rglob("*.pt2")) if data.is_dir() else []
                if len(pt2) == 1:
                    return "pt2", pt2[0]
            return "pytorch", path
    if (path / "saved_model.pb").is_file() and fmt in (None, "savedmodel"):
        return "savedmodel", path
    files = _model_files(path, fmt)
    saved = sorted({p.parent for p in path.rglob("saved_model.pb")})
    if fmt in (None, "savedmodel") and len(saved) == 1 and not files:
        return "savedmodel", saved[0]
    if len(files) == 1:
        return fmt or SUFFIX_FORMATS[files[0].suffix.lower()], files[0]
    sig = _read_signature(path)
    if len(files) > 1 and sig is not None:
        mine = [f for f in files if SUFFIX_FORMATS[f.suffix.lower()] == sig.format]
        if len(mine) == 1:
            return sig.format, mine[0]
    shown = [str(f.relative_to(path)) for f in files] + [f"{s.relative_to(path)}/ (SavedModel)" for s in saved]
    if not shown:
        raise InputError(
            f"{field}: found no model in folder {path} (looked for an MLflow MLmodel with an onnx or pytorch flavor, "
            f"saved_model.pb, or a file ending in {', '.join(sorted(SUFFIX_FORMATS))})"
        )
    raise InputError(f"{field}: folder {path} holds several models {shown}; point at one, or give the format")


def load(path: Path | str, format: str | None = None, *, threads: int = 1, device: str = "cpu",
         field: str = "model", origin: str | None = None) -> Runtime:
    """Load a model file or folder; ``format`` overrides the detection. ``threads`` sets the
    runtime's intra-op threads; ``device`` is ``cpu`` or ``auto`` (GPU providers when present).
    Errors name ``field`` (the spec field the model came from) and ``origin`` (its URI)."""
    if threads < 1:
        raise InputError(f"{field}: threads must be at least 1, got {threads}")
    fmt, target, sig = detect(path, format, field=field)
    origin = origin or str(path)
    module_name, class_name = BACKENDS[fmt]
    try:
        module = importlib.import_module(f"airflow_modelopt.container.runtimes.{module_name}")
        cls = getattr(module, class_name)
        # torch's loaders may refuse a file's code (container/trust.py) and name the spec field
        named = {"field": field} if module_name == "torch_backend" else {}
        runtime = cls(target, fmt=fmt, threads=threads, signature=sig, device=device, origin=origin, **named)
    except ModelOptError:
        raise
    except ImportError as exc:
        family = FORMAT_IMAGE_FAMILY[fmt]
        raise InputError(
            f"{field}: {origin} is a {fmt} model but its runtime is not installed here ({exc}); run this step in "
            f"an image with the {family!r} family's frameworks (image= / [modelopt] image_overrides)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the runtime's own words name the problem
        text = str(exc).strip().splitlines()[0][:1500] if str(exc).strip() else ""
        raise InputError(f"{field}: {origin} does not load as a {fmt} model: {type(exc).__name__}: {text}") from None
    log.info("Loaded %s (%s) with %s, %d thread(s): inputs %s, outputs %s", origin, fmt, runtime.runtime_name,
             threads, [(s.name, s.shape, s.dtype, s.layout) for s in runtime.inputs],
             [(s.name, s.shape, s.dtype) for s in runtime.outputs])
    return runtime


__all__ = ["BACKENDS", "MODEL_FORMATS", "Runtime", "dequantize", "detect", "layout_perm", "load", "quantize"]
