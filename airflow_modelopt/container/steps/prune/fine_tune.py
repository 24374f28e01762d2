"""Running a PyTorch model on numpy data, its fine-tune after pruning, and its accuracy.

The fine-tune learns from one of three signals (``common.fine_tune_signal`` picks it):

- ``labels``: cross-entropy on the training data's labels ``y``;
- ``distillation``: the unpruned model is the teacher; its outputs on the training inputs,
  computed once before pruning, are the targets (:func:`distillation_loss`), so no labels are
  needed;
- ``distillation+labels``: both, weighted by ``distill_alpha``.

The model stays in inference mode while it trains (``eval()``): BatchNorm running statistics stay
frozen and dropout stays off, as the exported graph was traced that way; gradients still flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Samples per forward pass when the model only infers (teacher outputs, accuracy).
_INFER_BATCH = 512


def _as_list(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def forward(module: Any, feeds: dict[str, np.ndarray], names: list[str], grad: bool = False) -> list[np.ndarray]:
    """The module's outputs (as numpy) on the inputs ``feeds`` given in the order ``names``."""
    import torch

    with torch.set_grad_enabled(grad):
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
    return [o.detach().cpu().numpy() for o in _as_list(out)]


def teacher_outputs(module: Any, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """Every output of the (unpruned) module over all samples, in batches: the distillation targets."""
    n = len(inputs[names[0]])
    parts = [forward(module, {k: v[i: i + _INFER_BATCH] for k, v in inputs.items()}, names)
             for i in range(0, n, _INFER_BATCH)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def is_classifier(outputs: Sequence[Any]) -> bool:
    """One (batch, classes) output: what cross-entropy, the KL distillation and accuracy need."""
    return len(outputs) == 1 and len(outputs[0].shape) == 2


def distillation_loss(student: Sequence[Any], teacher: Sequence[Any], labels: Any = None, *,
                      temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """Knowledge-distillation loss of a student's outputs against its teacher's (torch tensors).

    - A classifier (one ``(batch, classes)`` output, logits): Hinton et al.'s temperature-scaled
      ``KL(softmax(teacher / T) || softmax(student / T)) * T**2`` (the ``T**2`` keeps gradient
      magnitudes comparable across temperatures). With ``labels`` (class indices), the loss is
      ``alpha * KL-term + (1 - alpha) * cross_entropy(student, labels)``.
    - Any other outputs: the mean squared error between each student output and its teacher's,
      averaged over outputs (``labels`` must be None: there is no class to compare with).
    """
    import torch
    import torch.nn.functional as F

    if len(student) != len(teacher):
        raise ValueError(f"the student gives {len(student)} outputs, the teacher {len(teacher)}")
    if not is_classifier(student):
        if labels is not None:
            raise ValueError("labels need a classifier with one (batch, classes) output")
        return torch.stack([F.mse_loss(s, t.to(s.dtype)) for s, t in zip(student, teacher)]).mean()
    s, t = student[0], teacher[0].to(student[0].dtype)
    kd = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True) * temperature**2
    if labels is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(s, labels)


def _classifier_output(outputs: list[Any], field_name: str) -> Any:
    """The first output, which must be (batch, classes) logits or probabilities."""
    if not outputs or len(outputs[0].shape) != 2:
        raise _not_a_classifier(field_name, [list(o.shape) for o in outputs])
    return outputs[0]


def _not_a_classifier(field_name: str, shapes: Any) -> Exception:
    from airflow_modelopt.exceptions import InputError

    return InputError(
        f"{field_name}: fine-tuning on labels and accuracy need a classifier with one (batch, classes) output; "
        f"this model gives {shapes}"
    )


def fine_tune(module: Any, inputs: dict[str, np.ndarray], names: list[str], *, labels: np.ndarray | None,
              teacher: list[np.ndarray] | None, temperature: float, alpha: float, epochs: int, lr: float,
              batch_size: int, seed: int, log: Any) -> list[float]:
    """Adam for ``epochs`` on cross-entropy (``labels`` only), :func:`distillation_loss` against the
    precomputed ``teacher`` outputs (``teacher`` only), or both mixed by ``alpha``. Returns each
    epoch's mean loss. The model stays in inference mode (frozen BatchNorm statistics)."""
    import torch
    import torch.nn.functional as F

    if labels is None and teacher is None:
        raise ValueError("fine_tune needs labels, teacher outputs, or both")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    targets = [torch.from_numpy(np.ascontiguousarray(t)) for t in teacher] if teacher is not None else None
    if y is not None and targets is not None and not is_classifier(targets):
        raise _not_a_classifier("train_data_uri", [list(t.shape) for t in targets])
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.eval()
    losses = []
    n = len(tensors[0])
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i: i + batch_size]
            opt.zero_grad()
            out = _as_list(module(*[t[idx] for t in tensors]))
            if targets is None:
                loss = F.cross_entropy(_classifier_output(out, "train_data_uri"), y[idx])
            else:
                loss = distillation_loss(out, [t[idx] for t in targets], None if y is None else y[idx],
                                         temperature=temperature, alpha=alpha)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        log.info("fine-tune epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    return losses


def accuracy(module: Any, inputs: dict[str, np.ndarray], y: np.ndarray, names: list[str]) -> float:
    """Share of samples whose argmax output is their label ``y``."""
    correct = 0
    for i in range(0, len(y), _INFER_BATCH):
        out = forward(module, {k: v[i: i + _INFER_BATCH] for k, v in inputs.items()}, names)
        correct += int((_classifier_output(out, "eval_data_uri").argmax(axis=1) == y[i: i + _INFER_BATCH]).sum())
    return correct / len(y)


__all__ = ["accuracy", "distillation_loss", "fine_tune", "forward", "is_classifier", "teacher_outputs"]
