"""ONNX graph rewrites before onnx2tf, so that TFLite gets builtin ops instead of Flex ones.

GELU: PyTorch exports exact GELU (``nn.GELU()``, approximate='none') below opset 20 as
``x / sqrt(2) -> Erf -> + 1 -> * 0.5 -> * x`` (or with the two products in another order). onnx2tf
recognises one order only; any other leaves a ``tf.Erf``, which TFLite has no builtin for (Flex
only). ``fuse_gelu`` replaces each such subgraph by one ONNX ``Gelu`` node (opset 20; the model's
default-domain opset is raised to 20 when it is lower, which changes no op the graph holds below
that: the ops changed in opsets 19 and 20 keep their older meaning), which onnx2tf turns into
``tf.nn.gelu`` and TFLiteConverter into its GELU builtin (with an int8 kernel).

An Erf that is no GELU stays; ``remaining_erf`` counts them, and the ONNX path then asks onnx2tf
for its builtin-only Erf (``replace_to_pseudo_operators``: a polynomial approximation from ABS,
MUL, ADD, EXP, error below 1.5e-7) unless Flex ops are allowed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

GELU_OPSET = 20
_SQRT2 = math.sqrt(2.0)


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _scalar(constants: dict[str, np.ndarray], name: str, value: float, rtol: float = 1e-5) -> bool:
    a = constants.get(name)
    return (
        a is not None
        and a.size == 1
        and np.issubdtype(a.dtype, np.floating)
        and math.isclose(float(a.reshape(())), value, rel_tol=rtol)
    )


def _other(node: Any, name: str) -> str | None:
    """The other input of a two-input node, given one of them."""
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def fuse_gelu(model: Any) -> int:
    """Replace exact-GELU subgraphs by ``Gelu`` nodes in place; the number replaced."""
    import onnx

    graph = model.graph
    constants = _constants(model)
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_use(name: str) -> Any | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    removed: set[int] = set()
    replacements: list[tuple[Any, Any]] = []  # (last node of the pattern, Gelu node)
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        scale = producer.get(erf.input[0])
        if scale is None or len(scale.input) != 2 or only_use(scale.output[0]) is not erf:
            continue
        if scale.op_type == "Div" and _scalar(constants, scale.input[1], _SQRT2):
            x = scale.input[0]
        elif scale.op_type == "Mul" and (
            _scalar(constants, scale.input[1], 1 / _SQRT2) or _scalar(constants, scale.input[0], 1 / _SQRT2)
        ):
            x = scale.input[0] if _scalar(constants, scale.input[1], 1 / _SQRT2) else scale.input[1]
        else:
            continue
        add = only_use(erf.output[0])
        if add is None or add.op_type != "Add" or not _scalar(constants, _other(add, erf.output[0]) or "", 1.0):
            continue
        first = only_use(add.output[0])
        if first is None or first.op_type != "Mul":
            continue
        partner = _other(first, add.output[0])
        pattern = [scale, erf, add, first]
        last = None
        if partner is not None and (partner == x or _scalar(constants, partner, 0.5)):
            # (1 + erf) * 0.5 * x  or  (1 + erf) * x * 0.5
            second = only_use(first.output[0])
            want = x if partner != x else None
            if second is not None and second.op_type == "Mul":
                rest = _other(second, first.output[0])
                if (want is not None and rest == x) or (
                    want is None and rest is not None and _scalar(constants, rest, 0.5)
                ):
                    last = second
                    pattern.append(second)
        elif partner is not None:
            # (1 + erf) * (0.5 * x)
            half = producer.get(partner)
            if (
                half is not None
                and half.op_type == "Mul"
                and only_use(half.output[0]) is first
                and x in half.input
                and _scalar(constants, _other(half, x) or "", 0.5)
            ):
                last = first
                pattern.append(half)
        if last is None or any(id(n) in removed for n in pattern):
            continue
        removed.update(id(n) for n in pattern)
        gelu = onnx.helper.make_node("Gelu", [x], [last.output[0]], name=f"{erf.name or 'erf'}_gelu")
        replacements.append((last, gelu))
    if not replacements:
        return 0
    at = {id(last): gelu for last, gelu in replacements}
    nodes = []
    for n in graph.node:  # the Gelu node takes the place of the pattern's last node (topological order kept)
        if id(n) in at:
            nodes.append(at[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    used = {i for n in nodes for i in n.input} | outputs
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < GELU_OPSET:
            opset.version = GELU_OPSET
    return len(replacements)


def remaining_erf(model: Any) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Erf")


__all__ = ["GELU_OPSET", "fuse_gelu", "remaining_erf"]
