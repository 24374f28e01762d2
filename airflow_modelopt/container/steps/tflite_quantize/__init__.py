"""Step tflite_quantize: a PyTorch, ONNX or TensorFlow/Keras model -> TFLite, optionally quantized.

1. Detect the source (``source_format`` auto; ``source.py``): a torch.export ``.pt2`` or MLflow
   pytorch model takes litert-torch (``torch_path.py``; inputs stay NCHW); an ONNX model takes
   onnx2tf (``tf_paths.py``; channel-first inputs become NHWC); a SavedModel or Keras model takes
   TFLiteConverter (``tf_paths.py``). The path is tagged on the run (``modelopt.tflite.path``) and
   returned in ``info``.
2. Check the calibration data against the model's inputs (names, ranks, static dimensions, not
   empty) before converting anything (``common.py``).
3. Convert and quantize: fp32, fp16, dynamic-range int8, or full int8 calibrated on the
   calibration data with int8/uint8/float32 I/O.
4. Read the flatbuffer (``flatbuffer.py``): ops left in float, Flex and custom ops; full int8 must
   leave no op in float (``check.py``).
5. Write ``model.tflite`` and ``modelopt_signature.json`` (input/output names, shapes, dtypes,
   layouts, int8 quantization parameters), load them through the runtimes layer, run source and
   TFLite model on calibration samples and log their agreement (``check.py``).
6. Log the folder as artifact ``tflite_model``, and ``tflite_report.json``.
"""

from __future__ import annotations

from typing import Any

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.signature import SIGNATURE_FILE
from airflow_modelopt.container.steps.tflite_quantize.check import (
    agreement,
    build_signature,
    check_integer_only,
    run_tflite,
)
from airflow_modelopt.container.steps.tflite_quantize.common import check_calibration
from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import analyze
from airflow_modelopt.container.steps.tflite_quantize.source import detect_source, make_path, source_bytes
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

TAG_PATH = "modelopt.tflite.path"
TAG_MODE = "modelopt.tflite.mode"
MODEL_FILE = "model.tflite"
ARTIFACT = "tflite_model"


def run(spec: TFLiteQuantizeSpec, ctx: StepContext) -> StepOutput:
    model_path = ctx.input("model_uri")
    assert model_path is not None
    source = detect_source(model_path, spec)
    path = make_path(source, spec, ctx.workdir)
    ctx.client.set_tag(ctx.run_id, TAG_PATH, path.name)
    ctx.client.set_tag(ctx.run_id, TAG_MODE, spec.mode)

    path.load()
    source.bytes = source_bytes(source)
    ctx.log.info("Source: %s model (%s, %d bytes) -> %s, mode %s", source.format, source.kind, source.bytes,
                 path.name, spec.mode)
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

    out_dir = ctx.workdir / ARTIFACT
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
            ctx.log.info("Agreement with the source on %d samples: max abs error %.3g, top-1 agreement %s",
                         int(metrics["check_samples"]), metrics["max_abs_error"], metrics.get("top1_agreement"))

    from airflow_modelopt.container.pyfunc import log_step_deployable

    artifacts = log_step_deployable(ctx, out_dir, "tflite", ARTIFACT, data=calibration)
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
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = ["agreement", "build_signature", "detect_source", "run", "run_tflite"]
