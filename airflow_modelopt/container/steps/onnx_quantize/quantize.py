"""Producing the int8 models: the configurations to build, ORT's quantization pre-processing,
naming nodes (ORT excludes nodes by name), the nodes kept in fp32, ORT's quantize_dynamic /
quantize_static, and counting what got quantized."""

from __future__ import annotations

import collections
import contextlib
import difflib
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from airflow_modelopt.container.steps.onnx_quantize.calibration import CalibrationReader, Dataset
from airflow_modelopt.container.steps.onnx_quantize.model import HEAVY_OPS, OnnxModel, first_line, is_quant_op
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.onnx_quantize import FUSED_PREFIX, SEARCH_CONFIGS, OnnxQuantizeSpec

_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


@dataclass
class QuantConfig:
    name: str
    method: str  # static | dynamic
    weight_type: str
    per_channel: bool
    reduce_range: bool
    weight_symmetric: bool | None = None
    quant_format: str | None = None
    activation_type: str | None = None
    activation_symmetric: bool | None = None
    calibration_method: str | None = None
    calibration_percentile: float | None = None
    transformer_fusion: bool | None = None  # True: quantizes the transformer-fused graph
    layerwise: bool | None = None  # True: per-layer kernel choice (``layerwise``) between symmetric and asymmetric weights

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def config_name(method: str, quant_format: str | None, activation_type: str | None, weight_type: str,
                per_channel: bool, activation_symmetric: bool | None) -> str:
    short = {"uint8": "u8", "int8": "s8"}
    granularity = "per_channel" if per_channel else "per_tensor"
    if method == "dynamic":
        return f"dynamic_{short[weight_type]}_{granularity}"
    name = f"{(quant_format or 'QDQ').lower()}_{short[activation_type or 'uint8']}{short[weight_type]}_{granularity}"
    return name + ("_symmetric" if activation_symmetric else "")


def settings_key(config: QuantConfig) -> tuple[tuple[str, Any], ...]:
    """What a configuration builds, without its name: two configurations with the same key make the
    same model (weight_symmetric unset is ORT's default: symmetric for int8 weights)."""
    settings = {**config.as_dict(), "weight_symmetric": config.weight_symmetric
                if config.weight_symmetric is not None else config.weight_type == "int8"}
    settings.pop("name")
    return tuple(sorted(settings.items()))


def layerwise_parts(config: QuantConfig) -> dict[str, QuantConfig]:
    """The two models a ``layerwise`` configuration composes: its settings with symmetric and with
    asymmetric weights."""
    base = {**asdict(config), "layerwise": None}
    return {variant: QuantConfig(**{**base, "name": f"{config.name}/{variant}", "weight_symmetric": symmetric})
            for variant, symmetric in (("symmetric", True), ("asymmetric", False))}


def fused(config: QuantConfig) -> QuantConfig:
    """The same configuration on the transformer-fused graph."""
    return QuantConfig(**{**asdict(config), "name": FUSED_PREFIX + config.name, "transformer_fusion": True})


