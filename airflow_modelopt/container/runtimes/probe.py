"""Probes of the machine and of a model's cost: the hardware a measurement ran on (CPU, cores,
memory, GPUs: ``hardware_fingerprint``), and the peak memory of a fresh process that loads a model
and runs it (what serving it costs):

    python -m airflow_modelopt.container.runtimes.probe '{"path": ..., "format": ..., "threads": 1,
        "batch_sizes": [1, 8], "runs": 3, "feeds": "inputs.npz"}'

prints one JSON line: the RSS high-water mark (``VmHWM`` from /proc/self/status, else
``ru_maxrss``) after loading and running every batch size, the RSS before the model's framework
was imported (the interpreter's own share), and the load time. The benchmark step starts it with
the same interpreter, so imports, allocator and runtime are what a serving process would have.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from airflow_modelopt import caching

# -- what the numbers were measured on ---------------------------------------------------------


# One definition for both sides: the Airflow side computes cache keys of measuring steps with it.
hardware_fingerprint = caching.hardware_fingerprint
_gpu_names = caching.gpu_names


@dataclass
class GpuInfo:
    """What this machine can tell about its NVIDIA GPUs."""

    count: int = 0
    names: list[str] = field(default_factory=list)
    compute_capabilities: list[str] = field(default_factory=list)
    memory_mb: list[int] = field(default_factory=list)
    reason: str | None = None  # why none is usable, when count == 0
    cuda_python: bool = False


def gpu_status() -> GpuInfo:
    """The CUDA devices visible here, asked through cuda-python (else device files / nvidia-smi)."""
    import glob

    from airflow_modelopt.container.runtimes.cuda import cuda_error_text, cudart

    rt = cudart()
    if rt is not None:
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            reason = f"the CUDA runtime reports {cuda_error_text(rt, err)}"
            if not glob.glob("/dev/nvidia[0-9]*"):
                reason += "; no /dev/nvidia* device: no NVIDIA GPU or driver is visible to this process"
            return GpuInfo(reason=reason, cuda_python=True)
        if not count:
            return GpuInfo(reason="the CUDA runtime sees no CUDA device", cuda_python=True)
        info = GpuInfo(count=int(count), cuda_python=True)
        for i in range(int(count)):
            err, props = rt.cudaGetDeviceProperties(i)
            if int(err) != 0:
                info.names.append(f"device {i} ({cuda_error_text(rt, err)})")
                info.compute_capabilities.append("?")
                info.memory_mb.append(0)
                continue
            name = props.name
            info.names.append((name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip())
            info.compute_capabilities.append(f"{props.major}.{props.minor}")
            info.memory_mb.append(int(props.totalGlobalMem) >> 20)
        return info
    # Without cuda-python: enough to say what is there, not enough to use it.
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    names = [n for n in _gpu_names().split(", ") if n]
    if names or devices:
        return GpuInfo(count=len(names) or len(devices), names=names,
                       reason="cuda-python is not installed, so the GPU cannot be used from Python")
    smi = shutil.which("nvidia-smi")
    parts = ["cuda-python is not installed", "no /dev/nvidia* device",
             "nvidia-smi not found" if not smi else "nvidia-smi lists no GPU"]
    return GpuInfo(reason="; ".join(parts))


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set, in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int | None:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else None


def probe(request: dict) -> dict:
    baseline = current_rss_bytes()
    import numpy as np

    from airflow_modelopt.container.runtimes import load

    started = time.perf_counter()
    runtime = load(request["path"], request.get("format"), threads=int(request.get("threads", 1)),
                   device=request.get("device", "cpu"), field=request.get("field", "model_uri"))
    load_s = time.perf_counter() - started
    with np.load(request["feeds"], allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    for batch in request["batch_sizes"]:
        part = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in feeds.items()}
        native = runtime.prepare(part)
        for _ in range(max(1, int(request.get("runs", 3)))):
            runtime.run_native(native)
    result = {
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "after_run_rss_bytes": current_rss_bytes(),
        "load_time_s": load_s,
        "runtime": runtime.runtime_name,
        "frameworks": [m for m in ("torch", "tensorflow", "onnxruntime", "ai_edge_litert", "tensorrt") if m in sys.modules],
    }
    runtime.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m airflow_modelopt.container.runtimes.probe '<request JSON>'", file=sys.stderr)
        return 2
    result = probe(json.loads(args[0]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
