"""Step prune: make a model sparse or smaller, and measure what was reached.

1. Tell the framework from the model itself (``framework='auto'``) and refuse options of the other
   framework, naming them (the spec already refused them when model_uri's suffix told).
2. Measure the source: weight sparsity, parameters, FLOPs, bytes and gzip bytes of the model
   saved in the output format, accuracy on the evaluation data.
3. Prune:
   - PyTorch (``_prune_torch``): the ExportedProgram is rebuilt with real nn layers, then either
     global L1 unstructured pruning (``torch.nn.utils.prune``; masks kept during the fine-tune,
     then made permanent) or structured channel pruning with torch-pruning's dependency graph;
     optional fine-tune; exported again as an ExportedProgram (.pt2) with a dynamic batch.
   - Keras (``_prune_keras``): TFMOT ``prune_low_magnitude`` with a PolynomialDecay schedule while
     fine-tuning, then ``strip_pruning``; saved in the source's format.
4. Measure the result the same way; ``sparsity`` is counted zeros over the prunable weights
   (Conv/Linear/Dense kernels), not the requested value. FLOPs follow the ptflops convention
   (one multiply-accumulate counts 1, plus bias and normalization ops) for one sample.
5. With ``max_accuracy_drop``, a larger drop fails the step (GateFailed) before anything is logged
   as its output.

The Keras path needs ``TF_USE_LEGACY_KERAS=1`` (TFMOT works on tf_keras, Keras 2): this module sets
it before tensorflow is first imported in the process.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import LABEL_KEY, load_npz
from airflow_modelopt.exceptions import GateFailed, InputError, StepFailed
from airflow_modelopt.specs.prune import (
    KERAS_SUFFIXES,
    TORCH_SUFFIXES,
    TORCHSCRIPT_SUFFIXES,
    Framework,
    PruneSpec,
    option_conflicts,
)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# -- what kind of model -----------------------------------------------------------------------


def _torchscript_error(uri: str, what: str = "TorchScript") -> InputError:
    return InputError(
        f"model_uri: {uri} is {what}, which the prune step does not support (no module structure or "
        "graph to prune); export the model with torch.export (.pt2) or log it as an MLflow pytorch model"
    )


def _mlflow_flavors(folder: Path) -> dict[str, Any]:
    import yaml

    try:
        return (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"model_uri: cannot read its MLmodel file: {exc}") from None


def detect_framework(path: Path, uri: str) -> Framework:
    """torch or keras, from the fetched model's files; TorchScript and unknown files are refused."""
    if path.is_dir():
        if (path / "MLmodel").is_file():
            flavors = _mlflow_flavors(path)
            if "pytorch" in flavors:
                return "torch"
            if "tensorflow" in flavors or "keras" in flavors:
                return "keras"
            raise InputError(
                f"model_uri: {uri} is an MLflow model with flavors {sorted(flavors)}; the prune step takes "
                "the pytorch, tensorflow or keras flavor"
            )
        if (path / "saved_model.pb").is_file() or (path / "keras_metadata.pb").is_file():
            return "keras"
        if list(path.rglob("*.pt2")):
            return "torch"
        if any(p.suffix.lower() in KERAS_SUFFIXES for p in path.rglob("*")):
            return "keras"
        raise InputError(
            f"model_uri: {uri} is a folder without a model the prune step knows (.pt2, .keras, .h5, "
            "SavedModel, or an MLflow pytorch/tensorflow model)"
        )
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCHSCRIPT_SUFFIXES:
        raise _torchscript_error(uri, "TorchScript or a torch.save checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == _HDF5_MAGIC:
        return "keras"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        base = {n.rsplit("/", 1)[-1] for n in names}
        if "archive_format" in base or any("/models/" in n for n in names):
            return "torch"
        if {"config.json", "metadata.json"} <= base:
            return "keras"
        if any("/code/" in n for n in names) or "constants.pkl" in base:
            raise _torchscript_error(uri)
        if "data.pkl" in base:
            raise _torchscript_error(uri, "a torch.save pickle")
    raise InputError(
        f"model_uri: {uri} is not a model the prune step knows: expected a torch.export ExportedProgram "
        "(.pt2), a Keras .keras/.h5 file or SavedModel folder, or an MLflow pytorch/tensorflow model"
    )


def resolve_framework(spec: PruneSpec, path: Path) -> Framework:
    found = detect_framework(path, spec.model_uri)
    if spec.framework != "auto" and spec.framework != found:
        raise InputError(f"framework: {spec.framework!r} was given but model_uri is a {found} model")
    problems = option_conflicts(spec, found)
    if problems:
        raise InputError("; ".join(problems))
    return found


# -- shared measurements ----------------------------------------------------------------------


def size_of(path: Path) -> tuple[int, int]:
    """(bytes, gzip bytes) of a file or, for a folder, of all its files (each gzipped)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = packed = 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        packed += len(gzip.compress(data, compresslevel=6, mtime=0))
    return raw, packed


def load_labeled(ctx: StepContext, field_name: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """(input arrays, labels) of a data artifact, or None when the field is not set."""
    path = ctx.input(field_name)
    if path is None:
        return None
    arrays = load_npz(path, field=field_name)
    if LABEL_KEY not in arrays:
        raise InputError(
            f"{field_name}: labels are needed under {LABEL_KEY!r} (found arrays {sorted(arrays)}); "
            "accuracy and fine-tuning compare the model's argmax with them"
        )
    y = arrays.pop(LABEL_KEY)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(
            f"{field_name}: {LABEL_KEY!r} must be a 1-D array of integer class labels, got shape "
            f"{list(y.shape)} dtype {y.dtype}"
        )
    if not arrays:
        raise InputError(f"{field_name}: no input arrays besides the labels {LABEL_KEY!r}")
    for name, a in arrays.items():
        if a.ndim == 0 or a.shape[0] != y.shape[0]:
            raise InputError(
                f"{field_name}: array {name!r} has {a.shape[0] if a.ndim else 0} samples but {LABEL_KEY!r} "
                f"has {y.shape[0]}"
            )
    return arrays, y


def ratio(after: float, before: float) -> float:
    return after / before if before else float("nan")


def check_gate(spec: PruneSpec, metrics: dict[str, float]) -> None:
    if spec.max_accuracy_drop is None or "accuracy_drop" not in metrics:
        return
    if metrics["accuracy_drop"] > spec.max_accuracy_drop + 1e-12:
        raise GateFailed(
            f"max_accuracy_drop: eval accuracy fell from {metrics['accuracy_before']:.4f} to "
            f"{metrics['accuracy_after']:.4f} (drop {metrics['accuracy_drop']:.4f} > {spec.max_accuracy_drop}); "
            "prune less, fine-tune longer, or ignore sensitive layers"
        )


def _reached(sparsity: float, sparsity_before: float, zeros: int, total: int,
             **pairs: tuple[float, float]) -> dict[str, float]:
    """The measured sparsity and every before/after pair (``<name>_before``, ``_after``, ``_ratio``)."""
    metrics: dict[str, float] = {"sparsity": sparsity, "sparsity_before": sparsity_before,
                                 "zero_weights": float(zeros), "prunable_weights": float(total)}
    for name, (before, after) in pairs.items():
        _before_after(metrics, name, before, after)
    return metrics


def _before_after(metrics: dict[str, float], name: str, before: float, after: float) -> None:
    metrics[f"{name}_before"] = float(before)
    metrics[f"{name}_after"] = float(after)
    metrics[f"{name}_ratio"] = ratio(float(after), float(before))


# -- PyTorch ----------------------------------------------------------------------------------


def run_torch(spec: PruneSpec, ctx: StepContext, path: Path) -> StepOutput:
    import torch

    from airflow_modelopt.container.steps import _prune_torch as pt

    torch.manual_seed(spec.seed)
    train = load_labeled(ctx, "train_data_uri")
    evaluation = load_labeled(ctx, "eval_data_uri")
    any_data = train[0] if train else (evaluation[0] if evaluation else None)
    source = pt.load_source(path, spec.model_uri, any_data)
    names = source.input_names
    train_x = pt.model_arrays(train[0], names, "train_data_uri") if train else None
    eval_x = pt.model_arrays(evaluation[0], names, "eval_data_uri") if evaluation else None
    feeds = pt.example_feeds(source, train_x if train_x is not None else eval_x)
    ctx.log.info("Loaded %s with inputs %s", source.kind, {n: list(a.shape[1:]) for n, a in feeds.items()})

    feeds_field = "train_data_uri" if train_x is not None else "eval_data_uri" if eval_x is not None else "model_uri"
    ref = pt.source_outputs(source, feeds, feeds_field)
    started = time.monotonic()
    model = pt.lift(source, feeds, ref)
    ignored = pt.check_ignored(model, spec.ignored_layers)
    out_dir = ctx.workdir / "out"
    before_path = pt.export_pt2(model, feeds, source, ctx.workdir / "before" / pt.PT2_NAME)
    bytes_before, gzip_before = size_of(before_path)
    sparsity_before, _, _ = pt.weight_sparsity(model)
    params_before, flops_before = pt.count_params(model), pt.count_flops(model, feeds, names)
    shapes_before = pt.channel_counts(model)
    acc_before = pt.accuracy(model, eval_x, evaluation[1], names) if evaluation else None
    ctx.log.info("Before: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_before, flops_before, bytes_before, gzip_before, sparsity_before, acc_before)

    kept: list[str] = []
    masks: list[Any] = []
    if spec.method == "unstructured":
        masks = pt.prune_unstructured(model, spec.sparsity, ignored)
    else:
        kept = pt.prune_structured(model, feeds, names, spec.sparsity, ignored, spec.round_to, ctx.log)
        pt.run_checked(model, feeds, names, "the structurally pruned model")
    prune_time = time.monotonic() - started

    epochs = spec.epochs_for("torch")
    losses: list[float] = []
    tune_started = time.monotonic()
    if epochs:
        assert train is not None and train_x is not None
        acc_pruned = pt.accuracy(model, eval_x, evaluation[1], names) if evaluation else None
        ctx.log.info("Accuracy right after pruning: %s; fine-tuning %d epochs", acc_pruned, epochs)
        losses = pt.fine_tune(model, train_x, train[1], names, epochs=epochs, lr=spec.learning_rate,
                              batch_size=spec.batch_size, seed=spec.seed, log=ctx.log)
    tune_time = time.monotonic() - tune_started
    if masks:
        pt.make_permanent(masks)
    model.eval()

    out_path = pt.export_pt2(model, feeds, source, out_dir / pt.PT2_NAME)
    bytes_after, gzip_after = size_of(out_path)
    sparsity, zeros, total = pt.weight_sparsity(model)
    params_after, flops_after = pt.count_params(model), pt.count_flops(model, feeds, names)
    shapes_after = pt.channel_counts(model)
    metrics = _reached(sparsity, sparsity_before, zeros, total,
                       params=(params_before, params_after), flops=(flops_before, flops_after),
                       bytes=(bytes_before, bytes_after), gzip_bytes=(gzip_before, gzip_after))
    if spec.method == "structured":
        pruned_layers = [n for n in shapes_before if n not in kept]
        ch_before = sum(shapes_before[n][0] for n in pruned_layers)
        ch_after = sum(shapes_after[n][0] for n in pruned_layers)
        metrics["channel_sparsity"] = 1 - ratio(ch_after, ch_before)
    if evaluation:
        metrics["accuracy_before"] = float(acc_before)
        metrics["accuracy_after"] = pt.accuracy(model, eval_x, evaluation[1], names)
        metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy_after"]
        if epochs:
            metrics["accuracy_pruned_before_fine_tune"] = float(acc_pruned)
    metrics.update({"prune_time_s": prune_time, "fine_tune_epochs": float(epochs), "fine_tune_time_s": tune_time})
    if losses:
        metrics["fine_tune_loss"] = losses[-1]
    ctx.log.info("After: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_after, flops_after, bytes_after, gzip_after, sparsity, metrics.get("accuracy_after"))
    check_gate(spec, metrics)

    layers = {
        name: {"shape_before": shapes_before[name], "shape_after": shapes_after.get(name),
               "sparsity": _layer_sparsity(model, name)}
        for name in shapes_before
    }
    report = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
              "kept_layers": kept, "ignored_layers": ignored, "layers": layers, "fine_tune_losses": losses}
    for epoch, loss in enumerate(losses):
        ctx.client.log_metric(ctx.run_id, "fine_tune_epoch_loss", loss, step=epoch)
    artifacts = {
        "model_pt2": ctx.log_artifact(out_path, "model"),
        "prune_report": ctx.log_dict(report, "prune_report.json"),
    }
    info = {"framework": "torch", "method": spec.method, "source_kind": source.kind, "input_names": names,
            "format": "pt2", "kept_layers": kept}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


def _layer_sparsity(model: Any, name: str) -> float | None:
    from airflow_modelopt.container.steps import _prune_torch as pt

    m = pt.prunable_modules(model).get(name)
    if m is None:
        return None
    w = m.weight.detach()
    return float((w == 0).sum()) / w.numel()


# -- Keras ------------------------------------------------------------------------------------


def use_legacy_keras() -> None:
    """TFMOT needs tf_keras (Keras 2): TF_USE_LEGACY_KERAS must be set before tensorflow is imported."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        version = getattr(getattr(tf, "keras", None), "__version__", "") or ""
        if version and not version.startswith("2."):
            raise StepFailed(
                f"tensorflow was imported with Keras {version} before TF_USE_LEGACY_KERAS=1 could be set; "
                "TFMOT pruning needs tf_keras (Keras 2): start the step in a fresh process"
            )


def run_keras(spec: PruneSpec, ctx: StepContext, path: Path) -> StepOutput:
    use_legacy_keras()
    from airflow_modelopt.container.steps import _prune_keras as pk

    train = load_labeled(ctx, "train_data_uri")
    evaluation = load_labeled(ctx, "eval_data_uri")
    assert train is not None  # option_conflicts refused a Keras model without training data
    pk.set_seed(spec.seed)
    model, fmt = pk.load(path, spec.model_uri)
    names = pk.input_names(model)
    train_x = pk.model_arrays(model, train[0], names, "train_data_uri")
    eval_x = pk.model_arrays(model, evaluation[0], names, "eval_data_uri") if evaluation else None
    ignored = pk.check_ignored(model, spec.ignored_layers)
    ctx.log.info("Loaded Keras model (%s) with inputs %s", fmt, {n: list(a.shape[1:]) for n, a in train_x.items()})

    before_path = pk.save(model, fmt, ctx.workdir / "before")
    bytes_before, gzip_before = size_of(before_path)
    sparsity_before = pk.weight_sparsity(model, pk.prunable_layer_names(model, ignored))[0]
    params_before, flops_before = model.count_params(), pk.count_flops(model)
    acc_before = pk.accuracy(model, eval_x, evaluation[1], names) if evaluation else None
    ctx.log.info("Before: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), accuracy %s",
                 params_before, flops_before, bytes_before, gzip_before, acc_before)

    epochs = spec.epochs_for("keras")
    n = len(train[1])
    schedule = pk.schedule_for(spec, epochs=epochs, samples=n)
    ctx.log.info("PolynomialDecay %s over %d steps", schedule, schedule["total_steps"])
    if schedule["last_update_step"] != schedule["end_step"]:
        ctx.log.warning(
            "The last pruning update is at step %d, before end_step %d ((end_step - begin_step) is not a multiple "
            "of frequency %d): the final sparsity %.3f is not applied; the measured sparsity will say what was",
            schedule["last_update_step"], schedule["end_step"], schedule["frequency"], spec.sparsity)
    started = time.monotonic()
    wrapped, pruned_names = pk.wrap(model, schedule, ignored)
    losses = pk.fine_tune(wrapped, train_x, train[1], names, epochs=epochs, lr=spec.learning_rate,
                          batch_size=spec.batch_size, log=ctx.log)
    stripped = pk.strip(wrapped)
    tune_time = time.monotonic() - started

    out_path = pk.save(stripped, fmt, ctx.workdir / "out")
    bytes_after, gzip_after = size_of(out_path)
    sparsity, zeros, total, per_layer = pk.weight_sparsity(stripped, pruned_names)
    params_after, flops_after = stripped.count_params(), pk.count_flops(stripped)
    metrics = _reached(sparsity, sparsity_before, zeros, total,
                       params=(params_before, params_after), flops=(flops_before, flops_after),
                       bytes=(bytes_before, bytes_after), gzip_bytes=(gzip_before, gzip_after))
    if evaluation:
        metrics["accuracy_before"] = float(acc_before)
        metrics["accuracy_after"] = pk.accuracy(stripped, eval_x, evaluation[1], names)
        metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy_after"]
    metrics.update({"fine_tune_epochs": float(epochs), "fine_tune_time_s": tune_time,
                    "pruning_end_step": float(schedule["end_step"])})
    if losses:
        metrics["fine_tune_loss"] = losses[-1]
    ctx.log.info("After: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_after, flops_after, bytes_after, gzip_after, sparsity, metrics.get("accuracy_after"))
    check_gate(spec, metrics)

    report = {"framework": "keras", "method": "unstructured", "format": fmt, "input_names": names,
              "schedule": schedule, "pruned_layers": pruned_names, "ignored_layers": ignored,
              "layers": per_layer, "fine_tune_losses": losses}
    for epoch, loss in enumerate(losses):
        ctx.client.log_metric(ctx.run_id, "fine_tune_epoch_loss", loss, step=epoch)
    # A SavedModel is a folder: logged as model/<its name>, like a file is logged as model/<file name>.
    model_uri = ctx.log_artifact(out_path, f"model/{out_path.name}" if out_path.is_dir() else "model")
    artifacts = {"keras_model": model_uri, "prune_report": ctx.log_dict(report, "prune_report.json")}
    info = {"framework": "keras", "method": "unstructured", "format": fmt, "input_names": names,
            "schedule": json.loads(json.dumps(schedule))}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


# -- the step ---------------------------------------------------------------------------------


#: What each path imports, and the image family that has it.
_NEEDS = {"torch": (("torch", "torch_pruning"), "torch"),
          "keras": (("tensorflow", "tf_keras", "tensorflow_model_optimization"), "tensorflow")}


def require_framework(framework: Framework) -> None:
    """Fail clearly (not retried) when this image lacks the framework the model needs."""
    import importlib.util

    modules, family = _NEEDS[framework]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        hint = "framework='keras' (or image=...)" if framework == "keras" else "framework='torch' (or image=...)"
        raise InputError(
            f"model_uri: a {'Keras' if framework == 'keras' else 'PyTorch'} model, but this environment lacks "
            f"{', '.join(missing)}: run the prune step in the {family} image; PruneOperator picks it with {hint}"
        )


def run(spec: PruneSpec, ctx: StepContext) -> StepOutput:
    path = ctx.input("model_uri")
    assert path is not None
    framework = resolve_framework(spec, path)
    require_framework(framework)
    ctx.log.info("Pruning a %s model: %s, sparsity %s", framework, spec.method, spec.sparsity)
    if framework == "keras":
        return run_keras(spec, ctx, path)
    return run_torch(spec, ctx, path)


__all__ = ["detect_framework", "run", "size_of"]
