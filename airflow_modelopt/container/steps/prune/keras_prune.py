"""Keras side of the prune step: TFMOT magnitude pruning with a PolynomialDecay schedule.

TFMOT wraps tf_keras (Keras 2) layers: :func:`run_keras` first sets ``TF_USE_LEGACY_KERAS=1``
(:func:`use_legacy_keras`), then models load with ``tf_keras``; a model saved by Keras 3 is refused
with a message saying so. (The runtimes layer's Keras loader may pick Keras 3, and loads a
SavedModel as a TF function, not a Keras model, so this path loads with tf_keras itself; the
runtimes layer finds the model inside a folder.) Layers of the top-level model that TFMOT can
prune (Dense, Conv1D/2D/3D, Conv2DTranspose, SeparableConv's pointwise kernel, Embedding, RNNs,
attention) are wrapped with ``prune_low_magnitude``; layers of nested sub-models are left as they
are. Pruning happens while the model trains (UpdatePruningStep), so a Keras model needs training
data, with labels (distillation is PyTorch-only).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import as_model_dtype, match_inputs
from airflow_modelopt.container.steps.prune import common
from airflow_modelopt.container.steps.prune.keras_flops import count_flops
from airflow_modelopt.exceptions import InputError, StepFailed
from airflow_modelopt.specs.prune import PruneSpec

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


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


def _keras() -> Any:
    import tf_keras

    return tf_keras


def set_seed(seed: int) -> None:
    _keras().utils.set_random_seed(seed)


# -- loading and saving -----------------------------------------------------------------------


def load(path: Path, uri: str) -> tuple[Any, str]:
    """(tf_keras model, format: keras | h5 | savedmodel) of a file, SavedModel or MLflow model folder."""
    from airflow_modelopt.container.runtimes import detect

    keras = _keras()
    fmt_from_mlflow = path.is_dir() and (path / "MLmodel").is_file()
    if path.is_dir():
        kind, path, _ = detect(path, field="model_uri")
        if kind not in ("keras", "savedmodel"):
            raise InputError(f"model_uri: {uri} holds a {kind} model, not a Keras model")
        fmt = "savedmodel" if kind == "savedmodel" else "keras" if path.suffix.lower() == ".keras" else "h5"
    else:
        suffix = path.suffix.lower()
        if suffix == ".keras":
            fmt = "keras"
        elif suffix in (".h5", ".hdf5"):
            fmt = "h5"
        else:  # a file without a telling suffix: tf_keras picks its loader by suffix, so add one
            with open(path, "rb") as fh:
                fmt = "h5" if fh.read(8) == _HDF5_MAGIC else "keras" if zipfile.is_zipfile(path) else ""
            if not fmt:
                raise InputError(f"model_uri: {uri} is neither a .keras archive nor an HDF5 (.h5) Keras file")
            named = path.with_name(path.name + (".keras" if fmt == "keras" else ".h5"))
            shutil.copyfile(path, named)
            path = named
            path = named
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        raise InputError(
            f"model_uri: {uri} does not load as a tf_keras (Keras 2) model, which TFMOT pruning needs: "
            f"{type(exc).__name__}: {first}. A model saved by Keras 3 must be saved again with tf_keras "
            "(or as .h5); a SavedModel must have been saved from a Keras model"
        ) from None
    if not isinstance(model, keras.Model):
        raise InputError(f"model_uri: {uri} is a TensorFlow SavedModel but not a Keras model; pruning needs Keras")
    return model, ("keras" if fmt_from_mlflow and fmt == "savedmodel" else fmt)


def save(model: Any, fmt: str, folder: Path) -> Path:
    """Save in the given format under ``folder``; return the file (or SavedModel folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "savedmodel":
        path = folder / "saved_model"
        model.save(str(path), save_format="tf", include_optimizer=False)
        return path
    if fmt == "h5":
        path = folder / "model.h5"
        model.save(str(path), include_optimizer=False)
        return path
    path = folder / "model.keras"  # the native format has no include_optimizer; the model is uncompiled
    model.save(str(path))
    return path


# -- inputs -----------------------------------------------------------------------------------


def input_names(model: Any) -> list[str]:
    names = getattr(model, "input_names", None)
    if names:
        return list(names)
    return [t.name.split(":")[0] for t in model.inputs]


def model_arrays(model: Any, arrays: dict[str, np.ndarray], names: list[str], field_name: str) -> dict[str, np.ndarray]:
    """The data's arrays per model input, checked against the model's input shapes."""
    matched = {k: as_model_dtype(v) for k, v in match_inputs(arrays, names, field=field_name).items()}
    for name, tensor in zip(names, model.inputs):
        expected = list(tensor.shape[1:])
        got = list(matched[name].shape[1:])
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise InputError(
                f"{field_name}: samples for input {name!r} have shape {got} but the Keras model expects "
                f"{[e if e is not None else 'any' for e in expected]} (Keras image models are usually "
                "channels-last, NHWC)"
            )
    return matched


def _feed(x: dict[str, np.ndarray], names: list[str]) -> Any:
    return x[names[0]] if len(names) == 1 else [x[n] for n in names]


# -- which layers -----------------------------------------------------------------------------


def _registry() -> Any:
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    return PruneRegistry


def is_prunable(layer: Any) -> bool:
    """Whether TFMOT prunes some of this layer's weights."""
    import tensorflow_model_optimization as tfmot

    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer):
        return True
    registry = _registry()
    if not registry.supports(layer):
        return False
    if registry._is_rnn_layer(layer) or registry._is_mha_layer(layer):
        return True
    return bool(registry._weight_names(layer))


