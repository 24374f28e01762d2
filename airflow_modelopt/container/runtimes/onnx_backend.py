"""ONNX Runtime: CPU execution provider, plus TensorRT and CUDA providers with ``device="auto"``
when the installed onnxruntime has them. External data beside the .onnx file is found by ORT.

Graph optimizations stay at ONNX Runtime's default (all), as a deployment would run them.
"""

from __future__ import annotations

from pathlib import Path

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
        import onnx

        files = {self.path}
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception:  # noqa: BLE001 - ORT loaded it; count the file alone
            return [self.path]
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        files.add(self.path.parent / entry.value)
        return sorted(f for f in files if f.is_file())

    def close(self) -> None:
        self.session = None
