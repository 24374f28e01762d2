"""Every TensorRT call of the step: parse the ONNX file, configure the builder (workspace,
optimization level, precision flags, optimization profiles, int8 calibrator, timing cache), build
the serialized engine and inspect it; and the engine's signature record."""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.signature import ModelSignature, TensorSpec
from airflow_modelopt.container.steps.tensorrt_build.calibrator import (
    Calibration,
    calibration_batches,
    make_calibrator,
)
from airflow_modelopt.container.steps.tensorrt_build.profiles import (
    IOTensor,
    Shapes,
    network_io,
    precision_flags,
    resolve_profiles,
)
from airflow_modelopt.container.steps.tensorrt_build.timing_cache import attach_timing_cache
from airflow_modelopt.exceptions import ConversionFailed, InputError, ModelOptError, StepFailed, UnsupportedHere
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec

log = logging.getLogger("airflow_modelopt.container.steps.tensorrt_build")


def make_logger(trt: Any, out: logging.Logger) -> Any:
    """A trt.ILogger forwarding to Python logging and keeping the errors for failure messages."""
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(msg))
                out.error("TensorRT: %s", msg)
            elif level == severity.WARNING:
                out.warning("TensorRT: %s", msg)
            elif level == severity.INFO:
                out.debug("TensorRT: %s", msg)

    return _Logger()


def _call(obj: Any, name: str, default: Any = None) -> Any:
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else default
    except Exception:  # noqa: BLE001 - optional detail
        return default


def parser_errors(parser: Any, onnx_path: Path) -> str:
    """Every ONNX parser error with its node index, node name, operator, code and text."""
    parts = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        node = _call(err, "node", -1)
        name = _call(err, "node_name", "")
        op = _call(err, "node_operator", "")
        code = str(_call(err, "code", "")).rsplit(".", 1)[-1]
        where = []
        if node is not None and int(node) >= 0:
            where.append(f"node {int(node)}")
        if name:
            where.append(repr(name))
        if op:
            where.append(f"(op {op})")
        text = str(_call(err, "desc", "") or err).strip()
        parts.append(f"{' '.join(where) or 'graph'}: {text}" + (f" [{code}]" if code else ""))
    return f"TensorRT's ONNX parser rejected {onnx_path.name}: " + ("; ".join(parts) or "no error reported")


def _bytes(buffer: Any) -> bytes:
    return bytes(memoryview(buffer))


def inspect_engine(trt: Any, logger: Any, engine: bytes, out: logging.Logger) -> tuple[int | None, dict[str, Any] | None]:
    """(layer count, engine inspector JSON) of the built engine; (None, None) if it cannot be inspected."""
    try:
        runtime = trt.Runtime(logger)
        deserialized = runtime.deserialize_cuda_engine(engine)
        if deserialized is None:
            return None, None
        layers = int(deserialized.num_layers)
        inspector = deserialized.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return layers, info
    except Exception as exc:  # noqa: BLE001 - inspection is a report, not the product
        out.warning("Could not inspect the engine: %s", exc)
        return None, None


_OOM_MARKERS = ("out of memory", "outofmemory", "cudaerrormemoryallocation", "insufficient memory",
                "could not allocate")


@dataclass
class Built:
    engine: bytes
    timing_cache: bytes
    timing_cache_reused: bool
    build_time_s: float
    inputs: list[IOTensor]
    outputs: list[IOTensor]
    network_layers: int
    profiles: list[dict[str, Shapes]]
    flags: list[str]
    calibration: Calibration | None = None
    calibration_cache: bytes | None = None
    engine_layers: int | None = None
    layer_info: dict[str, Any] | None = None


