"""Read a .tflite flatbuffer without running it: ops, their precision, Flex/custom ops, signature.

Parsing the flatbuffer (rather than asking an interpreter) works for models an interpreter
cannot load, such as ones with Flex ops when no Flex delegate is linked. The schema module ships
with ai-edge-litert (and with TensorFlow); both venvs that run this step have one of them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Ops that only convert between precisions; they do not count as "left in float".
CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
#: Table lookups and the position of their (index, table) inputs.
LOOKUP_OPS = {"EMBEDDING_LOOKUP": (0, 1), "GATHER": (1, 0)}
_INTEGER_TYPES = {"INT8", "UINT8", "INT16", "INT32", "INT64", "UINT32", "UINT64"}
#: Ops that move or narrow integer ids without computing on them (the ids keep their meaning).
_ID_PASSING_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "CAST"})


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # TensorFlow's copy of the same generated module
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _enum_names(cls: Any) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}
_NUMPY = {
    "FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT8": "int8", "UINT8": "uint8",
    "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "UINT32": "uint32", "INT64": "int64",
    "UINT64": "uint64", "BOOL": "bool", "STRING": "object", "BFLOAT16": "bfloat16",
}


@dataclass
class TensorInfo:
    index: int
    name: str
    dtype: str
    shape: list[int | None]
    scale: float | None = None
    zero_point: int | None = None


@dataclass
class SignatureInfo:
    key: str
    inputs: list[tuple[str, TensorInfo]] = field(default_factory=list)  # (signature name, tensor)
    outputs: list[tuple[str, TensorInfo]] = field(default_factory=list)


@dataclass
class FlatbufferReport:
    op_count: int
    op_histogram: dict[str, int]
    float_ops: dict[str, int]
    flex_ops: dict[str, int]
    custom_ops: dict[str, int]
    conversion_ops: int
    signature: SignatureInfo
    #: Of ``float_ops``: lookups of a constant float table by integer ids that are a graph input (maybe
    #: reshaped or cast), whose output only feeds QUANTIZE ops (the integer-only equivalent of a quantized float input).
    input_lookups: dict[str, int] = field(default_factory=dict)

    def as_info(self) -> dict[str, Any]:
        return {
            "op_count": self.op_count,
            "op_histogram": self.op_histogram,
            "float_ops": self.float_ops,
            "flex_ops": self.flex_ops,
            "custom_ops": self.custom_ops,
            "float_input_lookups": self.input_lookups,
            "signature_key": self.signature.key,
        }


def analyze(content: bytes) -> FlatbufferReport:
    """Op histogram, ops computing in float, Flex and custom ops, and the main signature."""
    schema = _schema()
    model = schema.Model.GetRootAs(content, 0)
    builtin = _enum_names(schema.BuiltinOperator)
    types = _enum_names(schema.TensorType)

    codes: list[tuple[str, str]] = []  # (kind, name): kind in builtin / flex / custom
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = builtin.get(number, f"BUILTIN_{number}")
        if name == "CUSTOM":
            custom = (code.CustomCode() or b"").decode("utf-8", "replace")
            codes.append(("flex" if custom.startswith("Flex") else "custom", custom))
        else:
            codes.append(("builtin", name))

    histogram: collections.Counter[str] = collections.Counter()
    float_ops: collections.Counter[str] = collections.Counter()
    flex: collections.Counter[str] = collections.Counter()
    custom: collections.Counter[str] = collections.Counter()
    lookups: collections.Counter[str] = collections.Counter()
    conversions = 0
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        tensor_types = [types.get(graph.Tensors(t).Type(), "?") for t in range(graph.TensorsLength())]
        constant = [_is_constant(model, graph.Tensors(t)) for t in range(graph.TensorsLength())]
        # integer graph inputs, and what only reshapes or casts them to integers (ops are in execution order)
        ids = {int(t) for t in _as_list(graph.InputsAsNumpy()) if tensor_types[int(t)] in _INTEGER_TYPES}
        consumers: dict[int, list[str]] = collections.defaultdict(list)  # tensor -> names of the ops reading it
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            ins, outs = _as_list(op.InputsAsNumpy()), _as_list(op.OutputsAsNumpy())
            for t in ins:
                consumers[int(t)].append(codes[op.OpcodeIndex()][1])
            if codes[op.OpcodeIndex()][1] in _ID_PASSING_OPS and ins and int(ins[0]) in ids and len(outs) == 1 \
                    and tensor_types[int(outs[0])] in _INTEGER_TYPES:
                ids.add(int(outs[0]))
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            kind, name = codes[op.OpcodeIndex()]
            histogram[name] += 1
            if kind == "flex":
                flex[name] += 1
            elif kind == "custom":
                custom[name] += 1
            if name in CONVERSION_OPS:
                conversions += 1
                continue
            tensors = [int(t) for t in (*_as_list(op.InputsAsNumpy()), *_as_list(op.OutputsAsNumpy())) if t >= 0]
            if any(tensor_types[t] in _FLOAT_TYPES and not constant[t] for t in tensors):
                float_ops[name] += 1
                if kind == "builtin" and _is_input_lookup(name, op, tensor_types, constant, ids, consumers):
                    lookups[name] += 1
    return FlatbufferReport(
        op_count=sum(histogram.values()),
        op_histogram=dict(sorted(histogram.items())),
        float_ops=dict(sorted(float_ops.items())),
        flex_ops=dict(sorted(flex.items())),
        custom_ops=dict(sorted(custom.items())),
        conversion_ops=conversions,
        signature=_main_signature(model, types),
        input_lookups=dict(sorted(lookups.items())),
    )


def _is_input_lookup(name: str, op: Any, tensor_types: list[str], constant: list[bool], ids: set[int],
                     consumers: dict[int, list[str]]) -> bool:
    """EMBEDDING_LOOKUP or GATHER of a constant float table by integer ids that are a graph input
    (maybe reshaped or cast, ``ids``), its output read by QUANTIZE ops only: the float part of it is
    the model's edge, as a float input quantized by a QUANTIZE is."""
    if name not in LOOKUP_OPS:
        return False
    ins, outs = _as_list(op.InputsAsNumpy()), _as_list(op.OutputsAsNumpy())
    index_at, table_at = LOOKUP_OPS[name]
    if len(ins) < 2 or len(outs) != 1:
        return False
    index, table, out = int(ins[index_at]), int(ins[table_at]), int(outs[0])
    return (index in ids
            and constant[table] and tensor_types[table] in _FLOAT_TYPES
            and bool(consumers.get(out)) and all(c == "QUANTIZE" for c in consumers[out]))


