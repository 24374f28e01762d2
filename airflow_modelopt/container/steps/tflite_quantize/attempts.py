"""One conversion attempt (a source model -> the TFLite folder, checked), and the fallback between two.

``convert_one`` is steps 1-5 of the step for one source. ``convert_with_fallback`` tries
``model_uri``, then ``fallback_model_uri`` when the first converter is not installed or fails on the
model. A PyTorch source whose converter (litert-torch) is not in this Python runs in the Python
``MODELOPT_LITERT_PYTHON`` names (``worker.py``: the same ``convert_one`` there, local files only, no
MLflow), which is how local mode reaches the venv ``scripts/make-litert-venv.sh`` makes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.signature import SIGNATURE_FILE
from airflow_modelopt.exceptions import ConversionFailed, InputError, ModelOptError
from airflow_modelopt.specs.tflite_quantize import LITERT_PYTHON_ENV, TFLiteQuantizeSpec

MODEL_FILE = "model.tflite"
ARTIFACT = "tflite_model"
#: Converter path -> the distribution whose version is recorded.
CONVERTER_DISTRIBUTIONS = {"litert_torch": "litert-torch", "onnx2tf": "onnx2tf", "tflite_converter": "tensorflow"}
_CALIBRATION_FILE = "calibration_checked.npz"


class ConverterUnavailable(ModelOptError):
    """The source's converter is not installed here (and no other Python is configured for it)."""

    exit_code = ConversionFailed.exit_code
    retryable = False


@dataclass
class Built:
    """A converted, checked TFLite folder with what the step reports about it."""

    out_dir: Path
    metrics: dict[str, float]
    info: dict[str, Any]
    calibration: dict[str, np.ndarray] | None = None
    attempts: list[dict[str, str]] = field(default_factory=list)


