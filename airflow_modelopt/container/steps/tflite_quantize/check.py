"""The converted model's signature (source tensors paired with TFLite tensors), the integer-only
check of full int8, and the agreement of the written model with its source.

The agreement check loads the written ``model.tflite`` with its ``modelopt_signature.json``
through the runtimes layer, exactly as validate and benchmark will, and compares outputs with
``airflow_modelopt.container.measure.agreement``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.signature import ModelSignature, Quantization, TensorSpec
from airflow_modelopt.container.steps.tflite_quantize.common import TensorIO, batches
from airflow_modelopt.container.steps.tflite_quantize.flatbuffer import FlatbufferReport, TensorInfo
from airflow_modelopt.exceptions import ConversionFailed
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

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
    by_shape = _pair_by_shape(tflite, source)
    if by_shape is not None:
        return by_shape
    return [(s, t, name) for s, (name, t) in zip(source, tflite)]


def _fits(source: list[int | None], tflite: list[int | None]) -> bool:
    """The TFLite shape is the source's (or the source's channel-last form), batch aside."""
    if len(source) != len(tflite):
        return False
    moved = [source[0], *source[2:], source[1]] if len(source) >= 3 else source
    return any(all(a is None or b is None or a == b for a, b in zip(cand[1:], tflite[1:])) for cand in (source, moved))


def _pair_by_shape(tflite: list[tuple[str, TensorInfo]], source: list[TensorIO]) -> list[tuple[TensorIO, TensorInfo, str]] | None:
    """Pairs by shape when the names differ (onnx2tf's signature names are not the ONNX names, and the
    converter orders a signature's tensors its own way): only when every source tensor fits exactly
    one TFLite tensor and no two fit the same one; None otherwise (position decides)."""
    pairs = []
    for s in source:
        fits = [(name, t) for name, t in tflite if _fits(list(s.shape), list(t.shape))]
        if len(fits) != 1:
            return None
        pairs.append((s, fits[0][1], fits[0][0]))
    if len({t.index for _, t, _ in pairs}) != len(pairs):
        return None
    return pairs


def _tensor_spec(io_: TensorIO, t: TensorInfo) -> TensorSpec:
    quant = None
    if t.scale and np.dtype(t.dtype).kind in "iu":
        quant = Quantization(scale=t.scale, zero_point=int(t.zero_point or 0))
    return TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype, layout=io_.tflite_layout,
                      quantization=quant, source_name=io_.name)


def build_signature(report: FlatbufferReport, path: Any) -> tuple[ModelSignature, dict[str, Any]]:
    """The TFLite model's signature record, and the layout changes and signature names for ``info``."""
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
    # An input-side lookup (integer ids from a graph input, a constant table, read by QUANTIZE only)
    # is allowed: it is where the model's input enters the integer graph (reported as
    # ``float_input_lookups``); any other float op is refused.
    left = {op: n - report.input_lookups.get(op, 0) for op, n in report.float_ops.items() if op not in report.flex_ops}
    left = {op: n for op, n in left.items() if n > 0}
    if left:
        names = ", ".join(f"{op} (x{n})" for op, n in left.items())
        raise ConversionFailed(
            f"mode='int8' asks for integer-only ops, but op {names} stays in float after quantization (no int8 kernel "
            "for it); use mode='dynamic_int8' or 'fp16', or change the model"
        )


def run_tflite(model_file: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The written TFLite model's outputs (real values, source layout) for source-layout feeds,
    run through the runtimes layer with the signature recorded beside it."""
    from airflow_modelopt.container.runtimes import load

    with load(model_file, "tflite", threads=1, field="tflite_model") as runtime:
        return runtime.run(feeds, field="calibration_data_uri")


def agreement(model_file: Path, path: Any, calibration: dict[str, np.ndarray], samples: int) -> dict[str, float]:
    """Source and TFLite outputs on the first ``samples`` calibration samples: ``check_samples``
    plus ``measure.agreement``'s ``max_abs_error`` and (for a classifier) ``top1_agreement``."""
    from airflow_modelopt.container.measure import agreement as compare

    n = min(samples, next(iter(calibration.values())).shape[0])
    feeds = next(batches(calibration, n, n))
    reference = [np.asarray(r) for r in path.run_source(feeds)]
    outputs = run_tflite(model_file, feeds)
    for ref, out, io_ in zip(reference, outputs, path.outputs):
        if out.size != ref.size:
            raise ConversionFailed(
                f"output {io_.name!r} of the TFLite model has shape {list(out.shape)} but the source model gives "
                f"{list(ref.shape)} for the same inputs"
            )
    return {"check_samples": float(n), **compare(reference, outputs)}


__all__ = ["agreement", "build_signature", "check_integer_only", "run_tflite"]
