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
   Optional intermediate-feature matching (``feature_layers``, ``feature_weight`` > 0; FitNets-style
   hints): the layers are module paths of the original model, found in the graph through the
   ``nn_module_stack`` metadata torch.export keeps (``ExportedProgram.module()`` is flat, so forward
   hooks by name cannot work on it); ``"auto"`` takes the outputs of the teacher's top-level blocks
   (:func:`auto_layers`). A copy of each graph returns those nodes' values besides the logits
   (:class:`GraphTap`, sharing the modules); a user student's modules are hooked by name
   (:class:`HookTap`). Loss added: ``feature_weight`` x mean over layers of MSE / mean square of the
   teacher's feature. A student feature with fewer channels (the narrowed teacher's) goes through a
   1x1 projection, initialised to the least-squares fit and trained with the student, then dropped;
   any other shape difference is an InputError for a named layer and a log line for ``"auto"``. The
   matched layers are logged as the param ``feature_layers_matched``, the loss per epoch as
   ``feature_loss``.
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
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError, StepFailed
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


# -- intermediate-feature matching (FitNets-style hints) ------------------------------------------

#: Teacher features of the whole training set are computed once when they fit in this many bytes;
#: beyond it the teacher runs on every batch.
FEATURE_CACHE_BYTES = 1 << 30
#: Samples of the training set the per-layer loss scale (mean square of the teacher's feature) is measured on.
SCALE_SAMPLES = 256
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def layer_outputs(gm: Any) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """For every module path recorded in a torch.export graph's ``nn_module_stack`` metadata (the
    original model's module names, kept by ``ExportedProgram.module()``, the lifting and the
    narrowing): the nodes of that module whose values are used outside it (its outputs), in graph
    order, and the module's qualified class name."""
    members: dict[str, list[Any]] = {}
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                members.setdefault(path, []).append(node)
                kinds[path] = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    outputs = {}
    for path, nodes in members.items():
        inside = set(nodes)
        outputs[path] = [n for n in nodes if any(u not in inside for u in n.users)]
    return outputs, kinds


def _is_container(kind: str) -> bool:
    return kind.rsplit(".", 1)[-1] in _CONTAINERS


def auto_layers(gm: Any) -> list[str]:
    """``feature_layers='auto'``: the outputs of the teacher's top-level blocks. Those are its
    top-level modules, except that a container (Sequential, ModuleList, ModuleDict) of blocks (its
    own classes or containers, e.g. a ResNet stage's BasicBlocks) stands for its children; a
    container of plain torch.nn layers is one block. Kept: blocks that hold parameters and have one
    output that is not a model output (the logits are matched by the distillation loss already).
    In graph order."""
    outputs, kinds = layer_outputs(gm)
    params = {name for name, m in gm.named_modules() if name and any(True for _ in m.parameters())}

    def children(parent: str) -> list[str]:
        return [p for p in outputs if p.rpartition(".")[0] == parent]

    def of_blocks(container: str) -> bool:
        return any(_is_container(kinds[c]) or not kinds[c].startswith("torch.nn.") for c in children(container))

    blocks = []
    for path in children(""):
        blocks += children(path) if _is_container(kinds[path]) and of_blocks(path) else [path]
    return [b for b in blocks if b in params and len(outputs[b]) == 1
            and not any(u.op == "output" for u in outputs[b][0].users)]


