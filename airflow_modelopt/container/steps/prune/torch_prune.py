"""PyTorch pruning: global L1 unstructured (``torch.nn.utils.prune``) or structured channel pruning
(torch-pruning's dependency graph), then the optional fine-tune, then a .pt2 export.

The ExportedProgram is first rebuilt with real nn layers (``fx_lifting``), proven to compute what
the source computes; the fine-tune learns from labels, from the unpruned model (distillation), or
both (``fine_tune``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps.prune import common
from airflow_modelopt.container.steps.prune import fine_tune as ft
from airflow_modelopt.container.steps.prune import torch_model as tm
from airflow_modelopt.container.steps.prune.fx_lifting import lift
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.prune import PruneSpec


def prune_unstructured(module: Any, sparsity: float, ignored: list[str]) -> list[tuple[Any, str]]:
    """Global L1 magnitude pruning over every Conv/Linear weight; masks stay until made permanent."""
    from torch.nn.utils import prune

    params = [(m, "weight") for name, m in tm.prunable_modules(module).items() if name not in ignored]
    if not params:
        raise InputError("ignored_layers: every Conv/Linear layer is ignored; nothing is left to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    return params


def make_permanent(params: list[tuple[Any, str]]) -> None:
    from torch.nn.utils import prune

    for m, name in params:
        prune.remove(m, name)


#: aten ops (by name) a channel passes through unchanged, or that torch-pruning's dependency graph maps
#: (pooling, flatten to (batch, features), concatenation on dim 1, upsampling). A Conv/Linear whose output
#: reaches any other op before the next Conv/Linear (the heads' view/transpose/select of attention, a
#: patch embedding's flatten(2).transpose, sdpa, matmul, embedding ...) keeps its channels: the graph
#: holds shapes as constants there, which a removed channel would break.
_CHANNEL_SAFE_OPS = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "mish", "softplus", "dropout", "add", "sub", "mul", "div", "clamp", "clamp_min",
    "clamp_max", "neg", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "mean", "sum", "amax", "flatten", "cat", "concat",
    "upsample_bilinear2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_linear1d",
    "upsample_bicubic2d", "pad", "constant_pad_nd", "contiguous", "clone", "alias", "detach", "_to_copy",
    "to", "type_as", "getitem",
})
_RESHAPES = frozenset({"view", "reshape", "_unsafe_view"})


def _op_name(node: Any) -> str:
    return _target_name(node.target)


def _target_name(target: Any) -> str:
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None) or getattr(target, "__name__", "")
    return str(name).split(".")[-1]


def _flattens(node: Any) -> bool:
    """A view/reshape that flattens (batch, C, ...) into (batch, features): torch-pruning maps it."""
    src = node.args[0] if node.args else None
    a, b = getattr(src, "meta", {}).get("val"), node.meta.get("val")
    if a is None or b is None or a.dim() < 2 or b.dim() != 2:
        return False
    return str(a.shape[0]) == str(b.shape[0])


def shape_bound_layers(module: Any) -> dict[str, str]:
    """Conv/Linear layers whose output channels reach an op that holds their count as a constant (or an
    op torch-pruning cannot map) before the next Conv/Linear; each with the first such op's name."""
    import operator

    import torch

    prunable = tm.prunable_modules(module)
    norms = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
             torch.nn.GroupNorm)
    submodules = dict(module.named_modules())
    bound: dict[str, str] = {}
    for node in module.graph.nodes:
        if node.op != "call_module" or node.target not in prunable:
            continue
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                continue
            if user.op == "call_module":
                if user.target in prunable:
                    continue
                if isinstance(submodules.get(user.target), norms):
                    stack.extend(user.users)
                    continue
                bound[node.target] = f"module {user.target}"
                break
            name = "getitem" if user.target is operator.getitem else _op_name(user)
            if user.op == "call_function" and (name in _CHANNEL_SAFE_OPS or (name in _RESHAPES and _flattens(user))):
                if name in ("cat", "concat") and (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) != 1:
                    bound[node.target] = f"{name} on dim {user.args[1] if len(user.args) > 1 else 0}"
                    break
                stack.extend(user.users)
                continue
            bound[node.target] = f"{user.op} {name or user.target}"
            break
    return bound


class _CatSizes:
    """A forward for torch-pruning's trace that records each dim-1 concatenation's input sizes by its
    autograd node: torch-pruning infers them from neighbouring layers, which is wrong after a flatten
    (a conv's 16 channels flattened to 256 features, then concatenated), and the concat then maps the
    other input's channels onto the wrong features (IndexError)."""

    def __init__(self) -> None:
        self.sizes: dict[Any, list[int]] = {}

    def __call__(self, model: Any, example: Any) -> Any:
        import torch
        from torch import fx

        sizes = self.sizes

        class _Recorder(fx.Interpreter):
            def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
                out = super().call_function(target, args, kwargs)
                if _target_name(target) in ("cat", "concat") and isinstance(out, torch.Tensor):
                    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                    if out.grad_fn is not None and dim in (1, 1 - out.dim()):
                        sizes[out.grad_fn] = [int(t.shape[1]) for t in args[0]]
                return out

        inputs = example if isinstance(example, (tuple, list)) else (example,)
        return _Recorder(model).run(*inputs)

    def apply(self, graph: Any) -> None:
        """Set the recorded sizes on torch-pruning's concat nodes and redo its index mappings."""
        import torch_pruning as tp
        from torch_pruning.dependency import index_mapping

        fixed = False
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT and node.grad_fn in self.sizes:
                if node.module.concat_sizes != self.sizes[node.grad_fn]:
                    node.module.concat_sizes = self.sizes[node.grad_fn]
                    fixed = True
        if fixed:
            index_mapping.update_index_mapping(graph)


