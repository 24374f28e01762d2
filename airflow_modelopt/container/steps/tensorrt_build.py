"""Step tensorrt_build: ONNX model -> serialized TensorRT engine (fp32, fp16 or calibrated int8).

Written to TensorRT 10's Python API; needs the ``tensorrt`` package, an NVIDIA GPU with its
driver, and ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) for device
selection and the int8 calibrator's device memory. All three are imported lazily: on a worker
without them the step fails at once with :class:`UnsupportedHere` (exit code 6, not retried)
and a message saying what is missing and where the step can run.

1. Check the environment: ``import tensorrt``, a CUDA device at index ``device``, cuda-python.
2. Locate the ONNX file (a .onnx file, a folder with model.onnx + external data, or an MLflow
   onnx-flavor folder) and parse it with ``trt.OnnxParser.parse_from_file`` (which reads the
   external data next to the file). Parser errors name the node, its operator and TensorRT's text.
3. Builder config: workspace pool limit, builder optimization level, detailed profiling
   verbosity (for the engine inspector), ``BuilderFlag.FP16`` / ``INT8`` for the precision.
4. Optimization profiles: one ``set_shape(name, min, opt, max)`` per input per profile, from the
   spec or, for inputs whose only dynamic dimension is the batch, from opt/max_batch_size.
5. int8: an ``IInt8EntropyCalibrator2`` feeds batches drawn in order from the calibration .npz
   at the opt shape of profile 0 (the calibration profile).
6. Timing cache: started from ``timing_cache_uri`` when given (ignored with a warning if
   TensorRT rejects it), serialized after the build and saved beside the engine.
7. ``build_serialized_network`` -> ``model.engine``; the engine inspector counts its layers.

Output folder (artifact ``tensorrt_engine``): ``model.engine``, ``modelopt_signature.json``
(format ``tensorrt``), ``timing.cache`` (artifact ``timing_cache``), and for int8
``calibration.cache``.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.artifacts import locate_onnx as locate_onnx_artifact
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import as_model_dtype, load_npz, match_inputs
from airflow_modelopt.container.signature import ModelSignature, TensorSpec
from airflow_modelopt.exceptions import ConversionFailed, InputError, ModelOptError, StepFailed, UnsupportedHere
from airflow_modelopt.specs.tensorrt_build import PRECISION_BITS, TensorRTBuildSpec

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
CALIBRATION_CACHE_FILE = "calibration.cache"
ARTIFACT = "tensorrt_engine"

log = logging.getLogger("airflow_modelopt.container.steps.tensorrt_build")


# -- environment ------------------------------------------------------------------------------


def _cudart() -> Any | None:
    """cuda-python's CUDA runtime module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            return None
    return cudart


def _cuda_error_text(cudart: Any, err: Any) -> str:
    name = getattr(err, "name", None) or f"CUDA error {int(err)}"
    try:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - the name alone is enough
        text = ""
    return f"{name}: {text}" if text else name


@dataclass
class GpuInfo:
    """What this worker can tell about its NVIDIA GPUs."""

    count: int = 0
    names: list[str] = field(default_factory=list)
    compute_capabilities: list[str] = field(default_factory=list)
    memory_mb: list[int] = field(default_factory=list)
    reason: str | None = None  # why none is usable, when count == 0
    cuda_python: bool = False


