"""Step distill: train a smaller student on a teacher's logits (knowledge distillation).

1. Teacher: the model (.pt2 or MLflow pytorch) loaded through the prune step's loader
   (``prune.torch_model.load_source``: the runtimes layer, weights-only unless trusted) and rebuilt
   with real nn layers (``prune.fx_lifting.lift``).
2. Student: ``student='package.module:Name'`` (an nn.Module subclass importable in the image, built
   with ``student_kwargs``; any other factory callable only with the model-code opt-in), or a deep
   copy of the teacher narrowed to ``width_factor`` of its channels with torch-pruning's dependency
   graph (``prune.torch_prune.prune_structured``; the layers producing outputs keep theirs).
3. The teacher's logits on the training inputs are computed once; the student learns from
   ``prune.fine_tune.distillation_loss`` (temperature-scaled KL, mixed with cross-entropy on the
   labels by ``alpha``; the KL term alone without labels). Adam, cosine learning-rate schedule;
   after every epoch the eval accuracy is logged (``ctx.log_metrics(step=epoch)``) and the best
   epoch's weights are kept; ``early_stop_patience`` epochs without improvement stop training.
   Intermediate-feature matching is not implemented: logits only.
4. The student is exported with torch.export (dynamic batch) as ``model_pt2``, which torch_to_onnx
   takes; a training-curve PNG and a JSON history are logged beside it.

A narrowed student stays in inference mode while it trains; with ``batchnorm='update'`` its BatchNorm
layers train on batch statistics (``prune.fine_tune.set_train_mode``). A user architecture trains in
training mode and is exported in eval mode. With ``augment`` the student learns on mixup + noise
batches that the teacher (the lifted copy) labels on the fly (``prune.fine_tune``'s augmenter).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container import trust
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps.prune import common
from airflow_modelopt.container.steps.prune import fine_tune as ft
from airflow_modelopt.container.steps.prune import torch_model as tm
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError
from airflow_modelopt.specs.distill import DistillSpec


def signal(has_labels: bool, alpha: float) -> str:
    """What the student learns from: the teacher's logits, the labels, or both (weighted by alpha)."""
    if not has_labels or alpha == 1.0:
        return "distillation"
    return "labels" if alpha == 0.0 else "distillation+labels"


def build_student(spec: DistillSpec) -> Any:
    """The user's student architecture: ``package.module:Name`` called with ``student_kwargs``."""
    import torch

    assert spec.student is not None
    module_name, _, attr = spec.student.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"student: cannot import {module_name!r} in this image ({exc}); install the package in the torch "
            "image, or point image= at one that has it"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"student: module {module_name!r} has no attribute {attr!r}")
    is_module_class = inspect.isclass(factory) and issubclass(factory, torch.nn.Module)
    if not is_module_class and not trust.model_code_allowed():
        raise InputError(
            f"student: {spec.student} is not an nn.Module subclass; calling another factory runs whatever code the "
            f"spec names. Name the Module class, or set {trust.OPT_IN}"
        )
    if not callable(factory):
        raise InputError(f"student: {spec.student} is a {type(factory).__name__}, not callable")
    kwargs = spec.student_kwargs or {}
    try:
        student = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"student_kwargs: {spec.student}(**{kwargs}) failed: {exc}") from None
    if not isinstance(student, torch.nn.Module):
        raise InputError(f"student: {spec.student} returned a {type(student).__name__}, not a torch.nn.Module")
    return student


def narrowed_teacher(teacher: Any, feeds: dict[str, np.ndarray], names: list[str], spec: DistillSpec, log: Any) -> Any:
    """A copy of the (lifted) teacher with ``1 - width_factor`` of every layer's channels removed."""
    from airflow_modelopt.container.steps.prune.torch_prune import prune_structured

    student = copy.deepcopy(teacher)
    prune_structured(student, feeds, names, 1.0 - spec.effective_width, [], spec.round_to, log)
    tm.run_checked(student, feeds, names, "the narrowed student")
    return student