def prunable_weights(layer: Any) -> list[Any]:
    import tensorflow_model_optimization as tfmot

    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer):
        return list(layer.get_prunable_weights())
    registry = _registry()
    if registry._is_rnn_layer(layer) or registry._is_mha_layer(layer):
        return list(registry.make_prunable(layer).get_prunable_weights())
    return [getattr(layer, name) for name in registry._weight_names(layer)]


def prunable_layer_names(model: Any, ignored: list[str]) -> list[str]:
    return [layer.name for layer in model.layers if layer.name not in ignored and is_prunable(layer)]


def check_ignored(model: Any, ignored: list[str] | None) -> list[str]:
    names = [layer.name for layer in model.layers]
    unknown = [n for n in ignored or [] if n not in names]
    if unknown:
        prunable = [layer.name for layer in model.layers if is_prunable(layer)]
        raise InputError(f"ignored_layers: {unknown} are not layers of this Keras model; its prunable layers are {prunable}")
    return list(ignored or [])


def weight_sparsity(model: Any, names: list[str]) -> tuple[float, int, int, dict[str, float]]:
    """(zeros / total, zeros, total, per-layer sparsity) over the prunable weights of ``names``."""
    zeros = total = 0
    per_layer: dict[str, float] = {}
    for name in names:
        layer_zeros = layer_total = 0
        for w in prunable_weights(model.get_layer(name)):
            values = np.asarray(w.numpy())
            layer_zeros += int((values == 0).sum())
            layer_total += values.size
        per_layer[name] = layer_zeros / layer_total if layer_total else 0.0
        zeros, total = zeros + layer_zeros, total + layer_total
    return (zeros / total if total else 0.0), zeros, total, per_layer


# -- pruning ----------------------------------------------------------------------------------