def gpu_status() -> GpuInfo:
    """The CUDA devices visible here, asked through cuda-python (else device files / nvidia-smi)."""
    cudart = _cudart()
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0:
            reason = f"the CUDA runtime reports {_cuda_error_text(cudart, err)}"
            if not glob.glob("/dev/nvidia[0-9]*"):
                reason += "; no /dev/nvidia* device: no NVIDIA GPU or driver is visible to this process"
            return GpuInfo(reason=reason, cuda_python=True)
        if not count:
            return GpuInfo(reason="the CUDA runtime sees no CUDA device", cuda_python=True)
        info = GpuInfo(count=int(count), cuda_python=True)
        for i in range(int(count)):
            err, props = cudart.cudaGetDeviceProperties(i)
            if int(err) != 0:
                info.names.append(f"device {i} ({_cuda_error_text(cudart, err)})")
                info.compute_capabilities.append("?")
                info.memory_mb.append(0)
                continue
            name = props.name
            info.names.append((name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip())
            info.compute_capabilities.append(f"{props.major}.{props.minor}")
            info.memory_mb.append(int(props.totalGlobalMem) >> 20)
        return info
    # Without cuda-python: enough to say what is there, not enough to build.
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    smi = shutil.which("nvidia-smi")
    names: list[str] = []
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            names = [line.split(":", 1)[1].split("(UUID", 1)[0].strip() for line in out.stdout.splitlines()
                     if line.startswith("GPU ") and ":" in line]
        except (OSError, subprocess.SubprocessError):
            names = []
    if names or devices:
        return GpuInfo(count=len(names) or len(devices), names=names,
                       reason="cuda-python is not installed, so the GPU cannot be used from Python")
    parts = ["cuda-python is not installed", "no /dev/nvidia* device",
             "nvidia-smi not found" if not smi else "nvidia-smi lists no GPU"]
    return GpuInfo(reason="; ".join(parts))


def tensorrt_status() -> tuple[Any | None, str]:
    """(the tensorrt module, its version) or (None, why it does not import)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        return None, f"import tensorrt failed: {type(exc).__name__}: {exc}"
    return trt, str(getattr(trt, "__version__", "unknown"))


def unavailable_reason() -> str | None:
    """None when TensorRT, cuda-python and a GPU are all here, else why not (for test skips)."""
    trt, trt_text = tensorrt_status()
    gpu = gpu_status()
    missing = []
    if trt is None:
        missing.append(trt_text)
    if gpu.count == 0 or not gpu.cuda_python:
        missing.append(f"no usable NVIDIA GPU ({gpu.reason})")
    return "; ".join(missing) or None


_WHERE_TO_RUN = {
    "local": "local mode runs the step in this worker's Python: point the operator's python= (or [modelopt] "
             "local_python) at an environment with tensorrt and cuda-python on a GPU machine, or use docker or "
             "kubernetes mode with the 'tensorrt' image",
    "docker": "in docker mode use the 'tensorrt' image on a host with the NVIDIA Container Toolkit and pass "
              "docker_kwargs={'device_requests': [docker.types.DeviceRequest(count=-1, capabilities=[['gpu']])]}",
    "kubernetes": "in kubernetes mode TensorRTBuildOperator requests nvidia.com/gpu: 1 (with a toleration for "
                  "nvidia.com/gpu) and runs the 'tensorrt' image; check the node has the NVIDIA device plugin",
}


@dataclass
class Environment:
    trt: Any
    version: str
    gpu: GpuInfo
    memory: Any  # CudaMemory


def check_environment(spec: TensorRTBuildSpec) -> Environment:
    """TensorRT, cuda-python and a GPU at ``spec.device``; else UnsupportedHere saying what is missing."""
    trt, trt_text = tensorrt_status()
    gpu = gpu_status()
    where = _WHERE_TO_RUN.get(spec.context.execution_mode, _WHERE_TO_RUN["local"])
    if trt is None or gpu.count == 0:
        if trt is None and gpu.count == 0:
            has = "neither"
        elif trt is None:
            has = f"an NVIDIA GPU ({', '.join(gpu.names) or gpu.count}) but not the tensorrt package"
        else:
            has = f"the tensorrt package ({trt_text}) but no NVIDIA GPU"
        details = [trt_text] if trt is None else []
        if gpu.count == 0:
            details.append(f"no NVIDIA GPU: {gpu.reason}")
        raise UnsupportedHere(
            f"TensorRT target needs an NVIDIA GPU and the tensorrt package; this worker has {has} "
            f"({'; '.join(details)}). Not retried: {where}."
        )
    cudart = _cudart()
    if cudart is None:
        raise UnsupportedHere(
            f"TensorRT target needs cuda-python (device selection and int8 calibration memory); this worker has "
            f"tensorrt {trt_text} and {gpu.count} GPU(s) but cuda-python does not import: install the "
            f"airflow-modelopt[tensorrt] extra. {where}."
        )
    if spec.device >= gpu.count:
        listed = ", ".join(f"{i}: {n}" for i, n in enumerate(gpu.names)) or str(gpu.count)
        raise InputError(f"device: CUDA device {spec.device} does not exist; this worker sees {gpu.count} ({listed})")
    return Environment(trt, trt_text, gpu, CudaMemory(cudart))


class CudaMemory:
    """Device selection and device buffers through cuda-python's runtime API."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise StepFailed(f"CUDA {what} failed: {_cuda_error_text(self.rt, err)}")
        return rest[0] if len(rest) == 1 else rest

    def set_device(self, index: int) -> None:
        self._check(self.rt.cudaSetDevice(index), f"cudaSetDevice({index})")

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def copy_to_device(self, pointer: int, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpy(pointer, host.ctypes.data, host.nbytes, kind), "cudaMemcpy host->device")

    def free(self, pointer: int) -> None:
        self.rt.cudaFree(pointer)


# -- inputs -----------------------------------------------------------------------------------


def locate_onnx(path: Path, uri: str) -> Path:
    """The .onnx file of a file, a model folder, or an MLflow onnx-flavor folder."""
    return locate_onnx_artifact(path, uri, purpose="; TensorRT builds from ONNX")


def onnx_bytes(onnx_path: Path) -> int:
    """Size of the ONNX graph plus the external data files its initializers name."""
    files = {onnx_path.resolve()}
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    files.add((onnx_path.parent / entry.value).resolve())
    except Exception:  # noqa: BLE001 - no onnx here, or an unreadable graph: count the usual names
        files.update(p.resolve() for p in onnx_path.parent.iterdir() if p.suffix == ".data")
    return sum(p.stat().st_size for p in files if p.is_file())


def read_timing_cache(path: Path | None, uri: str | None) -> bytes | None:
    if path is None:
        return None
    if path.is_dir():
        named = path / TIMING_CACHE_FILE
        found = [named] if named.is_file() else sorted(path.rglob("*.cache"))
        found = [p for p in found if p.name != CALIBRATION_CACHE_FILE]
        if len(found) != 1:
            raise InputError(
                f"timing_cache_uri: {uri} is a folder with {len(found)} timing cache files; expected {TIMING_CACHE_FILE} "
                "(the timing_cache artifact of an earlier tensorrt_build)"
            )
        path = found[0]
    data = path.read_bytes()
    if not data:
        raise InputError(f"timing_cache_uri: {uri} is an empty file")
    return data


# -- TensorRT pieces --------------------------------------------------------------------------


@dataclass
class IOTensor:
    name: str
    shape: list[int]  # -1 for a dynamic dimension
    dtype: str

    @property
    def dynamic_dims(self) -> list[int]:
        return [d for d, n in enumerate(self.shape) if n < 0]


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


def network_io(trt: Any, network: Any) -> tuple[list[IOTensor], list[IOTensor]]:
    def describe(t: Any) -> IOTensor:
        try:
            dtype = np.dtype(trt.nptype(t.dtype)).name
        except Exception:  # noqa: BLE001 - a TensorRT type numpy has no name for
            dtype = str(t.dtype).rsplit(".", 1)[-1].lower()
        return IOTensor(str(t.name), [int(d) for d in t.shape], dtype)

    inputs = [describe(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [describe(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


Shapes = tuple[list[int], list[int], list[int]]


def resolve_profiles(spec: TensorRTBuildSpec, inputs: list[IOTensor]) -> list[dict[str, Shapes]]:
    """The optimization profiles to build, checked against the parsed network's inputs."""
    by_name = {t.name: t for t in inputs}
    dynamic = [t for t in inputs if t.dynamic_dims]
    if spec.optimization_profiles:
        resolved = []
        for i, profile in enumerate(spec.optimization_profiles):
            where = f"optimization_profiles[{i}]"
            unknown = [n for n in profile if n not in by_name]
            if unknown:
                raise InputError(f"{where} names input(s) {unknown} which the model does not have; its inputs are "
                                 f"{[t.name for t in inputs]}")
            uncovered = [f"{t.name!r} (shape {t.shape})" for t in dynamic if t.name not in profile]
            if uncovered:
                raise InputError(f"{where} gives no min/opt/max shapes for dynamic input(s) {', '.join(uncovered)}")
            shapes: dict[str, Shapes] = {}
            for name, rng in profile.items():
                t = by_name[name]
                if len(rng.min) != len(t.shape):
                    raise InputError(f"{where}[{name!r}] has rank {len(rng.min)} but the model's input {name!r} has "
                                     f"shape {t.shape} (rank {len(t.shape)})")
                for d, fixed in enumerate(t.shape):
                    given = {rng.min[d], rng.opt[d], rng.max[d]}
                    if fixed >= 0 and given != {fixed}:
                        raise InputError(
                            f"{where}[{name!r}] dimension {d} is fixed to {fixed} in the model (shape {t.shape}), but "
                            f"min/opt/max give {rng.min[d]}/{rng.opt[d]}/{rng.max[d]}"
                        )
                shapes[name] = (list(rng.min), list(rng.opt), list(rng.max))
            resolved.append(shapes)
        return resolved
    if not dynamic:
        return []
    shapes = {}
    for t in dynamic:
        if t.dynamic_dims != [0]:
            raise InputError(
                f"optimization_profiles: input {t.name!r} has dynamic dimension(s) {t.dynamic_dims} (shape {t.shape}) "
                "besides the batch; give optimization_profiles with min/opt/max shapes for it"
            )
        rest = t.shape[1:]
        shapes[t.name] = ([1, *rest], [spec.opt_batch_size, *rest], [spec.max_batch_size, *rest])
    return [shapes]


@dataclass
class Calibration:
    batches: list[dict[str, np.ndarray]]
    batch_size: int
    samples_available: int
    requested: int

    def summary(self) -> dict[str, Any]:
        return {"batches": len(self.batches), "batch_size": self.batch_size, "samples_used": len(self.batches) *
                self.batch_size, "samples_available": self.samples_available, "batches_requested": self.requested}


def calibration_batches(arrays: dict[str, np.ndarray], inputs: list[IOTensor], profiles: list[dict[str, Shapes]],
                        spec: TensorRTBuildSpec) -> Calibration:
    """Batches at the calibration shape (opt shape of profile 0, or the fixed input shape), in data order."""
    field_name = "calibration_data_uri"
    matched = match_inputs(arrays, [t.name for t in inputs], field=field_name)
    targets: dict[str, list[int]] = {}
    feeds: dict[str, np.ndarray] = {}
    for t in inputs:
        a = as_model_dtype(matched[t.name])
        if profiles and t.name in profiles[0]:
            target, what = profiles[0][t.name][1], "the opt shape of optimization profile 0 (calibration profile)"
        else:
            target, what = t.shape, "the model's fixed input shape"
        if list(a.shape[1:]) != list(target[1:]):
            raise InputError(
                f"{field_name}: input {t.name!r} has samples of shape {list(a.shape[1:])} but calibration runs at "
                f"{target}, {what}; the dimensions after the batch must match"
            )
        want = np.dtype(t.dtype) if t.dtype in np.sctypeDict else None
        if want is not None and a.dtype != want:
            if a.dtype.kind != want.kind:
                raise InputError(f"{field_name}: input {t.name!r} is {a.dtype.name} but the model takes {want.name}")
            a = a.astype(want)
        targets[t.name], feeds[t.name] = target, a
    available = next(iter(feeds.values())).shape[0]
    per_input = {name: available // max(target[0], 1) for name, target in targets.items()}
    count = min([spec.calibration_batches, *per_input.values()])
    if count < 1:
        name = min(per_input, key=per_input.get)  # type: ignore[arg-type]
        raise InputError(
            f"{field_name}: holds {available} samples but one calibration batch of input {name!r} needs "
            f"{targets[name][0]} (the batch of {targets[name]}); give more samples or a smaller opt batch"
        )
    batches = []
    for i in range(count):
        batches.append({name: np.ascontiguousarray(a[i * targets[name][0]:(i + 1) * targets[name][0]])
                        for name, a in feeds.items()})
    batch_size = targets[inputs[0].name][0]
    return Calibration(batches, batch_size, available, spec.calibration_batches)


def make_calibrator(trt: Any, calibration: Calibration, memory: Any) -> Any:
    """An IInt8EntropyCalibrator2 feeding the batches in order from device buffers."""

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = calibration.batches
            self.index = 0
            self.cache: bytes | None = None
            self.error: BaseException | None = None
            self.pointers = {name: memory.alloc(a.nbytes) for name, a in self.batches[0].items()}

        def get_batch_size(self) -> int:
            return calibration.batch_size

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            try:
                if self.index >= len(self.batches):
                    return None
                batch = self.batches[self.index]
                missing = [n for n in names if n not in batch]
                if missing:
                    raise InputError(f"calibration_data_uri: TensorRT asked for input(s) {missing} the data does not hold")
                for name in names:
                    memory.copy_to_device(self.pointers[name], batch[name])
                self.index += 1
                return [int(self.pointers[name]) for name in names]
            except BaseException as exc:  # TensorRT swallows exceptions from callbacks: keep it for later
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            return None  # always calibrate on the given data

        def write_calibration_cache(self, cache: Any) -> None:
            self.cache = bytes(memoryview(cache))

        def release(self) -> None:
            for pointer in self.pointers.values():
                memory.free(pointer)
            self.pointers = {}

    return _EntropyCalibrator()


def precision_flags(spec: TensorRTBuildSpec) -> list[str]:
    """BuilderFlag names set for the precision."""
    if spec.precision == "fp16":
        return ["FP16"]
    if spec.precision == "int8":
        return ["INT8", "FP16"] if spec.int8_fp16_fallback else ["INT8"]
    return []


def attach_timing_cache(trt: Any, config: Any, data: bytes | None, out: logging.Logger) -> bool:
    """Start from the given timing cache; a fresh one if none or TensorRT rejects it. True when reused."""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            out.info("Reusing timing cache (%d bytes)", len(data))
            return True
        out.warning("TensorRT rejected the given timing cache (built by another TensorRT version or GPU?); "
                    "starting from an empty one")
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise StepFailed("TensorRT did not accept an empty timing cache")
    return False


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


# -- outputs ----------------------------------------------------------------------------------


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
    uri = ctx.log_artifact(folder, ARTIFACT)

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
    artifacts = {"tensorrt_engine": uri, "timing_cache": ctx.artifact_uri(f"{ARTIFACT}/{TIMING_CACHE_FILE}")}
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


__all__ = ["UnsupportedHere", "build_engine", "check_environment", "gpu_status", "run", "unavailable_reason"]