def converter_version(path_name: str) -> str:
    dist = CONVERTER_DISTRIBUTIONS.get(path_name, path_name)
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def convert_one(spec: TFLiteQuantizeSpec, model_path: Path, calibration_path: Path | None, workdir: Path,
                log: logging.Logger) -> Built:
    """Detect, load, check the calibration data, convert, analyze and check the model; write the folder."""
    from airflow_modelopt.container.steps.tflite_quantize.check import (
        agreement,
        build_signature,
        check_integer_only,
    )
    from airflow_modelopt.container.steps.tflite_quantize.common import check_calibration
    from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source, make_path, source_bytes

    source = detect_source(model_path, spec)
    path = make_path(source, spec, workdir)
    path.load()
    source.bytes = source_bytes(source)
    log.info("Source: %s model (%s, %d bytes) -> %s, mode %s", source.format, source.kind, source.bytes,
             path.name, spec.mode)
    calibration = None
    if calibration_path is not None:
        from airflow_modelopt.container.data import load_npz

        arrays = load_npz(calibration_path, field="calibration_data_uri")
        calibration = check_calibration(arrays, path.inputs, field="calibration_data_uri")
        log.info("Calibration data: %s", {k: list(v.shape) for k, v in calibration.items()})
    if not path.outputs and hasattr(path, "describe_outputs"):
        path.describe_outputs(path.sample(calibration))

    conversion = path.convert(calibration, workdir)
    report = analyze(conversion.content)
    check_integer_only(report, spec)
    if spec.mode == "int8" and report.input_lookups:
        log.info("Left in float: %s, the input-side lookup of a constant table by the integer input ids, quantized "
                 "right after it (allowed in int8: it is where the ids enter the integer graph)", report.input_lookups)
    signature, layout_info = build_signature(report, path)
    log.info("Converted in %.2f s: %d bytes, %d ops (%d in float, %d Flex, %d custom)",
             conversion.conversion_time_s, len(conversion.content), report.op_count,
             sum(report.float_ops.values()), sum(report.flex_ops.values()), sum(report.custom_ops.values()))

    out_dir = workdir / ARTIFACT
    out_dir.mkdir()
    (out_dir / MODEL_FILE).write_bytes(conversion.content)
    signature.write(out_dir)

    size = len(conversion.content)
    metrics: dict[str, float] = {
        "tflite_bytes": float(size),
        "source_bytes": float(source.bytes),
        "size_ratio": size / source.bytes if source.bytes else 0.0,
        "compression_ratio": source.bytes / size if size else 0.0,
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
            metrics.update(agreement(out_dir / MODEL_FILE, path, calibration, spec.check_samples))
            check = "done"
            log.info("Agreement with the source on %d samples: max abs error %.3g, top-1 agreement %s",
                     int(metrics["check_samples"]), metrics["max_abs_error"], metrics.get("top1_agreement"))
    info: dict[str, Any] = {
        "conversion_path": path.name,
        "converter": CONVERTER_DISTRIBUTIONS.get(path.name, path.name),
        "converter_version": converter_version(path.name),
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
    return Built(out_dir, metrics, info, calibration)


# -- litert-torch in another Python ---------------------------------------------------------------


def _needs_other_python(model_path: Path, spec: TFLiteQuantizeSpec) -> bool:
    """A PyTorch source while litert-torch is not importable here."""
    if importlib.util.find_spec("litert_torch") is not None:
        return False
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source

    return detect_source(model_path, spec).format == "pytorch"


def convert_elsewhere(python: str, spec: TFLiteQuantizeSpec, model_path: Path, calibration_path: Path | None,
                      workdir: Path, log: logging.Logger) -> Built:
    """``convert_one`` in ``python`` (``worker.py``): its log goes to this step's log, its result
    comes back as the last stdout line, a failure as the same exception class."""
    request = {"spec": json.loads(spec.model_dump_json()), "model_path": str(model_path),
               "calibration_path": str(calibration_path) if calibration_path else None, "workdir": str(workdir)}
    log.info("litert-torch is not installed in this Python; converting in %s (%s)", python, LITERT_PYTHON_ENV)
    try:
        proc = subprocess.run([python, "-m", "airflow_modelopt.container.steps.tflite_quantize.worker"],
                              input=json.dumps(request), stdout=subprocess.PIPE, stderr=None, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    except OSError as exc:
        raise ConverterUnavailable(f"{LITERT_PYTHON_ENV}={python} cannot be started: {exc}") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {}
    if not reply.get("ok"):
        message = reply.get("message") or f"the litert-torch worker in {python} exited with code {proc.returncode}"
        if reply.get("error") == "ImportError" or (not lines and proc.returncode != 0):
            raise ConverterUnavailable(message)
        raise InputError(message) if reply.get("exit_code") == InputError.exit_code else ConversionFailed(message)
    calibration = None
    if reply.get("calibration_file"):
        with np.load(reply["calibration_file"]) as data:
            calibration = {k: data[k] for k in data.files}
    info = {**reply["info"], "converter_python": python}
    return Built(Path(reply["out_dir"]), {k: float(v) for k, v in reply["metrics"].items()}, info, calibration)


def convert_source(spec: TFLiteQuantizeSpec, model_path: Path, calibration_path: Path | None, workdir: Path,
                   log: logging.Logger) -> Built:
    """One source, converted in this Python or, for litert-torch when it is not here, in its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    if _needs_other_python(model_path, spec):
        python = os.environ.get(LITERT_PYTHON_ENV, "").strip()
        if not python:
            raise ConverterUnavailable(
                f"litert-torch is not installed in this Python ({sys.executable}) and {LITERT_PYTHON_ENV} names no "
                "Python that has it (local mode: set [modelopt] litert_python to the venv scripts/make-litert-venv.sh "
                "makes; the tensorflow image has it)"
            )
        if not Path(python).exists():
            raise ConverterUnavailable(f"{LITERT_PYTHON_ENV}={python} does not exist (litert-torch is not installed "
                                       f"in this Python, {sys.executable})")
        return convert_elsewhere(python, spec, model_path, calibration_path, workdir, log)
    return convert_one(spec, model_path, calibration_path, workdir, log)


# -- the fallback ------------------------------------------------------------------------------------


def convert_with_fallback(spec: TFLiteQuantizeSpec, inputs: dict[str, Path], workdir: Path, log: logging.Logger,
                          on_failure: Callable[[str, str], None] | None = None) -> Built:
    """``model_uri``, else ``fallback_model_uri`` when the first one's converter is missing or fails.

    Bad calibration data fails at once (the fallback would refuse it too); so does the fallback's
    own failure, its message carrying the first one's."""
    model_path = inputs["model_uri"]
    calibration_path = inputs.get("calibration_data_uri")
    fallback_path = inputs.get("fallback_model_uri")
    first_spec = spec
    if fallback_path is not None:
        # keep_nchw and allow_select_tf_ops are the fallback's options when the first source is PyTorch.
        from airflow_modelopt.container.steps.tflite_quantize.source import detect_source

        if detect_source(model_path, spec).format == "pytorch":
            first_spec = spec.model_copy(update={"keep_nchw": False, "allow_select_tf_ops": False})
    try:
        built = convert_source(first_spec, model_path, calibration_path, workdir / "first", log)
        built.info.update({"converted_from": "model_uri", "fallback_reason": None})
        return built
    except Exception as exc:  # noqa: BLE001 - any failure of the first converter (an op, a trace error) falls back
        if fallback_path is None or _is_calibration_error(exc):
            raise
        if not isinstance(exc, ModelOptError):
            exc = ConversionFailed(f"{type(exc).__name__}: {exc}")
        first_path = _path_name(model_path, spec)
        reason = _first_line(str(exc))
        log.warning("%s could not convert model_uri (%s); falling back to fallback_model_uri %s", first_path, reason,
                    spec.fallback_model_uri)
        if on_failure is not None:
            on_failure(first_path, str(exc))
    fallback_spec = spec.model_copy(update={"model_uri": spec.fallback_model_uri, "fallback_model_uri": None,
                                            "source_format": "auto"})
    try:
        built = convert_source(fallback_spec, fallback_path, calibration_path, workdir / "fallback", log)
    except ModelOptError as exc:
        raise type(exc)(f"fallback_model_uri: {exc} (after {first_path} failed on model_uri: {reason})") from None
    built.info.update({"converted_from": "fallback_model_uri", "fallback_from": first_path,
                       "fallback_reason": f"{first_path}: {reason}"})
    return built


def _is_calibration_error(exc: BaseException) -> bool:
    return isinstance(exc, InputError) and "calibration_data_uri" in str(exc)


def _first_line(text: str) -> str:
    text = text.strip()
    return (text.splitlines() or [""])[0][:1000]


def _path_name(model_path: Path, spec: TFLiteQuantizeSpec) -> str:
    from airflow_modelopt.container.steps.tflite_quantize.source import detect_source

    fmt = detect_source(model_path, spec).format
    return {"pytorch": "litert_torch", "onnx": "onnx2tf", "tensorflow": "tflite_converter"}.get(fmt, fmt)


def save_calibration(calibration: dict[str, np.ndarray] | None, workdir: Path, samples: int = 8) -> str | None:
    """The first checked calibration samples (the MLflow model's input example), for the parent step."""
    if calibration is None:
        return None
    target = workdir / _CALIBRATION_FILE
    np.savez(target, **{k: v[:samples] for k, v in calibration.items()})
    return str(target)
