"""What both framework paths of the prune step share: data, the fine-tune's signal, sizes,
before/after metrics and the accuracy gate."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np

from airflow_modelopt.container.context import StepContext
from airflow_modelopt.container.data import LABEL_KEY, load_npz
from airflow_modelopt.exceptions import GateFailed, InputError
from airflow_modelopt.specs.prune import PruneSpec

Signal = Literal["labels", "distillation", "distillation+labels", "none"]

#: MLflow tag on the prune run naming what the fine-tune learned from.
SIGNAL_TAG = "modelopt.prune.fine_tune_signal"


def load_data(ctx: StepContext, field_name: str, *, labels_required: bool
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """(input arrays, labels or None) of a data artifact, or None when the field is not set.

    Labels, when present (or required), are checked: a 1-D integer array with one per sample."""
    path = ctx.input(field_name)
    if path is None:
        return None
    arrays = load_npz(path, field=field_name)
    y = arrays.pop(LABEL_KEY, None)
    if y is None and labels_required:
        raise InputError(
            f"{field_name}: labels are needed under {LABEL_KEY!r} (found arrays {sorted(arrays)}); "
            "accuracy compares the model's argmax with them"
        )
    if y is not None and (y.ndim != 1 or y.dtype.kind not in "iu"):
        raise InputError(
            f"{field_name}: {LABEL_KEY!r} must be a 1-D array of integer class labels, got shape "
            f"{list(y.shape)} dtype {y.dtype}"
        )
    if not arrays:
        raise InputError(f"{field_name}: no input arrays besides the labels {LABEL_KEY!r}")
    n = None if y is None else y.shape[0]
    for name, a in arrays.items():
        count = a.shape[0] if a.ndim else 0
        n = count if n is None else n
        if count != n:
            raise InputError(
                f"{field_name}: array {name!r} has {count} samples but "
                + (f"{LABEL_KEY!r} has {y.shape[0]}" if y is not None else f"the other inputs have {n}")
            )
    return arrays, y


def fine_tune_signal(spec: PruneSpec, epochs: int, has_labels: bool) -> Signal:
    """What the fine-tune learns from: ``distill`` unset means distil when the data has no labels.

    Refuses (InputError, exit 2) a fine-tune that has neither labels nor a teacher to learn from."""
    if not epochs:
        return "none"
    distill = spec.distill if spec.distill is not None else not has_labels
    if not distill and not has_labels:
        raise InputError(
            f"train_data_uri: has no labels under {LABEL_KEY!r} and distill is false, so the fine-tune has "
            "nothing to learn from; add labels, or let the pruned model learn from the unpruned one "
            "(distill unset or true)"
        )
    if distill and has_labels:
        return "distillation+labels"
    return "distillation" if distill else "labels"


def record_signal(ctx: StepContext, spec: PruneSpec, signal: Signal) -> None:
    """Tag the run with the fine-tune's signal and say it in the log."""
    ctx.client.set_tag(ctx.run_id, SIGNAL_TAG, signal)
    if signal.startswith("distillation"):
        ctx.log.info("Fine-tune signal: %s (teacher: the unpruned model; temperature %s%s)", signal,
                     spec.distill_temperature,
                     f", alpha {spec.distill_alpha} on the distillation term" if signal.endswith("labels") else "")
    else:
        ctx.log.info("Fine-tune signal: %s", signal)


def size_of(path: Path) -> tuple[int, int]:
    """(bytes, gzip bytes) of a file or, for a folder, of all its files (each gzipped)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = packed = 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        packed += len(gzip.compress(data, compresslevel=6, mtime=0))
    return raw, packed


def ratio(after: float, before: float) -> float:
    return after / before if before else float("nan")


def reached(sparsity: float, sparsity_before: float, zeros: int, total: int,
            **pairs: tuple[float, float]) -> dict[str, float]:
    """The measured sparsity and every before/after pair (``<name>_before``, ``_after``, ``_ratio``)."""
    metrics: dict[str, float] = {"sparsity": sparsity, "sparsity_before": sparsity_before,
                                 "zero_weights": float(zeros), "prunable_weights": float(total)}
    for name, (before, after) in pairs.items():
        metrics[f"{name}_before"] = float(before)
        metrics[f"{name}_after"] = float(after)
        metrics[f"{name}_ratio"] = ratio(float(after), float(before))
    return metrics


def check_gate(spec: PruneSpec, metrics: dict[str, float]) -> None:
    if spec.max_accuracy_drop is not None and "accuracy_drop" not in metrics and "agreement_after" in metrics:
        # Without labels: 1 - agreement bounds the accuracy drop (only a changed prediction can lose one).
        if 1 - metrics["agreement_after"] > spec.max_accuracy_drop + 1e-12:
            raise GateFailed(
                f"max_accuracy_drop: eval_data_uri has no labels and the pruned model agrees with the unpruned one "
                f"on {metrics['agreement_after']:.4f} of its argmax predictions (1 - agreement "
                f"{1 - metrics['agreement_after']:.4f} > {spec.max_accuracy_drop}); prune less, fine-tune longer, "
                "ignore sensitive layers, or give labels"
            )
        return
    if spec.max_accuracy_drop is None or "accuracy_drop" not in metrics:
        return
    if metrics["accuracy_drop"] > spec.max_accuracy_drop + 1e-12:
        raise GateFailed(
            f"max_accuracy_drop: eval accuracy fell from {metrics['accuracy_before']:.4f} to "
            f"{metrics['accuracy_after']:.4f} (drop {metrics['accuracy_drop']:.4f} > {spec.max_accuracy_drop}); "
            "prune less, fine-tune longer, or ignore sensitive layers"
        )


def log_epoch_losses(ctx: StepContext, losses: list[float]) -> None:
    for epoch, loss in enumerate(losses):
        ctx.log_metrics({"fine_tune_epoch_loss": loss}, step=epoch)
