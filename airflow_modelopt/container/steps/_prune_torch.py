"""PyTorch side of the prune step (imported by steps/prune.py only when the model is PyTorch).

What works, and why it is built this way:

- ``torch.export.load(p).module()`` gives an *unlifted* GraphModule: parameters are attributes
  read by ``get_attr`` nodes and every layer is a functional aten call (``aten.conv2d``,
  ``aten.linear``, ...). It has no ``nn.Conv2d``/``nn.Linear`` submodules, refuses ``eval()``,
  and torch-pruning cannot trace it (it finds only "unwrapped parameters"). So the step first
  rebuilds a plain ``fx.GraphModule`` in which each conv/linear/batch-norm/layer-norm call whose
  weights are attributes becomes a real ``nn.Conv{1,2,3}d``/``nn.Linear``/``nn.BatchNorm*``/
  ``nn.LayerNorm`` owning the same tensors ("lifting"), and proves it computes the same outputs.
  torch-pruning traces that module (its dependency graph follows add, cat, flatten and view),
  ``torch.nn.utils.prune`` hooks fire on it during fine-tuning, and torch.export exports it again.
- Inputs: an ExportedProgram (.pt2), an MLflow pytorch model saved as pt2 (its ``data/model.pt2``),
  or an MLflow pytorch model saved as a pickle (loaded by MLflow, then exported with torch.export
  from example inputs taken from the data artifacts or the MLflow signature). TorchScript is
  refused: it has neither the module structure nor an aten graph torch-pruning can use.
- Layers whose weights are shared by several calls, transposed convolutions, and ops other than
  those above stay functional and are never pruned. Shapes written as constants into the graph
  (``view(x, [-1, 512])``) cannot follow a structured prune: the pruned model is run before export
  and such a failure names the node (add its producing layer to ``ignored_layers``).
- Fine-tuning runs in inference mode (``eval()``): BatchNorm running statistics stay frozen and
  dropout stays off, as the exported graph was traced that way; gradients still flow.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.data import as_model_dtype, match_inputs, take_batch
from airflow_modelopt.exceptions import ConversionFailed, InputError, StepFailed

#: Output .pt2 file name inside the artifact folder ``model/``.
PT2_NAME = "model.pt2"


@dataclass
class TorchSource:
    """The model as loaded: an unlifted GraphModule, its input names and example inputs."""

    kind: str  # exported_program | mlflow_pt2 | mlflow_pytorch
    module: Any
    input_names: list[str]
    examples: dict[str, np.ndarray] | None  # batch of 2, from the program's own shapes, or None
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)  # per input: non-batch dynamic dims


# -- loading ----------------------------------------------------------------------------------


def _program_source(program: Any, kind: str) -> TorchSource:
    """Input names, example inputs and dynamic dimensions from an ExportedProgram's signature."""
    import torch

    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    examples: dict[str, np.ndarray] | None = {}
    dynamic: dict[str, list[int]] = {}
    for name in names:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor):
            examples = None
            break
        shape = []
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            if d > 0:
                dynamic.setdefault(name, []).append(d)
            shape.append(2 if d == 0 else _size_hint(size))
        shape[0:1] = [2] if shape else []
        gen = torch.Generator().manual_seed(0)
        if val.dtype.is_floating_point:
            tensor = torch.rand(shape, generator=gen, dtype=torch.float32).to(val.dtype)
        else:
            tensor = torch.zeros(shape, dtype=val.dtype)
        examples[name] = tensor.numpy()
    return TorchSource(kind, program.module(), names, examples, dynamic)


def _size_hint(size: Any) -> int:
    """The example value torch.export traced a symbolic dimension with (2 when unknown)."""
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None)
    try:
        return int(hint(size, fallback=2)) if hint else 2
    except Exception:  # noqa: BLE001 - no hint: a small size is enough to trace
        return 2


