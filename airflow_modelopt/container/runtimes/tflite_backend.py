"""TFLite runtime: the LiteRT interpreter (``ai-edge-litert``), else ``tf.lite.Interpreter``.

Input/output quantization (scale, zero point) is read from the flatbuffer itself; layout and
source names come from ``modelopt_signature.json``. A dynamic batch (-1 in the shape signature)
is resized to the batch fed; a fixed one is fed in chunks by the base class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.runtimes.base import Runtime
from airflow_modelopt.container.signature import ModelSignature, Quantization, TensorSpec


def interpreter_class() -> tuple[Any, str]:
    """(Interpreter class, runtime name): LiteRT when installed, else TensorFlow's."""
    try:
        from ai_edge_litert import interpreter as litert

        try:
            from importlib.metadata import version

            v = version("ai-edge-litert")
        except Exception:  # noqa: BLE001
            v = "?"
        return litert.Interpreter, f"ai-edge-litert {v}"
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter, f"tf.lite {tf.__version__}"


def _spec(d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    shape = [int(x) for x in (sig if sig is not None and len(sig) else d["shape"])]
    scale, zero = d.get("quantization") or (0.0, 0)
    quant = Quantization(scale=float(scale), zero_point=int(zero)) if scale else None
    return TensorSpec(
        name=d["name"], shape=[None if x < 0 else x for x in shape], dtype=np.dtype(d["dtype"]).name, quantization=quant
    )


class TFLiteRuntime(Runtime):
    format = "tflite"

    def __init__(self, path: Path, *, fmt: str, threads: int, signature: ModelSignature | None, device: str = "cpu",
                 origin: str | None = None) -> None:
        super().__init__(path, threads=threads, signature=signature, origin=origin)
        cls, self.runtime_name = interpreter_class()
        self.interpreter = cls(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._in = {d["name"]: d for d in self.interpreter.get_input_details()}
        self._out = {d["name"]: d for d in self.interpreter.get_output_details()}
        self.apply_signature([_spec(d) for d in self._in.values()], [_spec(d) for d in self._out.values()])

    def run_native(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        it = self.interpreter
        resized = False
        for name, arr in feeds.items():
            detail = self._in[name]
            if tuple(detail["shape"]) != arr.shape:
                it.resize_tensor_input(detail["index"], list(arr.shape), strict=False)
                resized = True
        if resized:
            it.allocate_tensors()
            self._in = {d["name"]: d for d in it.get_input_details()}
        for name, arr in feeds.items():
            it.set_tensor(self._in[name]["index"], arr)
        it.invoke()
        return [it.get_tensor(self._out[s.name]["index"]) for s in self.outputs]

    def close(self) -> None:
        self.interpreter = None
