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


def prune_structured(module: Any, examples: dict[str, np.ndarray], names: list[str], sparsity: float,
                     ignored: list[str], round_to: int | None, log: Any) -> list[str]:
    """Remove ``sparsity`` of every layer's channels with torch-pruning's dependency graph (L2 group
    magnitude importance); layers producing model outputs keep their channels. Returns those kept."""
    import torch
    import torch_pruning as tp

    layers = tm.prunable_modules(module)
    keep = sorted(set(ignored) | tm.output_layers(module))
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



def run_torch(spec: PruneSpec, ctx: StepContext, path: Path) -> StepOutput:
    import torch

    torch.manual_seed(spec.seed)
    train = common.load_data(ctx, "train_data_uri", labels_required=False)
    evaluation = common.load_data(ctx, "eval_data_uri", labels_required=True)
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
    acc_before = ft.accuracy(model, eval_x, evaluation[1], names) if evaluation else None
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
    masks: list[Any] = []
    if spec.method == "unstructured":
        masks = prune_unstructured(model, spec.sparsity, ignored)
    else:
        kept = prune_structured(model, feeds, names, spec.sparsity, ignored, spec.round_to, ctx.log)
        tm.run_checked(model, feeds, names, "the structurally pruned model")
    prune_time = time.monotonic() - started

    losses: list[float] = []
    tune_started = time.monotonic()
    acc_pruned = None
    if epochs:
        assert train is not None and train_x is not None
        common.record_signal(ctx, spec, signal)
        acc_pruned = ft.accuracy(model, eval_x, evaluation[1], names) if evaluation else None
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
    if evaluation:
        metrics["accuracy_before"] = float(acc_before)
        metrics["accuracy_after"] = ft.accuracy(model, eval_x, evaluation[1], names)
        metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy_after"]
        if epochs:
            metrics["accuracy_pruned_before_fine_tune"] = float(acc_pruned)
    metrics.update({"prune_time_s": prune_time, "fine_tune_epochs": float(epochs), "fine_tune_time_s": tune_time})
    if losses:
        metrics["fine_tune_loss"] = losses[-1]
    ctx.log.info("After: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_after, flops_after, bytes_after, gzip_after, sparsity, metrics.get("accuracy_after"))
    common.check_gate(spec, metrics)

    layers = {
        name: {"shape_before": shapes_before[name], "shape_after": shapes_after.get(name),
               "sparsity": tm.layer_sparsity(model, name)}
        for name in shapes_before
    }
    report = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
              "kept_layers": kept, "ignored_layers": ignored, "layers": layers, "fine_tune_signal": signal,
              "fine_tune_losses": losses, "distill_augment": augment, "fine_tune_batchnorm": spec.fine_tune_batchnorm}
    common.log_epoch_losses(ctx, losses)
    artifacts = {
        "model_pt2": ctx.log_artifact(out_path, "model"),
        "prune_report": ctx.log_dict(report, "prune_report.json"),
    }
    info = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
            "format": "pt2", "kept_layers": kept, "fine_tune_signal": signal}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)