def _as_list(values: Any) -> list[int]:
    if isinstance(values, np.ndarray):
        return values.tolist()
    return []


def _is_constant(model: Any, tensor: Any) -> bool:
    index = tensor.Buffer()
    if index <= 0 or index >= model.BuffersLength():
        return False
    buffer = model.Buffers(index)
    return buffer.DataLength() > 0 or buffer.Offset() > 1


def _tensor(graph: Any, index: int, types: dict[int, str]) -> TensorInfo:
    t = graph.Tensors(index)
    sig = t.ShapeSignatureAsNumpy()
    shape = sig if isinstance(sig, np.ndarray) and sig.size else t.ShapeAsNumpy()
    dims = [None if int(d) < 0 else int(d) for d in (shape.tolist() if isinstance(shape, np.ndarray) else [])]
    info = TensorInfo(index=index, name=(t.Name() or b"").decode("utf-8", "replace"),
                      dtype=_NUMPY.get(types.get(t.Type(), ""), types.get(t.Type(), "?").lower()), shape=dims)
    q = t.Quantization()
    if q is not None:
        scales = q.ScaleAsNumpy()
        zeros = q.ZeroPointAsNumpy()
        if isinstance(scales, np.ndarray) and scales.size == 1:
            info.scale = float(scales[0])
            info.zero_point = int(zeros[0]) if isinstance(zeros, np.ndarray) and zeros.size else 0
    return info


def _main_signature(model: Any, types: dict[int, str]) -> SignatureInfo:
    """The serving_default signature (else the first); without signatures, subgraph 0's I/O."""
    if model.SignatureDefsLength():
        defs = [model.SignatureDefs(i) for i in range(model.SignatureDefsLength())]
        keys = [(d.SignatureKey() or b"").decode() for d in defs]
        chosen = defs[keys.index("serving_default")] if "serving_default" in keys else defs[0]
        graph = model.Subgraphs(chosen.SubgraphIndex())
        info = SignatureInfo(key=(chosen.SignatureKey() or b"").decode())
        for j in range(chosen.InputsLength()):
            m = chosen.Inputs(j)
            info.inputs.append(((m.Name() or b"").decode(), _tensor(graph, m.TensorIndex(), types)))
        for j in range(chosen.OutputsLength()):
            m = chosen.Outputs(j)
            info.outputs.append(((m.Name() or b"").decode(), _tensor(graph, m.TensorIndex(), types)))
        # Signature maps are sorted by name; the subgraph's own order is the model's I/O order.
        order_in = {int(t): k for k, t in enumerate(_as_list(graph.InputsAsNumpy()))}
        order_out = {int(t): k for k, t in enumerate(_as_list(graph.OutputsAsNumpy()))}
        info.inputs.sort(key=lambda p: order_in.get(p[1].index, 1 << 30))
        info.outputs.sort(key=lambda p: order_out.get(p[1].index, 1 << 30))
        return info
    graph = model.Subgraphs(0)
    info = SignatureInfo(key="")
    for t in _as_list(graph.InputsAsNumpy()):
        tensor = _tensor(graph, int(t), types)
        info.inputs.append((tensor.name, tensor))
    for t in _as_list(graph.OutputsAsNumpy()):
        tensor = _tensor(graph, int(t), types)
        info.outputs.append((tensor.name, tensor))
    return info