def configs_for(spec: OnnxQuantizeSpec, fuse: str | None = None) -> list[QuantConfig]:
    """The configurations to build. ``fuse``: None (no fused graph), "dynamic" (dynamic quantization
    runs on the fused graph; search tries each dynamic configuration fused and not) or "all" (every
    configuration quantizes the fused graph)."""
    calib = {"calibration_method": spec.calibration_method, "calibration_percentile": spec.calibration_percentile}
    if spec.mode == "search":
        out = []
        for name in spec.configs_to_search():
            preset = dict(SEARCH_CONFIGS[name])
            method = str(preset.pop("method"))
            config = QuantConfig(name=name, method=method, reduce_range=spec.reduce_range,
                                 **preset, **(calib if method == "static" else {}))  # type: ignore[arg-type]
            if fuse == "all":
                out.append(fused(config))
            else:
                out.append(config)
                if fuse == "dynamic" and method == "dynamic":
                    out.append(fused(config))
        return out
    if spec.mode == "dynamic":
        config = QuantConfig(
            name=config_name("dynamic", None, None, spec.weight_type, spec.per_channel, None), method="dynamic",
            weight_type=spec.weight_type, per_channel=spec.per_channel, reduce_range=spec.reduce_range,
            weight_symmetric=spec.weight_symmetric,
        )
        return [fused(config) if fuse else config]
    config = QuantConfig(
        name=config_name("static", spec.quant_format, spec.activation_type, spec.weight_type, spec.per_channel,
                         spec.activation_symmetric),
        method="static", quant_format=spec.quant_format, activation_type=spec.activation_type,
        weight_type=spec.weight_type, per_channel=spec.per_channel, reduce_range=spec.reduce_range,
        weight_symmetric=spec.weight_symmetric, activation_symmetric=spec.activation_symmetric, **calib,
    )
    return [fused(config) if fuse == "all" else config]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """ORT's quantization tools print progress to stdout, whose last line is the step's result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def preprocess(src: Path, out_dir: Path, optimize: bool, log: Any) -> tuple[Path, dict[str, Any]]:
    """ORT's quant_pre_process; falls back to ONNX shape inference when symbolic inference fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    started = time.monotonic()
    errors = []
    # ORT's symbolic shape inference saves the model it could not finish as sym_shape_infer_temp.onnx
    # (+ external data) in the working directory: run it in a scratch folder, not the worker's cwd.
    scratch = out_dir.parent / f"{out_dir.name}.scratch"
    scratch.mkdir(exist_ok=True)
    for symbolic in (True, False):
        try:
            with _stdout_to_stderr(), contextlib.chdir(scratch):
                quant_pre_process(
                    str(src), str(out), skip_optimization=not optimize, skip_symbolic_shape=not symbolic,
                    save_as_external_data=True, all_tensors_to_one_file=True, external_data_location="model.onnx.data",
                )
            info = {"applied": True, "symbolic_shape_inference": symbolic, "optimized": optimize,
                    "seconds": round(time.monotonic() - started, 3)}
            if errors:
                info["symbolic_shape_inference_error"] = errors[0]
            return out, info
        except Exception as exc:  # noqa: BLE001 - retried without symbolic inference, then reported
            errors.append(first_line(exc))
            log.warning("quant_pre_process (symbolic shape inference %s) failed: %s", symbolic, errors[-1])
            for p in out_dir.iterdir():
                p.unlink()
    raise ConversionFailed(
        "ONNX Runtime's quantization pre-processing (quant_pre_process) failed: with symbolic shape inference: "
        f"{errors[0]}; without: {errors[1]}. Set preprocess=false to quantize the model as it is"
    )


def name_nodes(src: OnnxModel, out_dir: Path) -> Path:
    """A copy of the model where every node has a unique name (ORT excludes nodes by name)."""
    import onnx

    model = onnx.load(str(src.path))
    taken = {n.name for n in model.graph.node if n.name}
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if not node.name:
            while True:
                counts[node.op_type] += 1
                candidate = f"{node.op_type}_{counts[node.op_type]}"
                if candidate not in taken:
                    break
            node.name = candidate
            taken.add(candidate)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return out


def resolve_exclusions(spec: OnnxQuantizeSpec, source: OnnxModel, working: OnnxModel) -> dict[str, str]:
    """{node name in the working model: why it stays fp32}; unknown names and op types are input errors."""
    excluded: dict[str, str] = {}
    source_names = set(source.node_names)
    working_names = set(working.node_names)
    for name in spec.nodes_to_exclude:
        if name not in source_names and name not in working_names:
            close = difflib.get_close_matches(name, sorted(source_names | working_names), n=3)
            hint = f"; did you mean {close}?" if close else f"; the model's nodes include {sorted(source_names)[:10]}"
            raise InputError(f"nodes_to_exclude: the model has no node named {name!r}{hint}")
        if name not in working_names:
            raise InputError(
                f"nodes_to_exclude: node {name!r} was merged away by ORT's pre-processing optimization; set "
                "preprocess_optimize=false to keep it, or exclude the node that replaced it"
            )
        excluded[name] = "nodes_to_exclude"
    if spec.op_types_to_exclude:
        import onnx

        model = onnx.load(str(working.path), load_external_data=False)
        present = {n.op_type for n in model.graph.node}
        unknown = [t for t in spec.op_types_to_exclude if t not in present and t not in source.op_histogram]
        if unknown:
            raise InputError(
                f"op_types_to_exclude: the model has no {unknown} nodes; its op types are {sorted(source.op_histogram)}"
            )
        fused = [t for t in spec.op_types_to_exclude if t not in present]
        if fused:
            raise InputError(
                f"op_types_to_exclude: ORT's pre-processing optimization fused every {fused} node into other ops "
                f"(now {sorted(present)}); set preprocess_optimize=false to keep them, or exclude the fused op type"
            )
        for node in model.graph.node:
            if node.op_type in spec.op_types_to_exclude:
                excluded.setdefault(node.name, f"op_types_to_exclude ({node.op_type})")
    return excluded


