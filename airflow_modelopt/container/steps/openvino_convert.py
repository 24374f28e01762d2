"""Step openvino_convert: ONNX or .pt2 -> OpenVINO IR (fp32, fp16 weights, or NNCF int8).

1. Read the source through the runtimes layer (ONNX, or a .pt2 ExportedProgram loaded under the
   trust policy) and convert it with ``openvino.convert_model``.
2. int8: ``nncf.quantize`` on up to ``calibration_samples`` calibration samples (one per batch), or,
   with ``max_accuracy_drop``, ``nncf.quantize_with_accuracy_control``, which measures top-1 accuracy
   (argmax of the first output against labels ``y``) on the eval data and returns the layers that
   cost most to fp32 until the drop is within the limit.
3. ``openvino.save_model`` -> ``model.xml`` + ``model.bin`` (fp16 weights for precision fp16), with
   ``modelopt_signature.json`` (the source's tensors) beside them: artifact ``openvino_model``.
4. Check: the IR against its source on the eval (else calibration) data, both timed at batch 1
   (``_deploy_common.check_against_source``), and the IR's items/s under the THROUGHPUT hint.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps._deploy_common import (
    Source,
    check_against_source,
    converted_signature,
    file_bytes,
    read_data,
    read_source,
)
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.openvino_convert import OpenVINOConvertSpec

ARTIFACT = "openvino_model"
IR_FILE = "model.xml"
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:1500]


def convert(source: Source) -> Any:
    """``ov.convert_model`` of the source: the ONNX file, or the loaded ExportedProgram."""
    import openvino as ov

    if source.format == "pt2":
        from airflow_modelopt.container.runtimes.torch_backend import load_exported_program

        model_in: Any = load_exported_program(source.path, field="model_uri", origin=source.uri)
    else:
        model_in = str(source.path)
    try:
        return ov.convert_model(model_in)
    except Exception as exc:  # noqa: BLE001 - the converter's words name the op
        raise ConversionFailed(f"model_uri: OpenVINO could not convert {source.uri}: {_first_line(exc)}") from None


def samples(feeds: dict[str, np.ndarray], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """One batch-1 feed per sample, keyed by input name."""
    n = next(iter(feeds.values())).shape[0]
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(min(n, limit or n))]


def quantize(model: Any, spec: OpenVINOConvertSpec, calibration: dict[str, np.ndarray],
             evaluation: tuple[dict[str, np.ndarray], np.ndarray | None] | None, ctx: StepContext) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training int8, plain or accuracy-aware."""
    import nncf

    items = samples(calibration, spec.calibration_samples)
    cal = nncf.Dataset(items)
    preset = nncf.QuantizationPreset.PERFORMANCE if spec.preset == "performance" else nncf.QuantizationPreset.MIXED
    common = {"preset": preset, "subset_size": spec.calibration_samples,
              "fast_bias_correction": spec.fast_bias_correction}
    kept = sorted({op.get_type_name() for op in model.get_ops()} & set(spec.fp32_op_types))
    if kept:
        ctx.log.info("NNCF leaves %s in floating point (fp32_op_types)", kept)
        common["ignored_scope"] = nncf.IgnoredScope(types=kept)
    if spec.max_accuracy_drop is None:
        ctx.log.info("NNCF post-training quantization on %d calibration samples", len(items))
        return nncf.quantize(model, cal, **common), {"method": "nncf.quantize", "calibration_samples": len(items),
                                                     "fp32_op_types": kept}

    assert evaluation is not None  # the spec requires eval_data_uri
    feeds, labels = evaluation
    if labels is None:
        raise InputError("eval_data_uri: max_accuracy_drop needs labels; the .npz has no 'y' array")
    inputs = samples(feeds)
    if len(labels) != len(inputs):
        raise InputError(f"eval_data_uri: {len(labels)} labels in 'y' for {len(inputs)} samples")
    pairs = list(zip(inputs, (int(y) for y in labels)))
    val = nncf.Dataset(pairs, lambda pair: pair[0])

    def top1(compiled: Any, data: Any) -> float:
        hits = [int(np.argmax(compiled(x)[0]) == y) for x, y in data]
        return float(np.mean(hits)) if hits else 0.0

    ctx.log.info("NNCF accuracy-aware quantization: max absolute top-1 drop %.4f on %d eval samples",
                 spec.max_accuracy_drop, len(pairs))
    quantized = nncf.quantize_with_accuracy_control(
        model, cal, val, validation_fn=top1, max_drop=spec.max_accuracy_drop, drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )
    return quantized, {"method": "nncf.quantize_with_accuracy_control", "max_drop": spec.max_accuracy_drop,
                       "calibration_samples": len(items), "fp32_op_types": kept}