def _load_program(path: Path, uri: str) -> Any:
    import torch

    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"model_uri: {uri} is not a loadable torch.export ExportedProgram (.pt2): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _mlflow_signature_examples(folder: Path) -> dict[str, np.ndarray] | None:
    """Example inputs (batch 2) from an MLflow model's tensor signature, when it has one."""
    import json

    import yaml

    meta = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    raw = (meta.get("signature") or {}).get("inputs")
    if not raw:
        return None
    specs = json.loads(raw) if isinstance(raw, str) else raw
    examples = {}
    for i, spec in enumerate(specs):
        tensor = spec.get("tensor-spec") if isinstance(spec, dict) else None
        if not tensor:
            return None
        shape = [2 if (d is None or d < 0) else int(d) for d in tensor.get("shape", [])]
        dtype = np.dtype(tensor.get("dtype", "float32"))
        name = spec.get("name") or ("x" if len(specs) == 1 else f"input_{i}")
        rng = np.random.default_rng(0)
        examples[name] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return examples


def load_source(path: Path, uri: str, data_examples: dict[str, np.ndarray] | None) -> TorchSource:
    """Load a .pt2 file or an MLflow pytorch model folder as an unlifted GraphModule."""
    if path.is_dir():
        if (path / "MLmodel").is_file():
            pt2 = sorted(path.rglob("*.pt2"))
            if len(pt2) == 1:
                return _program_source(_load_program(pt2[0], uri), "mlflow_pt2")
            return _from_pickled_mlflow(path, uri, data_examples)
        pt2 = sorted(path.rglob("*.pt2"))
        if len(pt2) != 1:
            raise InputError(
                f"model_uri: {uri} is a folder with {len(pt2)} .pt2 files and no MLmodel; expected one "
                "ExportedProgram (.pt2) or an MLflow pytorch model"
            )
        path = pt2[0]
    if path.stat().st_size == 0:
        raise InputError(f"model_uri: {uri} is an empty file")
    return _program_source(_load_program(path, uri), "exported_program")


def _from_pickled_mlflow(folder: Path, uri: str, data_examples: dict[str, np.ndarray] | None) -> TorchSource:
    """An MLflow pytorch model saved as a pickle: load it, then export it with torch.export."""
    import mlflow.pytorch
    import torch

    try:
        model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"model_uri: {uri} is an MLflow model that does not load as pytorch: {exc}") from None
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"model_uri: {uri} holds a TorchScript module, which the prune step does not support; "
            "log the model with torch.export (.pt2) or as an nn.Module"
        )
    model.eval()
    examples = data_examples or _mlflow_signature_examples(folder)
    if not examples:
        raise InputError(
            f"model_uri: {uri} is a pickled MLflow pytorch model without a tensor signature; give "
            "train_data_uri or eval_data_uri so the step has example inputs to export it with"
        )
    examples = take_batch(examples, 2)
    names = list(examples)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(
            model, tuple(torch.from_numpy(examples[n]) for n in names),
            dynamic_shapes=tuple({0: batch} for _ in names),
        )
    except Exception as exc:  # noqa: BLE001
        raise ConversionFailed(
            f"torch.export could not trace the MLflow pytorch model {uri} (needed to prune it): "
            f"{type(exc).__name__}: {str(exc)[:1500]}"
        ) from None
    source = _program_source(program, "mlflow_pytorch")
    source.examples = examples if list(examples) == source.input_names else source.examples
    return source


# -- lifting functional layers into modules ---------------------------------------------------


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


def source_outputs(source: TorchSource, examples: dict[str, np.ndarray], field_name: str) -> list[np.ndarray]:
    """The source model's outputs on the example inputs; inputs that do not fit name their field."""
    try:
        return forward(source.module, examples, source.input_names)
    except Exception as exc:  # noqa: BLE001 - the model's own check names the dimension
        shapes = {n: list(a.shape) for n, a in examples.items()}
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{field_name}: samples of shape {shapes} do not fit the model: {first}") from None


def lift(source: TorchSource, examples: dict[str, np.ndarray], ref: list[np.ndarray]) -> Any:
    """A plain fx.GraphModule with nn layers, proven to compute what the source computes (``ref``)."""
    module = _Lifter(source.module).run()
    got = forward(module, examples, source.input_names)
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape or not np.allclose(r, g, atol=1e-5, rtol=1e-4):
            raise StepFailed(
                f"rebuilding the exported graph with nn layers changed output {i} "
                f"(max abs difference {float(np.abs(r - g).max()) if r.shape == g.shape else 'shape'}); "
                "this model's graph is not supported by the prune step"
            )
    return module