def train(student: Any, train_x: dict[str, np.ndarray], names: list[str], labels: np.ndarray | None,
          teacher_out: list[np.ndarray] | None, evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None,
          spec: DistillSpec, ctx: StepContext, train_mode: bool | str, teacher: Any = None) -> list[dict[str, float]]:
    """Adam with a cosine (or constant) learning rate on the distillation loss; per-epoch metrics,
    early stop on eval accuracy, best epoch's weights restored. Returns the per-epoch history.

    The teacher's outputs are ``teacher_out`` (computed once), or, with ``teacher`` (augmented
    batches), the teacher run on each batch. ``train_mode``: True/False for the whole student, or
    ``'update'``/``'frozen'`` (BatchNorm layers alone train, ``ft.set_train_mode``)."""
    import torch

    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(train_x[n])) for n in names]
    targets = [torch.from_numpy(np.ascontiguousarray(t)) for t in teacher_out] if teacher_out is not None else None
    augmenter = ft.Augmenter(tensors, gen, spec.seed) if teacher is not None else None
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=spec.learning_rate)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs) if spec.lr_schedule == "cosine"
                else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    n = len(tensors[0])
    history: list[dict[str, float]] = []
    best_acc, best_state, stale = -math.inf, None, 0
    for epoch in range(spec.epochs):
        if isinstance(train_mode, str):
            ft.set_train_mode(student, train_mode)
        else:
            student.train(train_mode)
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        lr = opt.param_groups[0]["lr"]
        for i in range(0, n, spec.batch_size):
            idx = perm[i: i + spec.batch_size]
            if len(idx) < 2 and i > 0 and (train_mode is True or train_mode == "update"):
                continue  # a last batch of one has no batch statistics (BatchNorm in train mode refuses it)
            batch = [t[idx] for t in tensors]
            lam = partner = None
            if augmenter is not None:
                batch, lam, partner = augmenter(batch)
                with torch.no_grad():
                    tb = ft._as_list(teacher(*batch))
            else:
                assert targets is not None
                tb = [t[idx] for t in targets]
            opt.zero_grad()
            out = ft._as_list(student(*batch))
            loss = ft.batch_loss(out, tb, None if y is None else y[idx], lam, partner,
                                 temperature=spec.temperature, alpha=spec.alpha)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        schedule.step()
        student.eval()
        row = {"train_loss": total / n, "learning_rate": lr}
        if evaluation is not None:
            row["eval_accuracy"] = ft.accuracy(student, evaluation[0], evaluation[1], names)
        history.append(row)
        ctx.log_metrics(row, step=epoch)
        ctx.log.info("epoch %d/%d: loss %.4f, lr %.2g%s", epoch + 1, spec.epochs, row["train_loss"], lr,
                     f", eval accuracy {row['eval_accuracy']:.4f}" if "eval_accuracy" in row else "")
        if evaluation is None:
            continue
        if row["eval_accuracy"] > best_acc:
            best_acc, stale = row["eval_accuracy"], 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            stale += 1
            if spec.early_stop_patience is not None and stale >= spec.early_stop_patience:
                ctx.log.info("Early stop: no better eval accuracy for %d epochs", stale)
                break
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return history


