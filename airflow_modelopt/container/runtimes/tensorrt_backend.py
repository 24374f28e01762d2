"""TensorRT runtime: a serialized engine (.engine / .plan / .trt), run with TensorRT 10's
name-based I/O API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``).

Needs the ``tensorrt`` Python package, an NVIDIA GPU, and device memory through
``cuda-python`` (``cuda.bindings.runtime`` / ``cuda.cudart``) or, failing that, torch's CUDA
allocator. Engines are specific to the TensorRT version and GPU that built them. Dynamic inputs
follow optimization profile 0: batches above its maximum are fed in chunks. int8 I/O scales are
not stored in an engine in a form the API returns, so they come from ``modelopt_signature.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

NEEDS = ("a TensorRT engine needs the tensorrt Python package and an NVIDIA GPU: run this step in the "
         "'tensorrt' image on a GPU node")


class _CudaPython:
    """Device memory and streams through cuda-python's runtime API."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart

    def _check(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def stream(self) -> int:
        return self._check(self.rt.cudaStreamCreate())

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))

    def sync(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def handle(self, stream: Any) -> int:
        return int(stream)


class _TorchCuda:
    """The same through torch's CUDA allocator, for images that ship torch but not cuda-python."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA device")
        self.torch = torch
        self._buffers: dict[int, Any] = {}

    def stream(self) -> Any:
        return self.torch.cuda.Stream()

    def alloc(self, nbytes: int) -> int:
        buf = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[buf.data_ptr()] = buf
        return buf.data_ptr()

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            src = self.torch.from_numpy(host.reshape(-1).view(np.uint8))
            self._buffers[ptr][: host.nbytes].copy_(src, non_blocking=False)

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        stream.synchronize()
        host.reshape(-1).view(np.uint8)[:] = self._buffers[ptr][: host.nbytes].cpu().numpy()

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)


def _device_api() -> Any:
    """Device memory for the engine's I/O: cuda-python, else torch."""
    errors = []
    for cls in (_CudaPython, _TorchCuda):
        try:
            return cls()
        except ImportError as exc:
            errors.append(f"{cls.__name__.strip('_')}: {exc}")
    raise ImportError("no CUDA memory API: install cuda-python (or torch with CUDA); " + "; ".join(errors))


class TensorRTRuntime(Runtime):
    format = "tensorrt"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ImportError(f"{NEEDS} (import tensorrt failed: {exc})") from None
        super().__init__(path, threads=threads, signature=signature, origin=origin)
        self.trt = trt
        self.cuda = _device_api()
        self.runtime_name = f"tensorrt {getattr(trt, '__version__', '?')} (GPU)"
        self.providers = ["TensorRT"]
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ValueError(
                "TensorRT could not deserialize the engine (built by another TensorRT version or for another GPU?)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        native_in: list[TensorSpec] = []
        native_out: list[TensorSpec] = []
        self._max_batch: int | None = None
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = [int(d) for d in self.engine.get_tensor_shape(name)]
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            spec = TensorSpec(name=name, shape=[None if d < 0 else d for d in shape], dtype=dtype)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                native_in.append(spec)
                if shape and shape[0] < 0:
                    _, _, most = self.engine.get_tensor_profile_shape(name, 0)
                    top = int(list(most)[0])
                    self._max_batch = top if self._max_batch is None else min(self._max_batch, top)
            else:
                native_out.append(spec)
        self.max_batch = self._max_batch
        self.apply_signature(native_in, native_out)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.alloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for spec in self.inputs:
            arr = np.ascontiguousarray(feeds[spec.name])
            if not self.context.set_input_shape(spec.name, arr.shape):
                raise ValueError(f"TensorRT refused shape {list(arr.shape)} for input {spec.name!r} "
                                 "(outside the engine's optimization profile)")
            ptr = self._buffer(spec.name, arr.nbytes)
            self.cuda.to_device(ptr, arr, self.stream)
            self.context.set_tensor_address(spec.name, ptr)
        hosts = []
        for spec in self.outputs:
            shape = [int(d) for d in self.context.get_tensor_shape(spec.name)]
            host = np.empty(shape, dtype=np.dtype(spec.dtype))
            ptr = self._buffer(spec.name, host.nbytes)
            self.context.set_tensor_address(spec.name, ptr)
            hosts.append((host, ptr))
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for host, ptr in hosts:
            self.cuda.to_host(host, ptr, self.stream)
        self.cuda.sync(self.stream)
        return [h for h, _ in hosts]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        self.context = self.engine = None