def _projection(dim: int, student: Any, teacher: Any) -> Any:
    """A learned linear map of the student's feature along ``dim`` (the channels) to the teacher's
    width: a 1x1 convolution on (N, C, H, W) features, a linear layer on (N, C). It starts at the
    least-squares fit of the teacher's features ``teacher`` from the untrained student's ``student``
    (a random start would first pull the student's features towards a random mix of the teacher's)."""
    import torch

    cin, cout = int(student.shape[dim]), int(teacher.shape[dim])
    s = student.movedim(dim, -1).reshape(-1, cin).double()
    t = teacher.movedim(dim, -1).reshape(-1, cout).double()
    fit = torch.linalg.lstsq(s, t, driver="gelsd").solution.T.float()  # (cout, cin)

    class Projection(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(cin, cout, bias=False)
            with torch.no_grad():
                self.linear.weight.copy_(fit)

        def forward(self, x: Any) -> Any:
            return self.linear(x.movedim(dim, -1)).movedim(-1, dim)

    return Projection()


class GraphTap:
    """A copy of an fx graph over the same modules and parameters that returns, besides the model's
    outputs, the values of some of its nodes (each cloned where it is computed, so a later in-place op
    does not change it). Training it trains the original module."""

    def __init__(self, gm: Any, nodes: list[str]) -> None:
        import torch
        import torch.fx
        from torch.utils import _pytree

        graph = torch.fx.Graph()
        val_map: dict[Any, Any] = {}
        out = graph.graph_copy(gm.graph, val_map)
        by_name = {n.name: n for n in val_map.values()}
        if any(name not in by_name for name in nodes):
            raise StepFailed(f"feature matching: nodes {[n for n in nodes if n not in by_name]} are not in the graph")
        taps = []
        for name in nodes:
            with graph.inserting_after(by_name[name]):
                taps.append(graph.call_function(torch.ops.aten.clone.default, (by_name[name],)))
        leaves, _ = _pytree.tree_flatten(out)
        self.n_outputs = len(leaves)
        graph.output(tuple(leaves) + tuple(taps))
        graph._codegen = torch.fx.graph.CodeGen()  # flat positional inputs, a flat tuple out
        self.module = torch.fx.GraphModule(gm, graph)

    def __call__(self, *args: Any) -> tuple[list[Any], list[Any]]:
        got = list(self.module(*args))
        return got[: self.n_outputs], got[self.n_outputs:]

    def close(self) -> None:
        pass


class HookTap:
    """Forward hooks on named submodules of a user student: its outputs and those modules' outputs."""

    def __init__(self, module: Any, layers: list[str]) -> None:
        self.module, self.layers = module, layers
        self.values: dict[str, list[Any]] = {}
        self.handles = [module.get_submodule(name).register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str) -> Any:
        def keep(_module: Any, _args: Any, output: Any) -> None:
            self.values.setdefault(name, []).append(output)
        return keep

    def __call__(self, *args: Any) -> tuple[list[Any], list[Any]]:
        self.values = {}
        out = ft._as_list(self.module(*args))
        feats = []
        for name in self.layers:
            got = self.values.get(name, [])
            if len(got) != 1 or not hasattr(got[0], "shape"):
                raise InputError(f"feature_layers: the student's {name!r} "
                                 f"{'is called ' + str(len(got)) + ' times' if len(got) != 1 else 'does not return one tensor'}"
                                 " in one forward pass; name a module that returns one tensor once")
            feats.append(got[0])
        return out, feats

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class FeatureMatch:
    """The teacher/student feature pairs of ``feature_layers`` and their loss: per layer the mean
    squared error between the student's feature (through its projection, if any) and the teacher's,
    divided by the mean square of the teacher's feature (so layers of any scale weigh alike), averaged
    over layers."""

    def __init__(self, layers: list[str], teacher_tap: GraphTap, student_tap: GraphTap | HookTap,
                 projections: list[Any], scales: list[float], records: list[dict[str, Any]]) -> None:
        import torch

        self.layers, self.teacher_tap, self.student_tap = layers, teacher_tap, student_tap
        self.projections = torch.nn.ModuleList([p for p in projections if p is not None])
        self._proj = projections
        self.scales, self.records = scales, records
        self.cache: list[Any] | None = None

    def teacher(self, idx: Any, batch: list[Any]) -> list[Any]:
        """The teacher's features on a batch: rows of the cache, or the teacher run on it."""
        import torch

        if self.cache is not None:
            return [c[idx] for c in self.cache]
        with torch.no_grad():
            return self.teacher_tap(*batch)[1]

    def loss(self, student: list[Any], teacher: list[Any]) -> Any:
        import torch
        import torch.nn.functional as F

        terms = [F.mse_loss(p(s) if p is not None else s, t) / scale
                 for s, t, p, scale in zip(student, teacher, self._proj, self.scales)]
        return torch.stack(terms).mean()

    def close(self) -> None:
        self.student_tap.close()
        self.cache = None


def _probe_features(tap: GraphTap | HookTap, tensors: list[Any], who: str) -> list[Any]:
    import torch

    try:
        with torch.no_grad():
            return tap(*tensors)[1]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a named module whose output is not one tensor
        raise InputError(f"feature_layers: reading the {who}'s features failed: {type(exc).__name__}: "
                         f"{str(exc)[:500]}; name modules that return one tensor") from None


def _bridge(t: Any, s: Any) -> tuple[str, tuple[int, int] | None] | None:
    """How a student's feature ``s`` is compared with the teacher's ``t``: ('same', None),
    ('project', (student channels, teacher channels)), or None (not comparable)."""
    if not (hasattr(t, "shape") and hasattr(s, "shape")) or not (t.is_floating_point() and s.is_floating_point()):
        return None
    if t.dim() < 2 or t.dim() != s.dim():
        return None
    if tuple(t.shape) == tuple(s.shape):
        return "same", None
    if tuple(t.shape[2:]) == tuple(s.shape[2:]) and t.shape[0] == s.shape[0]:
        return "project", (int(s.shape[1]), int(t.shape[1]))
    return None


def feature_matching(spec: DistillSpec, teacher: Any, student: Any, kind: str, train_x: dict[str, np.ndarray],
                     names: list[str], augment: bool, log: Any) -> FeatureMatch | None:
    """Resolve ``feature_layers`` on the teacher (module paths of the original model, read from the
    graph's ``nn_module_stack``) and the student (the same graph nodes of the narrowed teacher, or
    forward hooks on a user student's named modules), check the shapes, build the projections and
    the teacher's feature cache. Bad names and, for named layers, incomparable shapes are InputErrors."""
    import torch

    if spec.feature_layers is None:
        return None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    outputs, _ = layer_outputs(teacher)
    blocks = auto_layers(teacher)
    explicit = spec.feature_layers != "auto"
    student_modules = dict(student.named_modules()) if kind == "user" else {}
    if explicit:
        layers = list(spec.feature_layers)
        missing = [name for name in layers if name not in outputs]
        if missing:
            raise InputError(f"feature_layers: {missing} not found in the teacher; its blocks are {blocks} (any module "
                             f"path of the original model works, e.g. {sorted(outputs)[:8]})")
        several = {name: len(outputs[name]) for name in layers if len(outputs[name]) != 1}
        if several:
            raise InputError(f"feature_layers: {several} have several outputs in the teacher's graph (a module called "
                             "more than once, or several values leaving it); name a module with one output")
        if kind == "user":
            absent = [name for name in layers if name not in student_modules]
            if absent:
                raise InputError(f"feature_layers: {absent} not found in the student {spec.student}; with a user "
                                 f"student each layer must be a module path of both models")
    else:
        layers = blocks
        if kind == "user":
            absent = [name for name in layers if name not in student_modules]
            for name in absent:
                log.info("feature_layers=auto: skipped %s, the student %s has no module of that name", name, spec.student)
            layers = [name for name in layers if name not in absent]
    nodes = [outputs[name][0].name for name in layers]
    teacher_tap = GraphTap(teacher, nodes)
    student_tap: GraphTap | HookTap = GraphTap(student, nodes) if kind != "user" else HookTap(student, layers)
    probe = [torch.from_numpy(np.ascontiguousarray(train_x[n][:SCALE_SAMPLES])) for n in names]
    t_feats = _probe_features(teacher_tap, probe, "teacher")
    student.eval()
    s_feats = _probe_features(student_tap, probe, "student")
    projections, scales, records = [], [], []
    for name, t, s in zip(layers, t_feats, s_feats):
        how = _bridge(t, s)
        t_shape = list(t.shape[1:]) if hasattr(t, "shape") else None
        s_shape = list(s.shape[1:]) if hasattr(s, "shape") else None
        if how is None:
            message = (f"feature_layers: {name!r} gives the teacher {t_shape} but the student {s_shape} per sample; "
                       "the two must be floating-point features of the same shape, or differ in the channel "
                       "dimension (1) alone, which a learned 1x1 projection bridges")
            if explicit:
                student_tap.close()
                raise InputError(message)
            log.info("feature_layers=auto: skipped %s (teacher %s, student %s: not the same shape apart from the "
                     "channels)", name, t_shape, s_shape)
            continue
        projection = _projection(1, s, t) if how[0] == "project" else None
        projections.append(projection)
        scales.append(max(float(t.float().pow(2).mean()), 1e-8))
        records.append({"layer": name, "teacher_shape": t_shape, "student_shape": s_shape,
                        "projection": None if how[1] is None else f"1x1 {how[1][0]}->{how[1][1]}"})
        log.info("Feature matching %s: teacher %s, student %s%s", name, t_shape, s_shape,
                 f", learned 1x1 projection {how[1][0]} -> {how[1][1]} channels" if how[1] else "")
    if not records:
        student_tap.close()
        raise InputError(f"feature_layers=auto: no block of the teacher ({blocks}) has a comparable feature in the "
                         "student; name layers explicitly, or leave feature_layers unset")
    matched = [r["layer"] for r in records]
    if matched != layers:  # rebuild the taps on the matched layers alone
        student_tap.close()
        nodes = [outputs[name][0].name for name in matched]
        teacher_tap = GraphTap(teacher, nodes)
        student_tap = GraphTap(student, nodes) if kind != "user" else HookTap(student, matched)
    match = FeatureMatch(matched, teacher_tap, student_tap, projections, scales, records)
    n = len(train_x[names[0]])
    per_sample = sum(4 * int(np.prod(r["teacher_shape"])) for r in records)
    if not augment and n * per_sample <= FEATURE_CACHE_BYTES:
        parts: list[list[Any]] = []
        for i in range(0, n, 256):
            batch = [torch.from_numpy(np.ascontiguousarray(train_x[k][i: i + 256])) for k in names]
            parts.append(_probe_features(teacher_tap, batch, "teacher"))
        match.cache = [torch.cat([p[j] for p in parts]) for j in range(len(records))]
    else:
        log.info("Feature matching: the teacher runs on every batch (%s)", "augmented batches" if augment else
                 f"its features of the {n} samples would take {n * per_sample / 2**20:.0f} MiB")
    return match


def train(student: Any, train_x: dict[str, np.ndarray], names: list[str], labels: np.ndarray | None,
          teacher_out: list[np.ndarray] | None, evaluation: tuple[dict[str, np.ndarray], np.ndarray] | None,
          spec: DistillSpec, ctx: StepContext, train_mode: bool | str, teacher: Any = None,
          features: FeatureMatch | None = None) -> list[dict[str, float]]:
    """Adam with a cosine (or constant) learning rate on the distillation loss; per-epoch metrics,
    early stop on eval accuracy, best epoch's weights restored. Returns the per-epoch history.

    The teacher's outputs are ``teacher_out`` (computed once), or, with ``teacher`` (augmented
    batches), the teacher run on each batch. ``train_mode``: True/False for the whole student, or
    ``'update'``/``'frozen'`` (BatchNorm layers alone train, ``ft.set_train_mode``). With ``features``
    the loss adds ``spec.feature_weight`` x the feature loss (its projections train with the student)
    and each epoch's mean feature loss is logged as ``feature_loss``."""
    import torch

    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(train_x[n])) for n in names]
    targets = [torch.from_numpy(np.ascontiguousarray(t)) for t in teacher_out] if teacher_out is not None else None
    augmenter = ft.Augmenter(tensors, gen, spec.seed) if teacher is not None else None
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    if features is not None:
        params += list(features.projections.parameters())
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
        total = feat_total = 0.0
        lr = opt.param_groups[0]["lr"]
        for i in range(0, n, spec.batch_size):
            idx = perm[i: i + spec.batch_size]
            if len(idx) < 2 and i > 0 and (train_mode is True or train_mode == "update"):
                continue  # a last batch of one has no batch statistics (BatchNorm in train mode refuses it)
            batch = [t[idx] for t in tensors]
            lam = partner = None
            tf = None
            if augmenter is not None:
                batch, lam, partner = augmenter(batch)
                with torch.no_grad():
                    if features is not None:
                        tb, tf = features.teacher_tap(*batch)
                    else:
                        tb = ft._as_list(teacher(*batch))
            else:
                assert targets is not None
                tb = [t[idx] for t in targets]
            opt.zero_grad()
            if features is None:
                out = ft._as_list(student(*batch))
            else:
                out, sf = features.student_tap(*batch)
                feat = features.loss(sf, tf if tf is not None else features.teacher(idx, batch))
            loss = ft.batch_loss(out, tb, None if y is None else y[idx], lam, partner,
                                 temperature=spec.temperature, alpha=spec.alpha)
            if features is not None:
                loss = loss + spec.feature_weight * feat
                feat_total += feat.item() * len(idx)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        schedule.step()
        student.eval()
        row = {"train_loss": total / n, "learning_rate": lr}
        if features is not None:
            row["feature_loss"] = feat_total / n
        if evaluation is not None:
            row["eval_accuracy"] = ft.accuracy(student, evaluation[0], evaluation[1], names)
        history.append(row)
        ctx.log_metrics(row, step=epoch)
        ctx.log.info("epoch %d/%d: loss %.4f%s, lr %.2g%s", epoch + 1, spec.epochs, row["train_loss"],
                     f" (feature loss {row['feature_loss']:.4f})" if "feature_loss" in row else "", lr,
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

    features = feature_matching(spec, teacher, student, kind, train_x, names, augment, ctx.log)
    if features is not None:
        ctx.log_params({"feature_layers_matched": ",".join(features.layers)})
    started = time.monotonic()
    if augment:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    try:
        history = train(student, train_x, names, train_data[1], teacher_out,
                        (eval_x, evaluation[1]) if evaluation else None, spec, ctx, train_mode,
                        teacher=teacher if augment else None, features=features)
    finally:
        if features is not None:
            features.close()  # the student's hooks go before it is exported
    train_time = time.monotonic() - started

    out_path = export_student(student, feeds, names, ctx.workdir / "model" / tm.PT2_NAME)
    metrics: dict[str, float] = {
        "teacher_params": float(teacher_params), "student_params": float(student_params),
        "param_ratio": student_params / teacher_params, "epochs_run": float(len(history)),
        "train_time_s": train_time, "final_train_loss": history[-1]["train_loss"],
    }
    if features is not None:
        metrics.update({"feature_layers_matched": float(len(features.layers)),
                        "final_feature_loss": history[-1]["feature_loss"]})
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
        "history": ctx.log_dict({"history": history, "student_kind": kind,
                                 "feature_matching": features.records if features else None}, "distill/history.json"),
    }
    info = {"student_kind": kind, "student": spec.student, "width_factor": spec.effective_width if kind != "user"
            else None, "input_names": names, "format": "pt2", "feature_matching": features is not None,
            "feature_layers": features.records if features else None, "augment": augment,
            "batchnorm": spec.batchnorm if kind != "user" else "train",
            "signal": signal(train_data[1] is not None, spec.alpha)}
    return StepOutput(artifacts=artifacts, metrics=metrics, info=info)


__all__ = ["build_student", "run"]