def schedule_for(spec: Any, *, epochs: int, samples: int) -> dict[str, Any]:
    """The PolynomialDecay schedule in training steps, checked against the fine-tune's length."""
    steps_per_epoch = math.ceil(samples / spec.batch_size)
    total = epochs * steps_per_epoch
    where = (f"the fine-tune runs {total} steps (fine_tune_epochs={epochs} x ceil({samples} samples / "
             f"batch_size {spec.batch_size})), numbered 0 to {total - 1}")
    begin = spec.begin_step or 0
    if begin >= total - 1:
        if spec.begin_step is None:
            raise InputError(f"fine_tune_epochs: too short for a pruning schedule (at least 2 steps needed): {where}")
        raise InputError(f"begin_step: {begin} leaves no training step to prune in: {where}")
    if spec.end_step is not None:
        end = spec.end_step
        if end > total - 1:
            raise InputError(f"end_step: {end} is never reached, so the final sparsity would not be: {where}")
        frequency = spec.frequency or max(1, (end - begin) // 10)
        if frequency > end - begin:
            raise InputError(
                f"frequency: {frequency} steps between pruning updates is longer than the schedule from "
                f"begin_step {begin} to end_step {end}: the final sparsity would never be applied"
            )
    else:
        target = max(begin + 1, int(round(0.7 * (total - 1))))
        frequency = spec.frequency or max(1, (target - begin) // 10)
        if frequency > total - 1 - begin:
            raise InputError(f"frequency: {frequency} steps between pruning updates is longer than the schedule: {where}")
        end = begin + frequency * max(1, (target - begin) // frequency)
    last_update = begin + frequency * ((end - begin) // frequency)
    return {
        "initial_sparsity": spec.initial_sparsity or 0.0, "final_sparsity": spec.sparsity,
        "begin_step": begin, "end_step": end, "frequency": frequency, "last_update_step": last_update,
        "total_steps": total, "steps_per_epoch": steps_per_epoch,
    }


def wrap(model: Any, schedule: dict[str, Any], ignored: list[str]) -> tuple[Any, list[str]]:
    """The model with every prunable layer (not ignored) wrapped in prune_low_magnitude."""
    import tensorflow_model_optimization as tfmot

    keras = _keras()
    decay = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=schedule["initial_sparsity"], final_sparsity=schedule["final_sparsity"],
        begin_step=schedule["begin_step"], end_step=schedule["end_step"], frequency=schedule["frequency"],
    )
    names = prunable_layer_names(model, ignored)
    if not names:
        raise InputError(
            "ignored_layers: no prunable layer is left (TFMOT prunes Dense, Conv, Embedding, RNN and attention "
            f"kernels; this model's layers are {[layer.name for layer in model.layers]})"
        )

    def clone(layer: Any) -> Any:  # the same layer objects: their trained weights are kept
        if layer.name in names:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=decay)
        return layer

    try:
        wrapped = keras.models.clone_model(model, clone_function=clone)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"model_uri: the Keras model cannot be rebuilt with pruning wrappers (only Sequential and "
            f"Functional models can): {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None
    return wrapped, names


def outputs_probabilities(model: Any, sample: Any) -> bool:
    """Whether the model outputs probabilities (softmax) rather than logits, from a real batch."""
    p = np.asarray(model(sample, training=False))
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=-1), 1.0, atol=1e-3))


def fine_tune(model: Any, x: dict[str, np.ndarray], y: np.ndarray, names: list[str], *, epochs: int, lr: float,
              batch_size: int, log: Any) -> list[float]:
    """Adam on sparse cross-entropy with UpdatePruningStep: the schedule prunes as the model trains."""
    import tensorflow_model_optimization as tfmot

    keras = _keras()
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise InputError(
            "train_data_uri: fine-tuning needs a classifier with one (batch, classes) output; this model has "
            f"outputs {[list(o.shape) for o in model.outputs]}"
        )
    feed = _feed(x, names)
    sample = [a[:64] for a in feed] if isinstance(feed, list) else feed[:64]
    probabilities = outputs_probabilities(model, sample)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
    progress = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: log.info("fine-tune epoch %d/%d loss %.4f", epoch + 1, epochs,
                                                  (logs or {}).get("loss", float("nan"))))
    history = model.fit(feed, y.astype(np.int64), epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                        callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), progress])
    return [float(v) for v in history.history.get("loss", [])]


def strip(model: Any) -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)


def accuracy(model: Any, x: dict[str, np.ndarray], y: np.ndarray, names: list[str]) -> float:
    out = model.predict(_feed(x, names), batch_size=512, verbose=0)
    if isinstance(out, (list, tuple)):
        out = out[0]
    out = np.asarray(out)
    if out.ndim != 2:
        raise InputError(f"eval_data_uri: accuracy needs a (batch, classes) output; the model gives {list(out.shape)}")
    return float((out.argmax(axis=1) == y).mean())


# -- the Keras path ---------------------------------------------------------------------------


