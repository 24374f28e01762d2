"""CUDA device memory and streams for TensorRT: the one wrapper the TensorRT runtime (engine I/O)
and the tensorrt_build step (device selection, int8 calibration buffers) share.

``cuda-python``'s runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) first;
the runtime falls back to torch's CUDA allocator in images that ship torch but not cuda-python.
A failing CUDA call raises :class:`StepFailed` (retried: another node or a retry may have the
memory) naming the call and CUDA's own error text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from airflow_modelopt.exceptions import StepFailed


def cudart() -> Any | None:
    """cuda-python's CUDA runtime module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            return None
    return runtime


def cuda_error_text(rt: Any, err: Any) -> str:
    """``cudaErrorX: text`` for a CUDA runtime error code."""
    name = getattr(err, "name", None) or f"CUDA error {int(err)}"
    try:
        _, text = rt.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - the name alone is enough
        text = ""
    return f"{name}: {text}" if text else name


class CudaMemory:
    """Device selection, device buffers and streams through cuda-python's runtime API."""

    def __init__(self, rt: Any | None = None) -> None:
        rt = rt if rt is not None else cudart()
        if rt is None:
            raise ImportError("cuda-python is not installed (no cuda.bindings.runtime or cuda.cudart)")
        self.rt = rt

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise StepFailed(f"CUDA {what} failed: {cuda_error_text(self.rt, err)}")
        return rest[0] if len(rest) == 1 else rest

    def set_device(self, index: int) -> None:
        self._check(self.rt.cudaSetDevice(index), f"cudaSetDevice({index})")

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, pointer: int) -> None:
        self.rt.cudaFree(pointer)

    def copy_to_device(self, pointer: int, array: np.ndarray) -> None:
        """Synchronous host -> device copy (the int8 calibrator's batches)."""
        host = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpy(pointer, host.ctypes.data, host.nbytes, kind), "cudaMemcpy host->device")

    # -- streams (the runtime's engine I/O) -----------------------------------------------------

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def to_device(self, pointer: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind, stream),
                    "cudaMemcpyAsync host->device")

    def to_host(self, host: np.ndarray, pointer: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, kind, stream),
                    "cudaMemcpyAsync device->host")

    def sync(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def handle(self, stream: Any) -> int:
        return int(stream)


class TorchCudaMemory:
    """The same through torch's CUDA allocator, for images that ship torch but not cuda-python."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA device")
        self.torch = torch
        self._buffers: dict[int, Any] = {}

    def set_device(self, index: int) -> None:
        self.torch.cuda.set_device(index)

    def alloc(self, nbytes: int) -> int:
        buf = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[buf.data_ptr()] = buf
        return buf.data_ptr()

    def free(self, pointer: int) -> None:
        self._buffers.pop(pointer, None)

    def copy_to_device(self, pointer: int, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array)
        self._buffers[pointer][: host.nbytes].copy_(self.torch.from_numpy(host.reshape(-1).view(np.uint8)))

    def stream(self) -> Any:
        return self.torch.cuda.Stream()

    def to_device(self, pointer: int, host: np.ndarray, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            self.copy_to_device(pointer, host)

    def to_host(self, host: np.ndarray, pointer: int, stream: Any) -> None:
        stream.synchronize()
        host.reshape(-1).view(np.uint8)[:] = self._buffers[pointer][: host.nbytes].cpu().numpy()

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)


def device_memory() -> CudaMemory | TorchCudaMemory:
    """Device memory for TensorRT: cuda-python, else torch's CUDA allocator."""
    errors = []
    for cls in (CudaMemory, TorchCudaMemory):
        try:
            return cls()
        except ImportError as exc:
            errors.append(f"{cls.__name__}: {exc}")
    raise ImportError("no CUDA memory API: install cuda-python (or torch with CUDA); " + "; ".join(errors))


__all__ = ["CudaMemory", "TorchCudaMemory", "cuda_error_text", "cudart", "device_memory"]
