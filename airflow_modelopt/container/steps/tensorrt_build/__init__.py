"""Step tensorrt_build: ONNX model -> serialized TensorRT engine (fp32, fp16 or calibrated int8).

Written to TensorRT 10's Python API; needs the ``tensorrt`` package, an NVIDIA GPU with its
driver, and ``cuda-python`` for device selection and the int8 calibrator's device memory (through
``runtimes/cuda.py``, the wrapper the TensorRT runtime uses too). All three are imported lazily: on
a worker without them the step fails at once with :class:`UnsupportedHere` (exit code 6, not
retried) and a message saying what is missing and where the step can run (``environment.py``).

1. Check the environment: ``import tensorrt``, a CUDA device at index ``device``, cuda-python.
2. Locate the ONNX file (a .onnx file, a folder with model.onnx + external data, or an MLflow
   onnx-flavor folder; ``artifacts.locate_onnx``) and parse it with ``trt.OnnxParser.parse_from_file`` (which reads the
   external data next to the file). Parser errors name the node, its operator and TensorRT's text.
3. Builder config: workspace pool limit, builder optimization level, detailed profiling
   verbosity (for the engine inspector), ``BuilderFlag.FP16`` / ``INT8`` for the precision.
4. Optimization profiles (``profiles.py``): one ``set_shape(name, min, opt, max)`` per input per profile, from the
   spec or, for inputs whose only dynamic dimension is the batch, from opt/max_batch_size.
5. int8 (``calibrator.py``): an ``IInt8EntropyCalibrator2`` feeds batches drawn in order from the calibration .npz
   at the opt shape of profile 0 (the calibration profile).
6. Timing cache (``timing_cache.py``): started from ``timing_cache_uri`` when given (ignored with a warning if
   TensorRT rejects it), serialized after the build and saved beside the engine.
7. ``build_serialized_network`` (``builder.py``) -> ``model.engine``; the engine inspector counts its layers.

Output folder (artifact ``tensorrt_engine``): ``model.engine``, ``modelopt_signature.json``
(format ``tensorrt``), ``timing.cache`` (artifact ``timing_cache``), and for int8
``calibration.cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow_modelopt.container.artifacts import locate_onnx as locate_onnx_artifact
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import load_npz
from airflow_modelopt.container.signature import ModelSignature
from airflow_modelopt.container.steps.tensorrt_build.builder import Built, build_engine, layer_types, signature_for
from airflow_modelopt.container.steps.tensorrt_build.environment import (
    Environment,
    GpuInfo,
    UnsupportedHere,
    check_environment,
    gpu_status,
    unavailable_reason,
)
from airflow_modelopt.container.steps.tensorrt_build.timing_cache import (
    CALIBRATION_CACHE_FILE,
    TIMING_CACHE_FILE,
    read_timing_cache,
)
from airflow_modelopt.specs.tensorrt_build import PRECISION_BITS, TensorRTBuildSpec

ENGINE_FILE = "model.engine"
ARTIFACT = "tensorrt_engine"


def locate_onnx(path: Path, uri: str) -> Path:
    """The .onnx file of a file, a model folder, or an MLflow onnx-flavor folder."""
    return locate_onnx_artifact(path, uri, purpose="; TensorRT builds from ONNX")


def onnx_bytes(onnx_path: Path) -> int:
    """Size of the ONNX graph plus the external data files it names (the runtimes layer's
    session-free count: TensorRT may parse models ONNX Runtime cannot load)."""
    from airflow_modelopt.container.runtimes.onnx_backend import onnx_files

    return sum(p.stat().st_size for p in onnx_files(onnx_path))


def run(spec: TensorRTBuildSpec, ctx: StepContext) -> StepOutput:
    env = check_environment(spec)
    gpu_name = env.gpu.names[spec.device] if spec.device < len(env.gpu.names) else f"device {spec.device}"
    ctx.log.info("TensorRT %s on CUDA device %d (%s)", env.version, spec.device, gpu_name)

    model_path = ctx.input("model_uri")
    assert model_path is not None
    onnx_path = locate_onnx(model_path, spec.model_uri)
    arrays = None
    if spec.precision == "int8":
        data_path = ctx.input("calibration_data_uri")
        assert data_path is not None
        arrays = load_npz(data_path, field="calibration_data_uri")
    timing_in = read_timing_cache(ctx.input("timing_cache_uri"), spec.timing_cache_uri)

    env.memory.set_device(spec.device)
    built = build_engine(onnx_path, spec, calibration_arrays=arrays, timing_cache=timing_in, memory=env.memory,
                         out=ctx.log)
    ctx.log.info("Built in %.1f s: %d bytes, %s layers", built.build_time_s, len(built.engine),
                 built.engine_layers if built.engine_layers is not None else "?")

    folder = ctx.workdir / ARTIFACT
    folder.mkdir(parents=True)
    (folder / ENGINE_FILE).write_bytes(built.engine)
    (folder / TIMING_CACHE_FILE).write_bytes(built.timing_cache)
    if built.calibration_cache:
        (folder / CALIBRATION_CACHE_FILE).write_bytes(built.calibration_cache)
    try:
        source_sig = ModelSignature.read(onnx_path.parent)
    except Exception:  # noqa: BLE001 - a broken record of the source is not this step's to fix
        source_sig = None
    signature = signature_for(built, source_sig)
    signature.write(folder)
    from airflow_modelopt.container.pyfunc import log_step_deployable

    deployable = log_step_deployable(ctx, folder, "tensorrt", ARTIFACT)

    profiles = [{n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in p.items()} for p in built.profiles]
    source_bytes = onnx_bytes(onnx_path)
    metrics: dict[str, float] = {
        "build_time_s": built.build_time_s,
        "engine_bytes": float(len(built.engine)),
        "onnx_bytes": float(source_bytes),
        "size_ratio": len(built.engine) / source_bytes if source_bytes else 0.0,
        "precision_bits": float(PRECISION_BITS[spec.precision]),
        "network_layers": float(built.network_layers),
        "timing_cache_bytes": float(len(built.timing_cache)),
        "timing_cache_reused": 1.0 if built.timing_cache_reused else 0.0,
        "optimization_profiles": float(len(built.profiles)),
    }
    if built.engine_layers is not None:
        metrics["num_layers"] = float(built.engine_layers)
    if built.calibration is not None:
        summary = built.calibration.summary()
        metrics["calibration_batches"] = float(summary["batches"])
        metrics["calibration_samples"] = float(summary["samples_used"])
    artifacts = {**deployable, "timing_cache": ctx.artifact_uri(f"{ARTIFACT}/{TIMING_CACHE_FILE}")}
    if built.layer_info is not None:
        artifacts["layer_info"] = ctx.log_dict(built.layer_info, "tensorrt_layers.json")
    info = {
        "tensorrt_version": env.version,
        "gpu": {"device": spec.device, "name": gpu_name,
                "compute_capability": env.gpu.compute_capabilities[spec.device]
                if spec.device < len(env.gpu.compute_capabilities) else None,
                "memory_mb": env.gpu.memory_mb[spec.device] if spec.device < len(env.gpu.memory_mb) else None,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
        "precision": spec.precision,
        "builder_flags": built.flags,
        "profiles": profiles,
        "calibration": built.calibration.summary() if built.calibration is not None else None,
        "timing_cache_reused": built.timing_cache_reused,
        "layer_types": layer_types(built.layer_info),
        "signature": signature.model_dump(mode="json"),
        "engine_file": ENGINE_FILE,
    }
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = [
    "ARTIFACT", "CALIBRATION_CACHE_FILE", "ENGINE_FILE", "TIMING_CACHE_FILE", "Built", "Environment", "GpuInfo",
    "UnsupportedHere", "build_engine", "check_environment", "gpu_status", "layer_types", "locate_onnx", "onnx_bytes",
    "read_timing_cache", "run", "unavailable_reason",
]