# -- running ----------------------------------------------------------------------------------


def forward(module: Any, feeds: dict[str, np.ndarray], names: list[str], grad: bool = False) -> list[np.ndarray]:
    import torch

    with torch.set_grad_enabled(grad):
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, dict):
        out = tuple(out.values())
    return [o.detach().cpu().numpy() for o in out]


def run_checked(module: Any, feeds: dict[str, np.ndarray], names: list[str], what: str) -> list[np.ndarray]:
    """Run the module node by node, so a failure names the graph node that broke."""
    import torch
    from torch import fx

    class _Named(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            try:
                return super().run_node(n)
            except Exception as exc:
                raise ConversionFailed(
                    f"{what}: graph node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)}) fails: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}. A shape written "
                    "into the graph as a constant cannot follow removed channels: add the layer feeding this "
                    "node to ignored_layers"
                ) from None

    with torch.no_grad():
        flat = _Named(module).run(*[torch.from_numpy(feeds[n]) for n in names])
    flat = flat if isinstance(flat, (tuple, list)) else (flat,)
    return [o.detach().cpu().numpy() for o in flat if isinstance(o, torch.Tensor)]


def prunable_modules(module: Any) -> dict[str, Any]:
    """Conv and Linear layers: what pruning acts on and sparsity is measured over."""
    import torch

    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}