def prune_structured(module: Any, examples: dict[str, np.ndarray], names: list[str], sparsity: float,
                     ignored: list[str], round_to: int | None, log: Any) -> tuple[list[str], dict[str, str]]:
    """Remove ``sparsity`` of every layer's channels with torch-pruning's dependency graph (L2 group
    magnitude importance). Layers producing model outputs keep their channels, and so do layers whose
    channel count the graph holds as a constant (attention heads, a transformer's embedding width, a
    patch embedding): returns the layers kept and, for those, why."""
    import torch
    import torch_pruning as tp

    layers = tm.prunable_modules(module)
    reasons = {n: "ignored_layers" for n in ignored}
    reasons.update({n: "produces a model output" for n in tm.output_layers(module) if n not in reasons})
    bound = {n: f"its channels reach {why}, which the graph shapes with constants or torch-pruning cannot map "
                "(attention heads, a transformer's embedding width, a token layout)" for n, why in
             shape_bound_layers(module).items() if n not in reasons}
    reasons.update(bound)
    keep = sorted(reasons)
    if not set(layers) - set(keep):
        raise InputError(
            f"ignored_layers: nothing left to prune: the layers {keep} are ignored or produce the model's outputs"
            + (f"; {sorted(bound)} keep their channels because the graph holds their count as a constant"
               if bound else "")
        )
    log.info("Structured pruning keeps the channels of %s (ignored or producing outputs)",
             sorted(set(keep) - set(bound)))
    if bound:
        log.info("Structured pruning also keeps %s: %s", sorted(bound), bound)
    example = tuple(torch.from_numpy(np.ascontiguousarray(examples[n])) for n in names)
    cats = _CatSizes()
    try:
        pruner = tp.pruner.MetaPruner(
            module, example if len(example) > 1 else example[0],
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=sparsity, ignored_layers=[layers[n] for n in keep], round_to=round_to,
            forward_fn=cats,
        )
        cats.apply(pruner.DG)
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - torch-pruning's own message names the layer
        raise ConversionFailed(
            f"torch-pruning could not prune this model's channels: {type(exc).__name__}: {str(exc)[:1500]}"
        ) from None
    return keep, {n: reasons[n] for n in keep}


