"""ONNX Runtime: CPU execution provider, plus TensorRT and CUDA providers with ``device="auto"``
when the installed onnxruntime has them. External data beside the .onnx file is found by ORT.

Graph optimizations stay at ONNX Runtime's default (all), as a deployment would run them. Thread
counts are explicit: ``threads`` intra-op threads, one inter-op thread, sequential execution. The
intra-op pool's threads spin after each run (ORT's default, as deployed); measurements therefore
keep one session alive at a time (``airflow_modelopt.container.measure.time_models``): a session
that ran recently keeps a core busy spinning, which puts the timed session's threads on one core.

``onnx_files(path)`` lists a model's files (the .onnx and the external data it references) without a
session; ``OnnxRuntime.model_files`` uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

#: Providers tried in this order with device="auto"; CPU is always last.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def external_data_paths(model: Any, folder: Path) -> list[Path]:
    """The files a loaded ``ModelProto``'s tensors keep their data in (initializers, subgraphs and
    attribute tensors), relative to the model file's ``folder``; whether they exist or not."""
    import onnx

    found: dict[str, Path] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 - includes subgraphs
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                found.setdefault(location, folder / location)
    return list(found.values())


def onnx_files(path: Path, model: Any = None) -> list[Path]:
    """The .onnx file and the external data files it references that exist, without a session
    (bytes on disk). ``model``: the graph already loaded (``load_external_data=False``), if at hand."""
    import onnx

    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - not readable as ONNX: count the file alone
            return [path]
    files = {path, *external_data_paths(model, path.parent)}
    return sorted(f for f in files if f.is_file())


def _spec(arg: object) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)  # type: ignore[attr-defined]
    if dtype is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which this runtime does not feed")  # type: ignore[attr-defined]
    shape = [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in arg.shape]  # type: ignore[attr-defined]
    return TensorSpec(name=arg.name, shape=shape, dtype=dtype)  # type: ignore[attr-defined]


class OnnxRuntime(Runtime):
    format = "onnx"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        import onnxruntime as ort

        super().__init__(path, threads=threads, signature=signature, origin=origin)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device == "auto":
            providers = [p for p in GPU_PROVIDERS if p in available] + providers
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = list(self.session.get_providers())
        self.runtime_name = f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"
        self.apply_signature([_spec(a) for a in self.session.get_inputs()], [_spec(a) for a in self.session.get_outputs()])
        self._output_order = [s.name for s in self.outputs]

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self._output_order, feeds)

    def model_files(self) -> list[Path]:
        """The .onnx file and the external data files it references."""
        return onnx_files(self.path)

    def close(self) -> None:
        self.session = None
