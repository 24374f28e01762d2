"""Transformer graph fusions before quantizing: self-attention blocks into ONNX Runtime's fused
``Attention`` op (com.microsoft), then ORT's transformer optimizer (``model_type='bert'``:
BiasGelu/FastGelu, LayerNormalization, EmbedLayerNormalization where they match).

Add + LayerNormalization is *not* fused into SkipLayerNormalization: ORT 1.32's CPU kernel for it
ran slower than the two ops it replaces. On the BERT-tiny shape (d 128, 2 layers, sequence 128,
2 threads) its 4 nodes took 0.225 ms of a 0.71 ms int8 run (ORT's profile), and leaving them out
took the fused dynamic int8 model from 0.65-0.75x fp32's p50 to 0.48-0.52x in the same runs
(``scripts/bench_onnx_quantize.py --models bert --profile``).

Why our own attention fusion: ORT's optimizer matches the attention subgraphs of the TorchScript
exporter and Hugging Face models; the ``torch.onnx`` dynamo export of ``nn.MultiheadAttention``
(packed in-projection, sequence-first transposes, the 1/sqrt(d) scale split over Q and K) matches
none of its patterns, so it fuses LayerNorm and GELU but no Attention. The rewrite here is
structural: a Softmax between two activation-by-activation MatMuls whose Q, K and V all come
(through reshapes, transposes, gathers, slices and scalar scales only) from one packed projection
``MatMul(x, W[H, 3H]) + b``, and whose result reaches one output projection (Gemm or MatMul + Add)
through reshapes and transposes only. The block becomes ``Attention(x, W, b, num_heads)`` and a
``MatMul + Add`` output projection; the glue is removed. The caller checks the fused model's outputs
against the source's before using it (a pattern that matched but computes something else is caught
there, not trusted).

``dynamic`` quantization of the fused graph turns Attention into ``QAttention`` (int8 QKV projection)
and the other MatMuls into ``DynamicQuantizeMatMul``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Ops that only move or slice data between the packed projection and the attention MatMuls.
_GLUE = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Identity"})
#: Ops that compute the shapes the glue uses (they hang off the data path).
_SHAPE_OPS = frozenset({"Shape", "Concat", "Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Constant"})
#: Op types counted as fused transformer nodes in the record.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "FastGelu",
             "BiasGelu", "Gelu", "EmbedLayerNormalization", "SkipSimplifiedLayerNormalization")
MS_DOMAIN = "com.microsoft"


@dataclass
class AttentionBlock:
    scores: str                 # the Softmax's input (attention scores), which names the block
    x: str                      # the (batch, sequence, hidden) input of the packed projection
    weight: np.ndarray          # [hidden, 3 * hidden]
    bias: np.ndarray            # [3 * hidden]
    scale: float                # product of the scalar scales on the Q and K paths
    out_weight: np.ndarray      # [hidden, hidden_out], applied as x @ W
    out_bias: np.ndarray | None
    output: str                 # the tensor the block's result was known by (batch, sequence, hidden_out)
    removed: list[str] = field(default_factory=list)


def has_attention_pattern(model: Any) -> bool:
    """Whether the graph looks like a transformer: a Softmax fed by a MatMul of two activations
    (Q by K) whose output feeds another activation MatMul (by V), or an Attention node already."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    if any(n.op_type in ("Attention", "MultiHeadAttention") for n in graph.node):
        return True
    for n in graph.node:
        if n.op_type != "Softmax":
            continue
        qk = producer.get(n.input[0])
        if qk is None or qk.op_type not in ("MatMul", "FusedMatMul") or any(i in inits for i in qk.input):
            continue
        if any(c.op_type == "MatMul" and c.input[0] == n.output[0] for c in consumers[n.output[0]]):
            return True
    return False


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self._array = numpy_helper.to_array

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self._array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            from onnx import helper

            for a in node.attribute:
                if a.name == "value":
                    return self._array(helper.get_attribute_value(a))
        return None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def perm(self, node: Any) -> list[int] | None:
        from onnx import helper

        for a in node.attribute:
            if a.name == "perm":
                return list(helper.get_attribute_value(a))
        return None

    def attr(self, node: Any, name: str, default: Any) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _trace_to_projection(g: _Graph, tensor: str) -> tuple[Any, float] | None:
    """From a Q, K or V operand back through glue and scalar scales to the packed projection's bias
    Add (or its MatMul); (that node, product of the scales) or None."""
    scale = 1.0
    current = tensor
    for _ in range(64):
        node = g.producer.get(current)
        if node is None:
            return None
        if node.op_type in ("Mul", "Div"):
            a, b = node.input[0], node.input[1]
            sb, sa = g.scalar(b), g.scalar(a)
            if sb is not None:
                scale *= sb if node.op_type == "Mul" else 1.0 / sb
                current = a
            elif sa is not None and node.op_type == "Mul":
                scale *= sa
                current = b
            else:
                return None
            continue
        if node.op_type in _GLUE:
            current = node.input[0]
            continue
        if node.op_type == "Add" or (node.op_type == "MatMul" and node.input[1] in g.inits):
            return node, scale
        return None
    return None