def output_layers(module: Any) -> set[str]:
    """Conv/Linear layers whose output channels reach a model output without another such layer."""
    prunable = prunable_modules(module)
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [n for n in module.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and node.target in prunable:
            found.add(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return found


def check_ignored(module: Any, ignored: list[str] | None) -> list[str]:
    names = list(prunable_modules(module))
    unknown = [n for n in ignored or [] if n not in names]
    if unknown:
        raise InputError(
            f"ignored_layers: {unknown} are not Conv/Linear layers of this model; its layers are {names}"
        )
    return list(ignored or [])


def weight_sparsity(module: Any) -> tuple[float, int, int]:
    """(zeros / total, zeros, total) over the weights of every Conv/Linear layer."""
    import torch

    zeros = total = 0
    for m in prunable_modules(module).values():
        w = m.weight
        zeros += int(torch.count_nonzero(w == 0))
        total += w.numel()
    return (zeros / total if total else 0.0), zeros, total


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def count_flops(module: Any, examples: dict[str, np.ndarray], names: list[str]) -> float:
    """torch-pruning's op counter for one sample (multiply-accumulates plus bias/normalization ops)."""
    import torch
    import torch_pruning as tp

    one = tuple(torch.from_numpy(np.ascontiguousarray(examples[n][:1])) for n in names)
    flops, _ = tp.utils.count_ops_and_params(module, one if len(one) > 1 else one[0])
    return float(flops)


def channel_counts(module: Any) -> dict[str, list[int]]:
    """Per Conv/Linear layer: weight shape (output channels first)."""
    return {name: list(m.weight.shape) for name, m in prunable_modules(module).items()}


# -- pruning ----------------------------------------------------------------------------------


def prune_unstructured(module: Any, sparsity: float, ignored: list[str]) -> list[tuple[Any, str]]:
    """Global L1 magnitude pruning over every Conv/Linear weight; masks stay until made permanent."""
    from torch.nn.utils import prune

    params = [(m, "weight") for name, m in prunable_modules(module).items() if name not in ignored]
    if not params:
        raise InputError("ignored_layers: every Conv/Linear layer is ignored; nothing is left to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    return params


def make_permanent(params: list[tuple[Any, str]]) -> None:
    from torch.nn.utils import prune

    for m, name in params:
        prune.remove(m, name)


def prune_structured(module: Any, examples: dict[str, np.ndarray], names: list[str], sparsity: float,
                     ignored: list[str], round_to: int | None, log: Any) -> list[str]:
    """Remove ``sparsity`` of every layer's channels with torch-pruning's dependency graph (L2 group
    magnitude importance); layers producing model outputs keep their channels. Returns those kept."""
    import torch
    import torch_pruning as tp

    layers = prunable_modules(module)
    keep = sorted(set(ignored) | output_layers(module))
    if not set(layers) - set(keep):
        raise InputError(
            f"ignored_layers: nothing left to prune: the layers {keep} are ignored or produce the model's outputs"
        )
    log.info("Structured pruning keeps the channels of %s (ignored or producing outputs)", keep)
    example = tuple(torch.from_numpy(np.ascontiguousarray(examples[n])) for n in names)
    try:
        pruner = tp.pruner.MetaPruner(
            module, example if len(example) > 1 else example[0],
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=sparsity, ignored_layers=[layers[n] for n in keep], round_to=round_to,
        )
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - torch-pruning's own message names the layer
        raise ConversionFailed(
            f"torch-pruning could not prune this model's channels: {type(exc).__name__}: {str(exc)[:1500]}"
        ) from None
    return keep


# -- training and accuracy --------------------------------------------------------------------


def model_arrays(arrays: dict[str, np.ndarray], names: list[str], field_name: str) -> dict[str, np.ndarray]:
    return {k: as_model_dtype(v) for k, v in match_inputs(arrays, names, field=field_name).items()}


def _logits(module: Any, feeds: list[Any], field_name: str) -> Any:
    import torch

    out = module(*feeds)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(
            f"{field_name}: fine-tuning and accuracy need a classifier with one (batch, classes) output; "
            f"this model gives {getattr(out, 'shape', type(out).__name__)}"
        )
    return out


def fine_tune(module: Any, inputs: dict[str, np.ndarray], y: np.ndarray, names: list[str], *, epochs: int,
              lr: float, batch_size: int, seed: int, log: Any) -> list[float]:
    """Adam on cross-entropy; the model stays in inference mode (frozen BatchNorm statistics)."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
    labels = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    module.eval()
    losses = []
    n = len(labels)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i: i + batch_size]
            opt.zero_grad()
            loss = loss_fn(_logits(module, [t[idx] for t in tensors], "train_data_uri"), labels[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        log.info("fine-tune epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    return losses


def accuracy(module: Any, inputs: dict[str, np.ndarray], y: np.ndarray, names: list[str]) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 512):
            feeds = [torch.from_numpy(np.ascontiguousarray(inputs[n][i: i + 512])) for n in names]
            correct += int((_logits(module, feeds, "eval_data_uri").argmax(dim=1).numpy() == y[i: i + 512]).sum())
    return correct / len(y)


# -- export -----------------------------------------------------------------------------------


def export_pt2(module: Any, examples: dict[str, np.ndarray], source: TorchSource, path: Path) -> Path:
    """torch.export with a dynamic batch (and the source's other dynamic dimensions); save .pt2."""
    import torch

    names = source.input_names
    batch = torch.export.Dim("batch", min=1)
    shapes = []
    for n in names:
        dims: dict[int, Any] = {0: batch}
        for d in source.dynamic_dims.get(n, []):
            dims[d] = torch.export.Dim.AUTO
        shapes.append(dims)
    args = tuple(torch.from_numpy(np.ascontiguousarray(examples[n])) for n in names)
    try:
        program = torch.export.export(module, args, dynamic_shapes=tuple(shapes))
    except Exception as exc:  # noqa: BLE001
        raise ConversionFailed(
            f"torch.export could not export the pruned model with a dynamic batch: {type(exc).__name__}: "
            f"{str(exc)[:1500]}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def example_feeds(source: TorchSource, data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Two samples per input: real data when there is some, else the program's own shapes."""
    if data is not None:
        return take_batch(data, 2)
    if source.examples is None:
        raise InputError(
            "model_uri: the model does not record its input shapes; give train_data_uri or eval_data_uri "
            "so the step has example inputs"
        )
    return source.examples


def epochs_steps(n: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(n / batch_size)