def quantize(config: QuantConfig, model_path: Path, out_dir: Path, calibration: Dataset | None, batch: int,
             exclude: list[str], cache_dir: Path) -> Path:
    """One configuration; ConversionFailed names the configuration and ORT's reason."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    extra: dict[str, Any] = {}
    if config.weight_symmetric is not None:
        extra["WeightSymmetric"] = config.weight_symmetric
    try:
        with _stdout_to_stderr():
            if config.method == "dynamic":
                quantize_dynamic(
                    str(model_path), str(out), per_channel=config.per_channel, reduce_range=config.reduce_range,
                    weight_type=getattr(QuantType, _QUANT_TYPES[config.weight_type]),
                    nodes_to_exclude=list(exclude), use_external_data_format=True, extra_options=extra,
                )
            else:
                assert calibration is not None and config.calibration_method is not None
                reader = CalibrationReader(calibration.features, batch)
                extra["ActivationSymmetric"] = bool(config.activation_symmetric)
                if reader.stride():
                    extra["CalibStridedMinMax"] = reader.stride()
                if config.calibration_percentile is not None:
                    extra["CalibPercentile"] = config.calibration_percentile
                quantize_static(
                    str(model_path), str(out), reader,
                    quant_format=getattr(QuantFormat, config.quant_format or "QDQ"),
                    activation_type=getattr(QuantType, _QUANT_TYPES[config.activation_type or "uint8"]),
                    weight_type=getattr(QuantType, _QUANT_TYPES[config.weight_type]),
                    per_channel=config.per_channel, reduce_range=config.reduce_range,
                    nodes_to_exclude=list(exclude), use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, config.calibration_method),
                    calibration_cache_path=str(cache_dir / f"calibration_{config.calibration_method}.json"),
                    extra_options=extra,
                )
    except Exception as exc:  # noqa: BLE001 - ORT's own message names the op or tensor
        call = "quantize_dynamic" if config.method == "dynamic" else "quantize_static"
        raise ConversionFailed(f"ONNX Runtime {call} failed for configuration {config.name!r}: {first_line(exc)}") from None
    return out


def node_stats(path: Path) -> dict[str, Any]:
    """Quantized nodes by op type (QOperator/dynamic kernels, Q/DQ nodes, float ops in QDQ form)
    and the weight-carrying float ops left in fp32.

    A float op is in QDQ form when every input it computes on comes from a DequantizeLinear
    (non-float initializers such as shapes do not count); one with a float initializer input
    (an fp32 weight) or an input straight from a float op stays fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    init_types = {i.name: i.data_type for i in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    quantized: collections.Counter[str] = collections.Counter()
    qdq: collections.Counter[str] = collections.Counter()
    fp32: list[dict[str, str]] = []

    def from_dq(name: str) -> bool:
        if name in init_types:
            return init_types[name] not in float_types
        node = producer.get(name)
        return node is not None and node.op_type in ("DequantizeLinear", "Constant")

    for node in model.graph.node:
        if is_quant_op(node.op_type):
            quantized[node.op_type] += 1
            continue
        inputs = [i for i in node.input if i]
        if inputs and all(from_dq(i) for i in inputs) and any(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in inputs):
            qdq[node.op_type] += 1
        elif node.op_type in HEAVY_OPS:
            fp32.append({"name": node.name, "op_type": node.op_type})
    plumbing = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    compute = sum(v for k, v in quantized.items() if k not in plumbing)
    return {
        "quantized_nodes": dict(sorted(quantized.items())),
        "qdq_nodes": dict(sorted(qdq.items())),
        "quantized_compute_nodes": compute + sum(qdq.values()),
        "fp32_nodes": fp32,
        "node_count": len(model.graph.node),
    }