def _projection(g: _Graph, node: Any) -> tuple[str, np.ndarray, np.ndarray, Any] | None:
    """(input, weight [H, 3H], bias [3H], MatMul node) of a packed projection ``MatMul(x, W) + b``."""
    if node.op_type == "Add":
        pair = [(i, g.producer.get(node.input[j])) for i, j in ((0, 1), (1, 0))]
        for bias_at, matmul in pair:
            bias = g.const(node.input[bias_at])
            if bias is not None and matmul is not None and matmul.op_type == "MatMul":
                break
        else:
            return None
    else:
        matmul, bias = node, None
    weight = g.const(matmul.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] % 3:
        return None
    if bias is None:
        bias = np.zeros(weight.shape[1], dtype=weight.dtype)
    if bias.reshape(-1).shape[0] != weight.shape[1]:
        return None
    return matmul.input[0], weight, bias.reshape(-1), matmul


def _forward_to_out_projection(g: _Graph, start: str) -> tuple[np.ndarray, np.ndarray | None, str, list[int]] | None:
    """From the attention result through Transpose/Reshape to the output projection, then through
    Reshape/Transpose to the first tensor with a non-glue consumer: (W as x @ W, bias, that tensor,
    the perms of the transposes passed after the projection)."""
    current = start
    for _ in range(16):
        users = g.consumers.get(current, [])
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type in ("Transpose", "Reshape"):
            current = node.output[0]
            continue
        if node.op_type == "Gemm" and node.input[0] == current and node.input[1] in g.inits:
            if g.attr(node, "transA", 0) or g.attr(node, "alpha", 1.0) != 1.0 or g.attr(node, "beta", 1.0) != 1.0:
                return None
            w = g.const(node.input[1])
            assert w is not None
            w = w.T if g.attr(node, "transB", 0) else w
            b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            current = node.output[0]
        elif node.op_type == "MatMul" and node.input[0] == current and node.input[1] in g.inits:
            w = g.const(node.input[1])
            assert w is not None
            b = None
            current = node.output[0]
            after = g.consumers.get(current, [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = [i for i in after[0].input if i != current]
                bias = g.const(other[0]) if other else None
                if bias is not None and bias.size == w.shape[1]:
                    b, current = bias.reshape(-1), after[0].output[0]
        else:
            return None
        perms: list[int] = []
        for _ in range(8):
            users = g.consumers.get(current, [])
            if len(users) == 1 and users[0].op_type in ("Reshape", "Transpose"):
                if users[0].op_type == "Transpose":
                    perms.append(tuple(g.perm(users[0]) or ()))  # type: ignore[arg-type]
                current = users[0].output[0]
                continue
            break
        return w, (b.reshape(-1) if b is not None else None), current, perms
    return None


def find_attention_blocks(model: Any) -> list[AttentionBlock]:
    g = _Graph(model)
    blocks = []
    for sm in g.graph.node:
        if sm.op_type != "Softmax":
            continue
        qk = g.producer.get(sm.input[0])
        if qk is None or qk.op_type != "MatMul" or any(i in g.inits for i in qk.input):
            continue
        users = g.consumers.get(sm.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != sm.output[0]:
            continue
        av = users[0]
        traced = [_trace_to_projection(g, t) for t in (qk.input[0], qk.input[1], av.input[1])]
        if any(t is None for t in traced):
            continue
        sources = {t[0].name for t in traced if t is not None}
        if len(sources) != 1:
            continue
        proj = _projection(g, traced[0][0])  # type: ignore[index]
        if proj is None:
            continue
        x, weight, bias, matmul = proj
        seq_first = False
        source = g.producer.get(x)
        if source is not None and source.op_type == "Transpose" and g.perm(source) == [1, 0, 2]:
            x, seq_first = source.input[0], True
        out = _forward_to_out_projection(g, av.output[0])
        if out is None:
            continue
        out_w, out_b, output, perms = out
        if seq_first != (perms == [(1, 0, 2)]) or (not seq_first and perms):
            continue
        if weight.shape[1] != 3 * weight.shape[0] or out_w.shape[0] != weight.shape[0]:
            continue
        scale = traced[0][1] * traced[1][1]  # type: ignore[index]
        if traced[2][1] != 1.0:  # type: ignore[index]
            continue
        blocks.append(AttentionBlock(sm.input[0], x, weight, bias, scale, out_w, out_b, output))
    return blocks


def fuse_attention(model: Any, num_heads: dict[str, int] | int) -> int:
    """Rewrite every attention block in place; ``num_heads`` per block (by its scores tensor) or one for all.
    Returns how many blocks were fused."""
    from onnx import helper, numpy_helper

    blocks = find_attention_blocks(model)
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    for k, block in enumerate(blocks):
        heads = num_heads if isinstance(num_heads, int) else num_heads[block.scores]
        prefix = f"modelopt_attention_{k}"
        names = {s: f"{prefix}_{s}" for s in ("w", "b", "out", "ow", "ob", "proj")}
        assert not taken & set(names.values())
        hidden = block.weight.shape[0]
        head_size = hidden // heads
        new_inits = [numpy_helper.from_array(block.weight.astype(np.float32), names["w"]),
                     numpy_helper.from_array(block.bias.astype(np.float32), names["b"]),
                     numpy_helper.from_array(block.out_weight.astype(np.float32), names["ow"])]
        attrs: dict[str, Any] = {"num_heads": heads}
        if abs(block.scale - 1.0 / np.sqrt(head_size)) > 1e-6 * abs(block.scale):
            attrs["scale"] = float(block.scale)
        nodes = [helper.make_node("Attention", [block.x, names["w"], names["b"]], [names["out"]],
                                  name=f"{prefix}", domain=MS_DOMAIN, **attrs)]
        if block.out_bias is not None:
            new_inits.append(numpy_helper.from_array(block.out_bias.astype(np.float32), names["ob"]))
            nodes += [helper.make_node("MatMul", [names["out"], names["ow"]], [names["proj"]], name=f"{prefix}_out"),
                      helper.make_node("Add", [names["proj"], names["ob"]], [block.output], name=f"{prefix}_out_bias")]
        else:
            nodes.append(helper.make_node("MatMul", [names["out"], names["ow"]], [block.output], name=f"{prefix}_out"))
        # the node that produced block.output is replaced: drop it, the rest goes with the dead code
        old = [n for n in graph.node if block.output in n.output]
        for n in old:
            graph.node.remove(n)
        anchor = min((i for i, n in enumerate(graph.node) if block.output in n.input), default=len(graph.node))
        for n in reversed(nodes):
            graph.node.insert(anchor, n)
        graph.initializer.extend(new_inits)
    if blocks:
        _remove_dead(model)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(blocks)


def _remove_dead(model: Any) -> None:
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def heads_of(model: Any, feed: dict[str, np.ndarray], scores: list[str]) -> dict[str, int]:
    """Each attention block's head count, read off the shape of its attention scores on one sample
    (batch 1): scores are (heads, S, S) or (1, heads, S, S) elements S * S * heads."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in scores:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    one = {k: v[:1] for k, v in feed.items()}
    outs = session.run(scores, one)
    heads = {}
    for name, value in zip(scores, outs):
        s = value.shape[-1]
        heads[name] = int(value.size // (s * s))
    return heads


def count_fused(model: Any) -> dict[str, int]:
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return {op: ops[op] for op in FUSED_OPS if ops.get(op)}


def fusion_options() -> Any:
    """ORT's bert fusions, SkipLayerNormalization left out (see the module's docstring)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    return options


def optimize_transformer(src: Path, out_dir: Path, feed: dict[str, np.ndarray] | None, num_heads: int | None,
                         log: Any) -> tuple[Path, dict[str, Any]]:
    """Attention fusion (ours), then ORT's transformer optimizer (model_type bert, python fusions
    only: the saved graph stays portable). Returns the fused model's path and the record of what
    fused (op counts before and after, heads per block)."""
    import onnx
    from onnxruntime.transformers import optimizer as ort_optimizer

    model = onnx.load(str(src))
    before = count_fused(model)
    blocks = find_attention_blocks(model)
    heads: dict[str, int] = {}
    skipped = None
    if blocks and not num_heads and feed is None:
        skipped = f"{len(blocks)} attention block(s) left unfused: no data to read the head count from; set num_heads"
        blocks = []
    if blocks:
        heads = ({b.scores: num_heads for b in blocks} if num_heads else
                 heads_of(model, feed or {}, [b.scores for b in blocks]))
        bad = {s: h for s, h in heads.items() if h < 1 or blocks[0].weight.shape[0] % h}
        if bad:
            raise ValueError(f"head count {sorted(set(bad.values()))} does not divide the hidden size "
                             f"{blocks[0].weight.shape[0]}")
    fused_attention = fuse_attention(model, heads) if blocks else 0
    hidden = int(blocks[0].weight.shape[0]) if blocks else 0
    first_heads = next(iter(heads.values()), 0)
    logging.disable(logging.INFO)  # ORT's fusion modules log every pattern they try at INFO
    try:
        with contextlib.redirect_stdout(None):
            optimized = ort_optimizer.optimize_model(
                model, model_type="bert", num_heads=first_heads, hidden_size=hidden, opt_level=0,
                optimization_options=fusion_options())
    finally:
        logging.disable(logging.NOTSET)
    proto = optimized.model
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():  # ONNX appends external data to an existing file
        stale.unlink()
    out = out_dir / "model.onnx"
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    after = count_fused(proto)
    record: dict[str, Any] = {"applied": True, "attention_blocks": fused_attention, "num_heads": sorted(set(heads.values())),
              "hidden_size": hidden, "fused_nodes": after,
              "new_fused_nodes": {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}}
    if skipped:
        record["attention_skipped"] = skipped
        log.warning("%s", skipped)
    log.info("Transformer fusions: %s", record["new_fused_nodes"] or "nothing fused")
    return out, record