def run_torch(spec: PruneSpec, ctx: StepContext, path: Path) -> StepOutput:
    import torch

    torch.manual_seed(spec.seed)
    train = common.load_data(ctx, "train_data_uri", labels_required=False)
    evaluation = common.load_data(ctx, "eval_data_uri", labels_required=False)
    epochs = spec.epochs_for("torch")
    signal = common.fine_tune_signal(spec, epochs, has_labels=train is not None and train[1] is not None)
    any_data = train[0] if train else (evaluation[0] if evaluation else None)
    source = tm.load_source(path, spec.model_uri, any_data)
    names = source.input_names
    train_x = tm.model_arrays(train[0], names, "train_data_uri") if train else None
    eval_x = tm.model_arrays(evaluation[0], names, "eval_data_uri") if evaluation else None
    feeds = tm.example_feeds(source, train_x if train_x is not None else eval_x)
    ctx.log.info("Loaded %s with inputs %s", source.kind, {n: list(a.shape[1:]) for n, a in feeds.items()})

    feeds_field = "train_data_uri" if train_x is not None else "eval_data_uri" if eval_x is not None else "model_uri"
    ref = tm.source_outputs(source, feeds, feeds_field)
    started = time.monotonic()
    model = lift(source.module, feeds, names, ref)
    ignored = tm.check_ignored(model, spec.ignored_layers)
    before_path = tm.export_pt2(model, feeds, source, ctx.workdir / "before" / tm.PT2_NAME)
    bytes_before, gzip_before = common.size_of(before_path)
    sparsity_before, _, _ = tm.weight_sparsity(model)
    params_before, flops_before = tm.count_params(model), tm.count_flops(model, feeds, names)
    shapes_before = tm.channel_counts(model)
    # Without eval labels (a segmenter's masks kept elsewhere, unlabelled data), the pruned model is
    # measured by its argmax agreement with the unpruned one (per position for dense outputs).
    eval_y = None
    if evaluation:
        eval_y = evaluation[1] if evaluation[1] is not None else ft.predictions(model, eval_x, names)
    eval_measure = "none" if not evaluation else "labels" if evaluation[1] is not None else "agreement"
    if eval_measure == "agreement":
        ctx.log.info("eval_data_uri has no labels under 'y': the pruned model is measured by its argmax agreement "
                     "with the unpruned model (metrics agreement_*; max_accuracy_drop gates on 1 - agreement)")
    acc_before = ft.accuracy(model, eval_x, eval_y, names) if eval_measure == "labels" else None
    ctx.log.info("Before: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_before, flops_before, bytes_before, gzip_before, sparsity_before, acc_before)
    # The distillation teacher: the unpruned model, kept as a frozen copy to label augmented batches,
    # or its outputs on the training data computed once (inputs as given).
    teacher = teacher_module = None
    augment = False
    if signal.startswith("distillation"):
        augment = spec.distill_augment and ft.can_augment(train_x)
        if spec.distill_augment and not augment:
            ctx.log.info("distill_augment: skipped, the inputs are not all floating point (mixup/noise need floats)")
        if augment:
            import copy

            teacher_module = copy.deepcopy(model)
        else:
            teacher = ft.teacher_outputs(model, train_x, names)

    kept: list[str] = []
    kept_why: dict[str, str] = {}
    masks: list[Any] = []
    if spec.method == "unstructured":
        masks = prune_unstructured(model, spec.sparsity, ignored)
    else:
        kept, kept_why = prune_structured(model, feeds, names, spec.sparsity, ignored, spec.round_to, ctx.log)
        tm.run_checked(model, feeds, names, "the structurally pruned model")
    prune_time = time.monotonic() - started

    losses: list[float] = []
    tune_started = time.monotonic()
    acc_pruned = None
    if epochs:
        assert train is not None and train_x is not None
        common.record_signal(ctx, spec, signal)
        acc_pruned = ft.accuracy(model, eval_x, eval_y, names) if evaluation else None
        ctx.log.info("Accuracy right after pruning: %s; fine-tuning %d epochs", acc_pruned, epochs)
        losses = ft.fine_tune(model, train_x, names, labels=train[1] if "labels" in signal else None,
                              teacher=teacher, temperature=spec.distill_temperature, alpha=spec.distill_alpha,
                              epochs=epochs, lr=spec.learning_rate, batch_size=spec.batch_size, seed=spec.seed,
                              log=ctx.log, teacher_module=teacher_module, augment=augment,
                              batchnorm=spec.fine_tune_batchnorm)
    tune_time = time.monotonic() - tune_started
    if masks:
        make_permanent(masks)
    model.eval()

    out_path = tm.export_pt2(model, feeds, source, ctx.workdir / "out" / tm.PT2_NAME)
    bytes_after, gzip_after = common.size_of(out_path)
    sparsity, zeros, total = tm.weight_sparsity(model)
    params_after, flops_after = tm.count_params(model), tm.count_flops(model, feeds, names)
    shapes_after = tm.channel_counts(model)
    metrics = common.reached(sparsity, sparsity_before, zeros, total,
                             params=(params_before, params_after), flops=(flops_before, flops_after),
                             bytes=(bytes_before, bytes_after), gzip_bytes=(gzip_before, gzip_after))
    if spec.method == "structured":
        pruned_layers = [n for n in shapes_before if n not in kept]
        ch_before = sum(shapes_before[n][0] for n in pruned_layers)
        ch_after = sum(shapes_after[n][0] for n in pruned_layers)
        metrics["channel_sparsity"] = 1 - common.ratio(ch_after, ch_before)
    if eval_measure == "labels":
        metrics["accuracy_before"] = float(acc_before)
        metrics["accuracy_after"] = ft.accuracy(model, eval_x, eval_y, names)
        metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy_after"]
        if epochs:
            metrics["accuracy_pruned_before_fine_tune"] = float(acc_pruned)
    elif eval_measure == "agreement":
        metrics["agreement_after"] = ft.accuracy(model, eval_x, eval_y, names)
        if epochs:
            metrics["agreement_pruned_before_fine_tune"] = float(acc_pruned)
    metrics.update({"prune_time_s": prune_time, "fine_tune_epochs": float(epochs), "fine_tune_time_s": tune_time})
    if losses:
        metrics["fine_tune_loss"] = losses[-1]
    ctx.log.info("After: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_after, flops_after, bytes_after, gzip_after, sparsity,
                 metrics.get("accuracy_after", metrics.get("agreement_after")))
    common.check_gate(spec, metrics)

    layers = {
        name: {"shape_before": shapes_before[name], "shape_after": shapes_after.get(name),
               "sparsity": tm.layer_sparsity(model, name)}
        for name in shapes_before
    }
    report = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
              "kept_layers": kept, "kept_layers_why": kept_why, "eval_measure": eval_measure,
              "ignored_layers": ignored, "layers": layers, "fine_tune_signal": signal,
              "fine_tune_losses": losses, "distill_augment": augment, "fine_tune_batchnorm": spec.fine_tune_batchnorm}
    common.log_epoch_losses(ctx, losses)
    artifacts = {
        "model_pt2": ctx.log_artifact(out_path, "model"),
        "prune_report": ctx.log_dict(report, "prune_report.json"),
    }
    info = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
            "format": "pt2", "kept_layers": kept, "kept_layers_why": kept_why, "eval_measure": eval_measure,
            "fine_tune_signal": signal}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)
