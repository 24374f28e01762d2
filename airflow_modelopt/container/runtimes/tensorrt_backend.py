"""TensorRT runtime: a serialized engine (.engine / .plan / .trt), run with TensorRT 10's
name-based I/O API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``).

Needs the ``tensorrt`` Python package, an NVIDIA GPU, and device memory through
``runtimes/cuda.py`` (cuda-python or, failing that, torch's CUDA allocator). Engines are specific
to the TensorRT version and GPU that built them. Dynamic inputs follow optimization profile 0:
batches above its maximum are fed in chunks. int8 I/O scales are
not stored in an engine in a form the API returns, so they come from ``modelopt_signature.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.runtimes.cuda import device_memory
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

NEEDS = ("a TensorRT engine needs the tensorrt Python package and an NVIDIA GPU: run this step in the "
         "'tensorrt' image on a GPU node")


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
        self.cuda = device_memory()
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