def build_engine(onnx_path: Path, spec: TensorRTBuildSpec, *, calibration_arrays: dict[str, np.ndarray] | None,
                 timing_cache: bytes | None, memory: Any, out: logging.Logger = log) -> Built:
    """Parse, configure and build; every TensorRT call of the step happens here."""
    import tensorrt as trt

    logger = make_logger(trt, out)
    init_error = ""
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - pybind raises TypeError when CUDA cannot initialise
        builder, init_error = None, f"{type(exc).__name__}: {exc}"
    if builder is None:
        errors = "; ".join([*logger.errors, init_error] if init_error else logger.errors) or "no error reported"
        raise UnsupportedHere(f"TensorRT could not create a builder on CUDA device {spec.device}: {errors}")

    network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch dimension
    parser = trt.OnnxParser(network, logger)
    out.info("Parsing %s", onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        raise ConversionFailed(parser_errors(parser, onnx_path))
    inputs, outputs = network_io(trt, network)
    out.info("Network: %d layers; inputs %s; outputs %s", network.num_layers,
             {t.name: t.shape for t in inputs}, {t.name: t.shape for t in outputs})
    profiles = resolve_profiles(spec, inputs)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
    config.builder_optimization_level = spec.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    flags = precision_flags(spec)
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))

    trt_profiles = []
    for i, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in shapes.items():
            profile.set_shape(name, lo, mid, hi)
        if config.add_optimization_profile(profile) < 0:
            raise InputError(f"optimization_profiles[{i}]: TensorRT refused the profile {shapes}: "
                             + ("; ".join(logger.errors) or "invalid shapes"))
        trt_profiles.append(profile)
        out.info("Optimization profile %d: %s", i, {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in shapes.items()})

    calibration = calibrator = None
    if spec.precision == "int8":
        assert calibration_arrays is not None
        calibration = calibration_batches(calibration_arrays, inputs, profiles, spec)
        out.info("int8 calibration: %d batch(es) of %d sample(s) from %d available", len(calibration.batches),
                 calibration.batch_size, calibration.samples_available)
        calibrator = make_calibrator(trt, calibration, memory)
        config.int8_calibrator = calibrator
        if trt_profiles:
            config.set_calibration_profile(trt_profiles[0])

    reused = attach_timing_cache(trt, config, timing_cache, out)
    out.info("Building %s engine (flags %s, optimization level %d, workspace %d MiB)", spec.precision,
             flags or ["none"], spec.builder_optimization_level, spec.workspace_mb)
    started = time.monotonic()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.release()
    build_time = time.monotonic() - started
    if calibrator is not None and calibrator.error is not None:
        err = calibrator.error
        raise err if isinstance(err, ModelOptError) else StepFailed(f"int8 calibration failed: {err}")
    if serialized is None:
        errors = "; ".join(logger.errors) or "no error reported"
        message = f"TensorRT failed to build the {spec.precision} engine from {onnx_path.name}: {errors}"
        if any(m in errors.lower() for m in _OOM_MARKERS):
            raise StepFailed(message + f" (workspace_mb={spec.workspace_mb}; another GPU or a retry may help)")
        raise ConversionFailed(message)
    engine = _bytes(serialized)
    timing = _bytes(config.get_timing_cache().serialize())
    engine_layers, layer_info = inspect_engine(trt, logger, engine, out)
    return Built(
        engine=engine, timing_cache=timing, timing_cache_reused=reused, build_time_s=build_time, inputs=inputs,
        outputs=outputs, network_layers=int(network.num_layers), profiles=profiles, flags=flags,
        calibration=calibration, calibration_cache=calibrator.cache if calibrator is not None else None,
        engine_layers=engine_layers, layer_info=layer_info,
    )


def signature_for(built: Built, source: ModelSignature | None) -> ModelSignature:
    """The engine keeps the ONNX model's tensors; layouts/quantization carry over from its record."""
    recorded = {t.name: t for t in [*(source.inputs if source else []), *(source.outputs if source else [])]}

    def spec_of(t: IOTensor) -> TensorSpec:
        prior = recorded.get(t.name)
        return TensorSpec(
            name=t.name, shape=[None if d < 0 else d for d in t.shape], dtype=t.dtype,
            layout=prior.layout if prior else None, quantization=prior.quantization if prior else None,
            source_name=(prior.source_name or t.name) if prior else t.name,
        )

    return ModelSignature(format="tensorrt", inputs=[spec_of(t) for t in built.inputs],
                          outputs=[spec_of(t) for t in built.outputs],
                          source_layout=source.source_layout if source else None)


def layer_types(info: dict[str, Any] | None) -> dict[str, int]:
    layers = (info or {}).get("Layers") or []
    counts = collections.Counter(str(layer.get("LayerType", "?")) for layer in layers if isinstance(layer, dict))
    return dict(sorted(counts.items()))


__all__ = ["Built", "build_engine", "layer_types", "parser_errors", "signature_for"]
