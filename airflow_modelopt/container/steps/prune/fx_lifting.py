"""Lifting: rebuild an unlifted torch.export GraphModule with real nn layers, so it can be pruned.

``torch.export.load(p).module()`` gives an *unlifted* GraphModule: parameters are attributes read
by ``get_attr`` nodes and every layer is a functional aten call (``aten.conv2d``, ``aten.linear``,
...). It has no ``nn.Conv2d``/``nn.Linear`` submodules, refuses ``eval()``, and torch-pruning cannot
trace it (it finds only "unwrapped parameters"). :func:`lift` rebuilds a plain ``fx.GraphModule``
in which each conv/linear/batch-norm/layer-norm call whose weights are attributes becomes a real
``nn.Conv{1,2,3}d``/``nn.Linear``/``nn.BatchNorm*``/``nn.LayerNorm`` owning the same tensors, and
proves it computes the same outputs. torch-pruning traces that module (its dependency graph follows
add, cat, flatten and view), ``torch.nn.utils.prune`` hooks fire on it during fine-tuning, and
torch.export exports it again.

Layers whose weights are shared by several calls, transposed convolutions, and ops other than those
above stay functional and are never pruned.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np

from airflow_modelopt.container.steps.prune.fine_tune import forward
from airflow_modelopt.exceptions import StepFailed


def _normalized_args(node: Any) -> dict[str, Any]:
    """Every schema argument of an aten call by name, defaults filled in."""
    schema = node.target._schema
    values: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
        else:
            values[arg.name] = None
    return values


def _get_attr(module: Any, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


class _Lifter:
    """Rebuilds an unlifted GraphModule with real nn modules for its weighted layers."""

    def __init__(self, source: Any) -> None:
        import torch
        from torch import fx

        self.source = source
        self.graph = fx.Graph()
        self.graph._codegen = copy.deepcopy(source.graph._codegen)
        out = self.graph.graph_copy(source.graph, {})
        self.graph.output(out)
        for node in list(self.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                self.graph.erase_node(node)
        self.root = torch.nn.Module()
        self.attr_uses: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr":
                self.attr_uses[node.target] = self.attr_uses.get(node.target, 0) + len(node.users)
        self.lifted: dict[str, Any] = {}

    # helpers
    def _attr_node(self, value: Any) -> Any:
        """The get_attr node behind an argument, when it is used by this call only."""
        if getattr(value, "op", None) != "get_attr" or self.attr_uses.get(value.target, 0) != 1:
            return None
        return value

    def _tensor(self, node: Any) -> Any:
        import torch

        t = _get_attr(self.source, node.target)
        return t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t.detach().clone())

    def _place(self, preferred: str, module: Any, fallback: str) -> str | None:
        """Register ``module`` at ``preferred`` (the original layer name) or a fresh name."""
        for qualname in (preferred, fallback):
            if not qualname or qualname in self.lifted:
                continue
            *parents, last = qualname.split(".")
            cur = self.root
            ok = True
            for p in parents:
                child = getattr(cur, p, None)
                if child is None:
                    import torch

                    child = torch.nn.Module()
                    cur.add_module(p, child)
                elif not hasattr(child, "add_module"):
                    ok = False
                    break
                cur = child
            if ok and not hasattr(cur, last):
                cur.add_module(last, module)
                self.lifted[qualname] = module
                return qualname
        return None

    def _replace(self, node: Any, qualname: str, args: tuple[Any, ...], drop: list[Any]) -> Any:
        with self.graph.inserting_before(node):
            new = self.graph.call_module(qualname, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        for attr in drop:
            if attr is not None and not attr.users:
                self.graph.erase_node(attr)
        return new

    @staticmethod
    def _base(target: str, suffix: str) -> str:
        return target[: -len(suffix)] if target.endswith(suffix) else ""

    # layers
    def conv(self, node: Any, a: dict[str, Any], transposed: bool = False) -> None:
        import torch

        if transposed:
            return
        w, b = self._attr_node(a["weight"]), a.get("bias")
        if w is None or (b is not None and self._attr_node(b) is None):
            return
        weight = self._tensor(w)
        dims = weight.dim() - 2
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}.get(dims)
        if cls is None:
            return
        groups = int(a.get("groups") or 1)
        padding = a.get("padding", 0)
        padding = padding if isinstance(padding, str) else _tuple(padding, dims)
        module = cls(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_tuple(a.get("stride", 1), dims),
            padding=padding, dilation=_tuple(a.get("dilation", 1), dims), groups=groups, bias=b is not None,
            device="meta",
        )
        module.weight = weight
        if b is not None:
            module.bias = self._tensor(b)
        name = self._place(self._base(w.target, ".weight"), module, f"lifted_{node.name}")
        if name:
            self._replace(node, name, (a["input"],), [w, b])

    def linear(self, node: Any, a: dict[str, Any]) -> None:

        w, b = self._attr_node(a["weight"]), a.get("bias")
        if w is None or (b is not None and self._attr_node(b) is None):
            return
        weight = self._tensor(w)
        if weight.dim() != 2:
            return
        name = self._place_linear(node, w, b, weight)
        if name:
            self._replace(node, name, (a["input"],), [w, b])

    def _place_linear(self, node: Any, w: Any, b: Any, weight: Any) -> str | None:
        """An nn.Linear holding the graph's weight (and bias) attributes, placed in the module tree."""
        import torch

        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
        module.weight = weight
        if b is not None:
            module.bias = self._tensor(b)
        return self._place(self._base(w.target, ".weight"), module, f"lifted_{node.name}")

    def batch_norm(self, node: Any, a: dict[str, Any], replace_node: Any = None) -> None:
        import torch

        if a.get("training"):
            return
        mean, var = self._attr_node(a.get("running_mean")), self._attr_node(a.get("running_var"))
        w, b = a.get("weight"), a.get("bias")
        if mean is None or var is None or (w is None) != (b is None):
            return
        if w is not None and (self._attr_node(w) is None or self._attr_node(b) is None):
            return
        running_mean = _get_attr(self.source, mean.target)
        rank = getattr(a["input"].meta.get("val"), "ndim", 4)
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 5: torch.nn.BatchNorm3d}.get(rank, torch.nn.BatchNorm2d)
        module = cls(running_mean.shape[0], eps=float(a.get("eps", 1e-5)), momentum=float(a.get("momentum") or 0.1),
                     affine=w is not None)
        if w is not None:
            module.weight, module.bias = self._tensor(w), self._tensor(b)
        module.running_mean = running_mean.detach().clone()
        module.running_var = _get_attr(self.source, var.target).detach().clone()
        base = self._base(mean.target, ".running_mean")
        try:
            module.num_batches_tracked = _get_attr(self.source, f"{base}.num_batches_tracked").detach().clone()
        except AttributeError:
            pass
        module.eval()
        name = self._place(base, module, f"lifted_{node.name}")
        if name:
            self._replace(replace_node if replace_node is not None else node, name, (a["input"],), [])
            if replace_node is not None:
                self.graph.erase_node(node)
            for attr in (w, b, mean, var):
                if attr is not None and not attr.users:
                    self.graph.erase_node(attr)

    def addmm(self, node: Any, a: dict[str, Any]) -> None:
        """Core-ATen linear: addmm(bias, x, permute(weight, [1, 0])) or mm(x, t(weight))."""
        import torch

        aten = torch.ops.aten
        mat2 = a.get("mat2")
        if getattr(mat2, "op", None) != "call_function" or len(mat2.users) != 1:
            return
        if mat2.target is aten.permute.default and list(mat2.args[1]) == [1, 0]:
            w = self._attr_node(mat2.args[0])
        elif mat2.target in (aten.t.default, aten.numpy_T.default):
            w = self._attr_node(mat2.args[0])
        else:
            return
        b = a.get("self") if node.target is aten.addmm.default else None
        if node.target is aten.addmm.default and (a.get("beta", 1) != 1 or a.get("alpha", 1) != 1):
            return
        if w is None or (node.target is aten.addmm.default and self._attr_node(b) is None):
            return
        weight = self._tensor(w)
        if weight.dim() != 2 or (b is not None and _get_attr(self.source, b.target).dim() != 1):
            return
        name = self._place_linear(node, w, b, weight)
        if name:
            self._replace(node, name, (a["mat1"],), [])
            self.graph.erase_node(mat2)
            for attr in (w, b):
                if attr is not None and not attr.users:
                    self.graph.erase_node(attr)

    def layer_norm(self, node: Any, a: dict[str, Any], replace_node: Any = None) -> None:
        import torch

        w, b = a.get("weight"), a.get("bias")
        if w is not None and self._attr_node(w) is None:
            return
        if b is not None and (w is None or self._attr_node(b) is None):
            return
        shape = [int(s) for s in a["normalized_shape"]]
        module = torch.nn.LayerNorm(shape, eps=float(a.get("eps", 1e-5)), elementwise_affine=w is not None,
                                    bias=b is not None, device="meta")
        if w is not None:
            module.weight = self._tensor(w)
        if b is not None:
            module.bias = self._tensor(b)
        base = self._base(w.target, ".weight") if w is not None else ""
        name = self._place(base, module, f"lifted_{node.name}")
        if name:
            self._replace(replace_node if replace_node is not None else node, name, (a["input"],), [])
            if replace_node is not None:
                self.graph.erase_node(node)
            for attr in (w, b):
                if attr is not None and not attr.users:
                    self.graph.erase_node(attr)

    def run(self) -> Any:
        import torch
        from torch import fx

        aten = torch.ops.aten
        convs = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                 aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in convs:
                self.conv(node, _normalized_args(node))
            elif node.target is aten.convolution.default:
                a = _normalized_args(node)
                self.conv(node, a, transposed=bool(a.get("transposed")))
            elif node.target is aten.linear.default:
                self.linear(node, _normalized_args(node))
            elif node.target is aten.batch_norm.default:
                self.batch_norm(node, _normalized_args(node))
            elif node.target is aten.layer_norm.default:
                self.layer_norm(node, _normalized_args(node))
            elif node.target in (aten._native_batch_norm_legit_no_training.default, aten.native_layer_norm.default):
                users = list(node.users)
                if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
                    lift_op = self.batch_norm if "batch_norm" in str(node.target) else self.layer_norm
                    lift_op(node, _normalized_args(node), replace_node=users[0])
            elif node.target in (aten.addmm.default, aten.mm.default):
                self.addmm(node, _normalized_args(node))
        # Everything else the graph reads (unlifted parameters, buffers, constants, submodules).
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                self._copy_attr(node.target)
        self.graph.lint()
        module = fx.GraphModule(self.root, self.graph, class_name="PrunableGraphModule")
        for p in module.parameters():
            p.requires_grad_(True)
        return module.eval()

    def _copy_attr(self, target: str) -> None:
        import torch

        try:
            _get_attr(self.root, target)
            return
        except AttributeError:
            pass
        value = _get_attr(self.source, target)
        *parents, last = target.split(".")
        cur = self.root
        for p in parents:
            if not hasattr(cur, p):
                cur.add_module(p, torch.nn.Module())
            cur = getattr(cur, p)
        if isinstance(value, torch.nn.Parameter):
            cur.register_parameter(last, value)
        elif isinstance(value, torch.Tensor):
            cur.register_buffer(last, value)
        elif isinstance(value, torch.nn.Module):
            cur.add_module(last, value)
        else:
            setattr(cur, last, value)



def lift(source_module: Any, examples: dict[str, np.ndarray], names: list[str], ref: list[np.ndarray]) -> Any:
    """A plain fx.GraphModule with nn layers, proven to compute what the source computes (``ref``)."""
    module = _Lifter(source_module).run()
    got = forward(module, examples, names)
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape or not np.allclose(r, g, atol=1e-5, rtol=1e-4):
            raise StepFailed(
                f"rebuilding the exported graph with nn layers changed output {i} "
                f"(max abs difference {float(np.abs(r - g).max()) if r.shape == g.shape else 'shape'}); "
                "this model's graph is not supported by the prune step"
            )
    return module


__all__ = ["lift"]
