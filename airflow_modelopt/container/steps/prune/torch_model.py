"""A PyTorch model in the prune step: loading it, feeding it, measuring it, exporting it again.

- Inputs: an ExportedProgram (.pt2), an MLflow pytorch model saved as pt2, or an MLflow pytorch
  model saved as a pickle; the runtimes layer (``container.runtimes.load``) loads each. A pickled
  module is exported with torch.export from example inputs taken from the data artifacts or the
  MLflow signature. TorchScript is refused: it has neither the module structure nor an aten graph
  torch-pruning can use.
- Measures: sparsity over Conv/Linear weights, parameters, FLOPs (torch-pruning's op counter,
  one sample), per-layer weight shapes.
- Shapes written as constants into the graph (``view(x, [-1, 512])``) cannot follow a structured
  prune: :func:`run_checked` runs the pruned model node by node so such a failure names the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.data import as_model_dtype, match_inputs, take_batch
from airflow_modelopt.container.steps.prune.fine_tune import forward
from airflow_modelopt.exceptions import ConversionFailed, InputError

#: Output .pt2 file name inside the artifact folder ``model/``.
PT2_NAME = "model.pt2"


@dataclass
class TorchSource:
    """The model as loaded: an unlifted GraphModule, its input names and example inputs."""

    kind: str  # exported_program | mlflow_pt2 | mlflow_pytorch
    module: Any
    input_names: list[str]
    examples: dict[str, np.ndarray] | None  # batch of 2, from the graph's own shapes, or None
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)  # per input: non-batch dynamic dims


# -- loading ----------------------------------------------------------------------------------


def torchscript_error(uri: str, what: str = "TorchScript") -> InputError:
    return InputError(
        f"model_uri: {uri} is {what}, which the prune step does not support (no module structure or "
        "graph to prune); export the model with torch.export (.pt2) or log it as an MLflow pytorch model"
    )


def load_source(path: Path, uri: str, data_examples: dict[str, np.ndarray] | None) -> TorchSource:
    """Load a .pt2 file or an MLflow pytorch model folder (through the runtimes layer) as an
    unlifted GraphModule."""
    import torch

    from airflow_modelopt.container.runtimes import load

    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"model_uri: {uri} is an empty file")
    # A file is an ExportedProgram whatever its suffix (the framework check read its archive).
    runtime = load(path, "pt2" if path.is_file() else None, threads=torch.get_num_threads(), field="model_uri",
                   origin=uri)
    if runtime.format == "torchscript" or isinstance(runtime.module, torch.jit.ScriptModule):
        raise torchscript_error(uri)
    mlflow = path.is_dir() and (path / "MLmodel").is_file()
    if runtime.format == "pt2":
        return _graph_source(runtime.module, "mlflow_pt2" if mlflow else "exported_program")
    # An MLflow pytorch model saved as a pickle: export it with torch.export.
    examples = data_examples or _signature_examples(runtime)
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
            runtime.module, tuple(torch.from_numpy(examples[n]) for n in names),
            dynamic_shapes=tuple({0: batch} for _ in names),
        )
    except Exception as exc:  # noqa: BLE001
        raise ConversionFailed(
            f"torch.export could not trace the MLflow pytorch model {uri} (needed to prune it): "
            f"{type(exc).__name__}: {str(exc)[:1500]}"
        ) from None
    source = _graph_source(program.module(), "mlflow_pytorch")
    source.examples = examples if list(examples) == source.input_names else source.examples
    return source


def _signature_examples(runtime: Any) -> dict[str, np.ndarray] | None:
    """Example inputs (batch 2) from the shapes the model's MLflow signature records, if any."""
    if any(s.name in runtime.unknown_shapes or not s.shape for s in runtime.inputs):
        return None
    rng = np.random.default_rng(0)
    examples = {}
    for s in runtime.inputs:
        shape = [d if isinstance(d, int) and d >= 0 else 2 for d in s.shape]
        dtype = np.dtype(s.dtype)
        examples[s.name] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return examples


def _graph_source(module: Any, kind: str) -> TorchSource:
    """Input names, example inputs and dynamic dimensions from an unlifted GraphModule's placeholders."""
    import torch

    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders]
    examples: dict[str, np.ndarray] | None = {}
    dynamic: dict[str, list[int]] = {}
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            examples = None
            break
        shape = []
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            if d > 0:
                dynamic.setdefault(node.name, []).append(d)
            shape.append(2 if d == 0 else _size_hint(size))
        shape[0:1] = [2] if shape else []
        gen = torch.Generator().manual_seed(0)
        if val.dtype.is_floating_point:
            tensor = torch.rand(shape, generator=gen, dtype=torch.float32).to(val.dtype)
        else:
            tensor = torch.zeros(shape, dtype=val.dtype)
        examples[node.name] = tensor.numpy()
    return TorchSource(kind, module, names, examples, dynamic)


def _size_hint(size: Any) -> int:
    """The example value torch.export traced a symbolic dimension with (2 when unknown)."""
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None)
    try:
        return int(hint(size, fallback=2)) if hint else 2
    except Exception:  # noqa: BLE001 - no hint: a small size is enough to trace
        return 2


# -- feeding ----------------------------------------------------------------------------------


def model_arrays(arrays: dict[str, np.ndarray], names: list[str], field_name: str) -> dict[str, np.ndarray]:
    return {k: as_model_dtype(v) for k, v in match_inputs(arrays, names, field=field_name).items()}


def example_feeds(source: TorchSource, data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Two samples per input: real data when there is some, else the graph's own shapes."""
    if data is not None:
        return take_batch(data, 2)
    if source.examples is None:
        raise InputError(
            "model_uri: the model does not record its input shapes; give train_data_uri or eval_data_uri "
            "so the step has example inputs"
        )
    return source.examples


def source_outputs(source: TorchSource, examples: dict[str, np.ndarray], field_name: str) -> list[np.ndarray]:
    """The source model's outputs on the example inputs; inputs that do not fit name their field."""
    try:
        return forward(source.module, examples, source.input_names)
    except Exception as exc:  # noqa: BLE001 - the model's own check names the dimension
        shapes = {n: list(a.shape) for n, a in examples.items()}
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{field_name}: samples of shape {shapes} do not fit the model: {first}") from None


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



def layer_sparsity(module: Any, name: str) -> float | None:
    m = prunable_modules(module).get(name)
    if m is None:
        return None
    w = m.weight.detach()
    return float((w == 0).sum()) / w.numel()


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