def run_keras(spec: PruneSpec, ctx: StepContext, path: Path) -> StepOutput:
    use_legacy_keras()
    train = common.load_data(ctx, "train_data_uri", labels_required=False)
    evaluation = common.load_data(ctx, "eval_data_uri", labels_required=True)
    assert train is not None  # option_conflicts refused a Keras model without training data
    epochs = spec.epochs_for("keras")
    signal = common.fine_tune_signal(spec, epochs, has_labels=train[1] is not None)
    if signal != "labels":
        raise InputError(
            "train_data_uri: Keras pruning (prune_low_magnitude) fine-tunes on labels under 'y' only; "
            "distillation from the unpruned model is PyTorch-only"
            + (": give labelled training data" if train[1] is None else ": leave distill unset or false")
        )
    y = train[1]
    set_seed(spec.seed)
    model, fmt = load(path, spec.model_uri)
    names = input_names(model)
    train_x = model_arrays(model, train[0], names, "train_data_uri")
    eval_x = model_arrays(model, evaluation[0], names, "eval_data_uri") if evaluation else None
    ignored = check_ignored(model, spec.ignored_layers)
    ctx.log.info("Loaded Keras model (%s) with inputs %s", fmt, {n: list(a.shape[1:]) for n, a in train_x.items()})

    before_path = save(model, fmt, ctx.workdir / "before")
    bytes_before, gzip_before = common.size_of(before_path)
    sparsity_before = weight_sparsity(model, prunable_layer_names(model, ignored))[0]
    params_before, flops_before = model.count_params(), count_flops(model)
    acc_before = accuracy(model, eval_x, evaluation[1], names) if evaluation else None
    ctx.log.info("Before: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), accuracy %s",
                 params_before, flops_before, bytes_before, gzip_before, acc_before)

    schedule = schedule_for(spec, epochs=epochs, samples=len(y))
    ctx.log.info("PolynomialDecay %s over %d steps", schedule, schedule["total_steps"])
    if schedule["last_update_step"] != schedule["end_step"]:
        ctx.log.warning(
            "The last pruning update is at step %d, before end_step %d ((end_step - begin_step) is not a multiple "
            "of frequency %d): the final sparsity %.3f is not applied; the measured sparsity will say what was",
            schedule["last_update_step"], schedule["end_step"], schedule["frequency"], spec.sparsity)
    common.record_signal(ctx, spec, signal)
    started = time.monotonic()
    wrapped, pruned_names = wrap(model, schedule, ignored)
    losses = fine_tune(wrapped, train_x, y, names, epochs=epochs, lr=spec.learning_rate,
                       batch_size=spec.batch_size, log=ctx.log)
    stripped = strip(wrapped)
    tune_time = time.monotonic() - started

    out_path = save(stripped, fmt, ctx.workdir / "out")
    bytes_after, gzip_after = common.size_of(out_path)
    sparsity, zeros, total, per_layer = weight_sparsity(stripped, pruned_names)
    params_after, flops_after = stripped.count_params(), count_flops(stripped)
    metrics = common.reached(sparsity, sparsity_before, zeros, total,
                             params=(params_before, params_after), flops=(flops_before, flops_after),
                             bytes=(bytes_before, bytes_after), gzip_bytes=(gzip_before, gzip_after))
    if evaluation:
        metrics["accuracy_before"] = float(acc_before)
        metrics["accuracy_after"] = accuracy(stripped, eval_x, evaluation[1], names)
        metrics["accuracy_drop"] = metrics["accuracy_before"] - metrics["accuracy_after"]
    metrics.update({"fine_tune_epochs": float(epochs), "fine_tune_time_s": tune_time,
                    "pruning_end_step": float(schedule["end_step"])})
    if losses:
        metrics["fine_tune_loss"] = losses[-1]
    ctx.log.info("After: %d parameters, %.0f FLOPs, %d bytes (%d gzipped), sparsity %.4f, accuracy %s",
                 params_after, flops_after, bytes_after, gzip_after, sparsity, metrics.get("accuracy_after"))
    common.check_gate(spec, metrics)

    report = {"framework": "keras", "method": "unstructured", "format": fmt, "input_names": names,
              "schedule": schedule, "pruned_layers": pruned_names, "ignored_layers": ignored,
              "layers": per_layer, "fine_tune_signal": signal, "fine_tune_losses": losses}
    common.log_epoch_losses(ctx, losses)
    # A SavedModel is a folder: logged as model/<its name>, like a file is logged as model/<file name>.
    model_uri = ctx.log_artifact(out_path, f"model/{out_path.name}" if out_path.is_dir() else "model")
    artifacts = {"keras_model": model_uri, "prune_report": ctx.log_dict(report, "prune_report.json")}
    info = {"framework": "keras", "method": "unstructured", "format": fmt, "input_names": names,
            "schedule": json.loads(json.dumps(schedule)), "fine_tune_signal": signal}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)
