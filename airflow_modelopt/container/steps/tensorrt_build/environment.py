"""Can this worker build TensorRT engines? ``tensorrt``, cuda-python and a GPU at ``device``, or
:class:`UnsupportedHere` (exit code 6, not retried) saying what is missing and where the step can
run. The GPU probe itself is ``runtimes/probe.py``'s ``gpu_status``; device memory is
``runtimes/cuda.py``'s, the same the TensorRT runtime uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_modelopt.container.runtimes.cuda import CudaMemory, cudart
from airflow_modelopt.container.runtimes.probe import GpuInfo, gpu_status
from airflow_modelopt.exceptions import InputError, UnsupportedHere
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec


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
    memory: Any  # runtimes.cuda.CudaMemory (a fake in tests)


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
    rt = cudart()
    if rt is None:
        raise UnsupportedHere(
            f"TensorRT target needs cuda-python (device selection and int8 calibration memory); this worker has "
            f"tensorrt {trt_text} and {gpu.count} GPU(s) but cuda-python does not import: install the "
            f"airflow-modelopt[tensorrt] extra. {where}."
        )
    if spec.device >= gpu.count:
        listed = ", ".join(f"{i}: {n}" for i, n in enumerate(gpu.names)) or str(gpu.count)
        raise InputError(f"device: CUDA device {spec.device} does not exist; this worker sees {gpu.count} ({listed})")
    return Environment(trt, trt_text, gpu, CudaMemory(rt))


__all__ = ["Environment", "GpuInfo", "UnsupportedHere", "check_environment", "gpu_status", "tensorrt_status",
           "unavailable_reason"]
