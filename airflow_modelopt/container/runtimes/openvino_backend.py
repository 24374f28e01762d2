"""OpenVINO: an IR model (``model.xml`` with its weights in ``model.bin`` beside it) on the CPU plugin.

Compiled with the LATENCY performance hint, ``threads`` inference threads, f32 inference precision
and no CPU pinning. f32: on CPUs with bf16 support (AMX, AVX-512 BF16) the plugin would otherwise run
fp32 models in bf16, so the same IR would compute differently from one worker to the next. No
pinning: OpenVINO pins its threads to cores by default, and on a worker whose cores other jobs share
a pinned thread waits for its own core (measured on a loaded 2-core machine: p50 20-50 ms instead
of 0.09 ms for the digits CNN). Weights saved as fp16
(``compress_to_fp16``) are decompressed to f32; int8 models (NNCF's FakeQuantize) run int8 kernels.

``throughput_mode`` measures what a serving deployment gets from the THROUGHPUT hint instead:
several streams, each with its own infer request, kept busy by an ``AsyncInferQueue``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

#: Settings every compile uses (see the module docstring).
INFERENCE_PRECISION = "f32"
COMMON_CONFIG = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION, "ENABLE_CPU_PINNING": False}


def ir_files(xml: Path) -> list[Path]:
    """The IR's files: the .xml topology and its .bin weights (when present)."""
    xml = Path(xml)
    return [p for p in (xml, xml.with_suffix(".bin")) if p.is_file()]


def _port_name(port: Any, index: int, kind: str) -> str:
    try:
        return str(port.get_any_name())
    except RuntimeError:  # a tensor without a name
        return f"{kind}_{index}"


def _spec(port: Any, index: int, kind: str) -> TensorSpec:
    shape = [int(d.get_length()) if d.is_static else None for d in port.get_partial_shape()]
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(name=_port_name(port, index, kind), shape=shape, dtype=dtype)


class OpenVINORuntime(Runtime):
    format = "openvino"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        import openvino as ov

        super().__init__(path, threads=threads, signature=signature, origin=origin)
        self.core = ov.Core()
        self.model = self.core.read_model(str(path))  # the .bin beside the .xml
        self.compiled = self.core.compile_model(self.model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, **COMMON_CONFIG,
        })
        self.request = self.compiled.create_infer_request()
        self.version = ov.get_version()
        self.providers = ["CPU"]
        self.runtime_name = f"openvino {self.version} (CPU, {INFERENCE_PRECISION}, latency hint, unpinned)"
        native_in = [_spec(p, i, "input") for i, p in enumerate(self.compiled.inputs)]
        native_out = [_spec(p, i, "output") for i, p in enumerate(self.compiled.outputs)]
        self._ports = {s.name: p for s, p in zip(native_out, self.compiled.outputs)}
        self._in_ports = {s.name: p for s, p in zip(native_in, self.compiled.inputs)}
        self.apply_signature(native_in, native_out)

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer({self._in_ports[k]: v for k, v in feeds.items()})
        return [np.asarray(result[self._ports[s.name]]) for s in self.outputs]

    def throughput_mode(self, feeds: dict[str, np.ndarray], *, seconds: float = 2.0) -> dict[str, float]:
        """Items/s with OpenVINO's THROUGHPUT hint on ``self.threads`` threads: the model compiled
        again, its optimal number of infer requests kept busy for ``seconds`` with ``feeds`` (native,
        one batch). Also the streams and requests the plugin chose."""
        import openvino as ov

        compiled = self.core.compile_model(self.model, "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": self.threads, **COMMON_CONFIG,
        })
        requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        streams = int(compiled.get_property("NUM_STREAMS"))
        queue = ov.AsyncInferQueue(compiled, requests)
        inputs = {self._in_ports[k].get_any_name(): v for k, v in feeds.items()}
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        for _ in range(requests):  # warm every request once
            queue.start_async(inputs)
        queue.wait_all()
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            queue.start_async(inputs)  # blocks until one of the requests is idle
            done += 1
        queue.wait_all()
        elapsed = time.perf_counter() - start
        del queue, compiled
        return {"throughput_mode_items_per_s": done * batch / elapsed, "throughput_mode_streams": float(streams),
                "throughput_mode_requests": float(requests)}

    def model_files(self) -> list[Path]:
        """The .xml and its .bin."""
        return ir_files(self.path)

    def close(self) -> None:
        self.request = None
        self.compiled = None
        self.model = None