def export_student(student: Any, feeds: dict[str, np.ndarray], names: list[str], path: Path) -> Path:
    """torch.export of the trained student with a dynamic batch; saved as .pt2."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    try:
        program = torch.export.export(student, args, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in names))
    except Exception as exc:  # noqa: BLE001 - torch.export's message names the construct
        raise ConversionFailed(
            f"torch.export could not capture the student: {type(exc).__name__}: {str(exc).strip()[:1500]}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def plot_curve(history: list[dict[str, float]], path: Path, teacher_accuracy: float | None) -> Path:
    """Training loss and eval accuracy per epoch, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    if "eval_accuracy" in history[0]:
        acc = ax.twinx()
        acc.plot(epochs, [h["eval_accuracy"] for h in history], "s-", color="tab:green", label="student eval accuracy")
        if teacher_accuracy is not None:
            acc.axhline(teacher_accuracy, color="tab:gray", linestyle="--", label="teacher")
        acc.set_ylabel("eval accuracy", color="tab:green")
        acc.legend(loc="lower right")
    ax.set_title("distill: student training curve")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(spec: DistillSpec, ctx: StepContext) -> StepOutput:
    import torch

    from airflow_modelopt.container.steps.prune.fx_lifting import lift

    torch.manual_seed(spec.seed)
    train_data = common.load_data(ctx, "train_data_uri", labels_required=False)
    evaluation = common.load_data(ctx, "eval_data_uri", labels_required=True)
    assert train_data is not None
    path = ctx.input("model_uri")
    assert path is not None
    source = tm.load_source(path, spec.model_uri, train_data[0])
    names = source.input_names
    train_x = tm.model_arrays(train_data[0], names, "train_data_uri")
    eval_x = tm.model_arrays(evaluation[0], names, "eval_data_uri") if evaluation else None
    feeds = tm.example_feeds(source, train_x)
    ref = tm.source_outputs(source, feeds, "train_data_uri")
    if not ft.is_classifier(ref):
        raise InputError(f"model_uri: distillation on logits needs a classifier with one (batch, classes) output; "
                         f"the teacher gives {[list(r.shape) for r in ref]}")
    teacher = lift(source.module, feeds, names, ref)
    augment = spec.augment and ft.can_augment(train_x)
    if spec.augment and not augment:
        ctx.log.info("augment: skipped, the inputs are not all floating point (mixup/noise need floats)")
    teacher_out = None if augment else ft.teacher_outputs(source.module, train_x, names)
    teacher_acc = ft.accuracy(source.module, eval_x, evaluation[1], names) if evaluation else None

    if spec.student is not None:
        student, kind, train_mode = build_student(spec), "user", True
    else:
        student, kind, train_mode = (narrowed_teacher(teacher, feeds, names, spec, ctx.log), "narrowed_teacher",
                                     spec.batchnorm)
    try:
        got = ft.forward(student.eval(), feeds, names)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"student: {spec.student or 'the narrowed teacher'} does not take the teacher's inputs "
                         f"{ {n: list(a.shape) for n, a in feeds.items()} }: {str(exc)[:500]}") from None
    if [g.shape for g in got] != [r.shape for r in ref]:
        raise InputError(f"student: gives outputs {[list(g.shape) for g in got]} but the teacher "
                         f"{[list(r.shape) for r in ref]}; the student must end in the same logits")
    teacher_params, student_params = tm.count_params(teacher), tm.count_params(student)
    ctx.log.info("Teacher %d parameters, %s student %d parameters (%.3f); signal: %s", teacher_params, kind,
                 student_params, student_params / teacher_params,
                 signal(train_data[1] is not None, spec.alpha))

    started = time.monotonic()
    if augment:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    history = train(student, train_x, names, train_data[1], teacher_out,
                    (eval_x, evaluation[1]) if evaluation else None, spec, ctx, train_mode,
                    teacher=teacher if augment else None)
    train_time = time.monotonic() - started

    out_path = export_student(student, feeds, names, ctx.workdir / "model" / tm.PT2_NAME)
    metrics: dict[str, float] = {
        "teacher_params": float(teacher_params), "student_params": float(student_params),
        "param_ratio": student_params / teacher_params, "epochs_run": float(len(history)),
        "train_time_s": train_time, "final_train_loss": history[-1]["train_loss"],
    }
    if evaluation is not None:
        accs = [h["eval_accuracy"] for h in history]
        metrics.update({"teacher_accuracy": float(teacher_acc), "student_accuracy": ft.accuracy(student, eval_x,
                        evaluation[1], names), "best_epoch": float(int(np.argmax(accs)))})
        metrics["accuracy_drop"] = metrics["teacher_accuracy"] - metrics["student_accuracy"]
        if spec.max_accuracy_drop is not None and metrics["accuracy_drop"] > spec.max_accuracy_drop + 1e-12:
            raise GateFailed(
                f"max_accuracy_drop: the student's eval accuracy {metrics['student_accuracy']:.4f} is "
                f"{metrics['accuracy_drop']:.4f} below the teacher's {metrics['teacher_accuracy']:.4f} "
                f"(> {spec.max_accuracy_drop}); train longer, widen the student or raise the temperature"
            )
    ctx.log.info("Student: %s", {k: round(v, 4) for k, v in metrics.items()})
    curve = plot_curve(history, ctx.workdir / "curve" / "training_curve.png", teacher_acc)
    artifacts = {
        "model_pt2": ctx.log_artifact(out_path, "model"),
        "training_curve": ctx.log_artifact(curve, "distill"),
        "history": ctx.log_dict({"history": history, "student_kind": kind}, "distill/history.json"),
    }
    info = {"student_kind": kind, "student": spec.student, "width_factor": spec.effective_width if kind != "user"
            else None, "input_names": names, "format": "pt2", "feature_matching": False, "augment": augment,
            "batchnorm": spec.batchnorm if kind != "user" else "train",
            "signal": signal(train_data[1] is not None, spec.alpha)}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = ["build_student", "run"]
