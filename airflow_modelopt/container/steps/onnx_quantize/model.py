"""The source ONNX model as the step sees it: inputs and outputs (name, shape, dtype), op
histogram, node names, and its files on disk (the .onnx plus its external data, found by the
runtimes layer's ``onnx_files``)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_modelopt.container.runtimes.onnx_backend import external_data_paths, onnx_files
from airflow_modelopt.exceptions import InputError

#: Op types that are themselves quantized kernels or quantization plumbing.
QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QAttention", "ConvInteger",
    "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QGather",
    "QEmbedLayerNormalization", "QOrderedMatMul", "MatMulNBits",
})
#: Float ops that carry the model's weights and most of its time; reported when left in fp32.
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU", "RNN",
                       "EmbedLayerNormalization"})


def is_quant_op(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in QUANT_OPS


def first_line(exc: BaseException) -> str:
    """An exception as one short line for an error message: its type and first line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:1500] if text else ''}"


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str | None]
    dtype: str

    def shape_text(self) -> str:
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                dims.append(str(d))
            else:
                dims.append("N" if i == 0 else (d or "?"))
        return f"[{', '.join(dims)}]"

    def expectation(self) -> str:
        return f"input {self.name!r} with shape {self.shape_text()} ({self.dtype})"


@dataclass
class OnnxModel:
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: dict[str, int]
    op_histogram: dict[str, int]
    node_names: list[str]
    unnamed_nodes: int

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def _describe(values: Any, initializers: set[str]) -> list[TensorInfo]:
    import onnx

    out = []
    for v in values:
        if v.name in initializers:  # old exporters list initializers as graph inputs
            continue
        t = v.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, TypeError, ValueError):
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        out.append(TensorInfo(v.name, dims, dtype))
    return out


def inspect_model(path: Path, field_name: str, uri: str) -> OnnxModel:
    """Read the graph (not its weights); an unreadable model or missing external data is an input error."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a protobuf parse error names no field
        raise InputError(f"{field_name}: {uri} is not a readable ONNX model: {exc}") from None
    missing = [p.name for p in external_data_paths(model, path.parent) if not p.is_file()]
    if missing:
        raise InputError(
            f"{field_name}: {path.name} keeps its weights in external data {missing}, which is not next to it; "
            "point model_uri at the folder holding both (or at the MLflow model)"
        )
    files = {p.name: p.stat().st_size for p in onnx_files(path, model)}
    initializers = {i.name for i in model.graph.initializer}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return OnnxModel(
        path=path, inputs=_describe(model.graph.input, initializers), outputs=_describe(model.graph.output, set()),
        files=files, op_histogram=dict(sorted(ops.items())), node_names=[n.name for n in model.graph.node],
        unnamed_nodes=sum(1 for n in model.graph.node if not n.name),
    )