def op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return counts


def throughput(xml: Any, feeds: dict[str, np.ndarray], spec: OpenVINOConvertSpec) -> dict[str, float]:
    from airflow_modelopt.container.runtimes import load

    with load(xml, "openvino", threads=spec.threads, field="openvino_model") as runtime:
        return runtime.throughput_mode(runtime.prepare(feeds), seconds=spec.throughput_seconds)


def run(spec: OpenVINOConvertSpec, ctx: StepContext) -> StepOutput:
    import openvino as ov

    model_path = ctx.input("model_uri")
    assert model_path is not None
    source = read_source(model_path, spec.model_uri, ("onnx", "pt2"))
    calibration = read_data(ctx.input("calibration_data_uri"), source, field="calibration_data_uri")
    evaluation = read_data(ctx.input("eval_data_uri"), source, field="eval_data_uri")

    started = time.perf_counter()
    model = convert(source)
    metrics: dict[str, float] = {"conversion_time_s": time.perf_counter() - started}
    info: dict[str, Any] = {"openvino_version": ov.get_version(), "precision": spec.precision,
                            "source_format": source.format}
    if spec.precision == "int8":
        assert calibration is not None
        started = time.perf_counter()
        try:
            model, info["quantization"] = quantize(model, spec, calibration[0], evaluation, ctx)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - NNCF's words name the layer
            raise ConversionFailed(f"model_uri: NNCF could not quantize {spec.model_uri}: {_first_line(exc)}") from None
        metrics["quantize_time_s"] = time.perf_counter() - started
        metrics["fake_quantize_nodes"] = float(op_counts(model).get("FakeQuantize", 0))

    folder = ctx.workdir / ARTIFACT
    folder.mkdir()
    xml = folder / IR_FILE
    ov.save_model(model, str(xml), compress_to_fp16=spec.precision == "fp16")
    converted_signature(source, "openvino").write(folder)
    ir_bytes = file_bytes([xml, xml.with_suffix(".bin")])
    metrics.update({"ir_bytes": float(ir_bytes), "source_bytes": float(source.bytes),
                    "size_ratio": ir_bytes / source.bytes if source.bytes else 0.0,
                    "precision_bits": float(PRECISION_BITS[spec.precision])})
    ctx.log.info("Saved %s IR: %d bytes (source %d)", spec.precision, ir_bytes, source.bytes)

    check = evaluation or calibration
    if check is not None:
        feeds, labels = check
        info["checked_on"] = "eval_data_uri" if evaluation else "calibration_data_uri"
        metrics.update(check_against_source(source, xml, "openvino", feeds, labels, threads=spec.threads))
        if spec.throughput_seconds > 0:
            metrics.update(throughput(xml, {k: v[:1] for k, v in feeds.items()}, spec))
        ctx.log.info("IR vs source: %s", {k: round(v, 4) for k, v in metrics.items()})
    from airflow_modelopt.container.pyfunc import log_step_deployable

    artifacts = log_step_deployable(ctx, folder, "openvino", ARTIFACT, data=check[0] if check is not None else None)
    info["signature"] = converted_signature(source, "openvino").model_dump(mode="json")
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = ["ARTIFACT", "IR_FILE", "convert", "op_counts", "quantize", "run", "samples"]
