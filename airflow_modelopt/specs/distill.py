"""Spec of the ``distill`` step: knowledge distillation of a PyTorch teacher into a smaller student."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

#: ``package.module:name``: a module path importable in the step's image, and an attribute of it.
STUDENT_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
#: A module path of the teacher (and of a user student): names separated by dots, as ``named_modules`` gives them.
LAYER_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
#: model_uri endings of TorchScript and torch.save pickles: no graph to narrow or to run as a teacher here.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
DEFAULT_WIDTH = 0.5

JsonScalar = int | float | str | bool | None


class DistillSpec(StepSpec):
    """Train a smaller student to match a teacher's logits (Hinton et al.) and log it as a .pt2.

    Teacher: the pipeline's model (.pt2 ExportedProgram or MLflow pytorch model). Student: a user
    architecture (``student="package.module:Name"``, an ``nn.Module`` subclass built with
    ``student_kwargs``; a plain factory function needs the model-code opt-in), or the teacher
    narrowed to ``width_factor`` of its channels with torch-pruning's dependency graph (keeping the
    teacher's surviving weights). Loss: ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) *
    cross-entropy`` on the labels of ``train_data_uri`` (the KL term alone when it has none). Adam
    with a cosine learning-rate schedule; early stop on the accuracy on ``eval_data_uri``.

    Optional intermediate-feature matching (FitNets-style hints, off by default): with
    ``feature_layers`` (module paths of the original model, or ``"auto"``) and ``feature_weight``
    > 0, the loss adds ``feature_weight`` x the mean over layers of MSE(student feature, teacher
    feature) / mean(teacher feature^2). A student feature with fewer channels than the teacher's
    (the narrowed teacher) goes through a learned 1x1 projection, trained with the student and
    discarded after; other shape differences are refused for named layers and skipped for "auto".
    """

    image_family: ClassVar[str] = "torch"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "train_data_uri", "eval_data_uri")

    step: Literal["distill"] = "distill"
    model_uri: ArtifactUri = Field(
        description="Teacher: torch.export ExportedProgram (.pt2) or MLflow pytorch model (TorchScript is refused)"
    )
    train_data_uri: ArtifactUri = Field(
        description=".npz with inputs (x, or one array per input name) and optional labels y to train the student on"
    )
    eval_data_uri: ArtifactUri | None = Field(
        None, description=".npz with inputs and labels y: per-epoch accuracy, early stop, teacher vs student accuracy"
    )
    student: str | None = Field(
        None,
        description="Student architecture as 'package.module:Name' (importable in the step's image): an nn.Module "
        "subclass called with student_kwargs; unset means the teacher narrowed by width_factor",
    )
    student_kwargs: dict[str, JsonScalar | list[JsonScalar]] | None = Field(
        None, description="Keyword arguments of the student constructor (JSON values)"
    )
    width_factor: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=f"Narrowed-teacher student: fraction of each layer's channels kept (default {DEFAULT_WIDTH}; "
        "parameters shrink about as its square); layers producing the outputs keep theirs",
    )
    round_to: int | None = Field(
        None, ge=1, le=1024, description="Narrowed-teacher student: keep channel counts a multiple of this"
    )
    temperature: float = Field(4.0, gt=0, le=100, description="Distillation temperature T (both logits divided by T)")
    alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Weight of the distillation term; 1 - alpha weighs cross-entropy on the labels y (0 trains on "
        "hard labels alone: the baseline distillation is compared with)",
    )
    epochs: int = Field(20, ge=1, le=1000, description="Maximum training epochs")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Initial Adam learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: anneal the learning rate to 0 over epochs; constant: keep it"
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Training batch size")
    augment: bool = Field(
        False,
        description="Train on mixup + gaussian-noise versions of the train_data_uri inputs (float inputs), the "
        "teacher labelling each augmented batch on the fly (with labels, the cross-entropy mixes both labels); "
        "a richer transfer set when the training data is small",
    )
    batchnorm: Literal["update", "frozen"] = Field(
        "frozen",
        description="Narrowed-teacher student: 'update' trains its BatchNorm layers on batch statistics (running "
        "statistics re-estimated), 'frozen' keeps the whole student in inference mode. A user student trains "
        "in training mode either way",
    )
    early_stop_patience: int | None = Field(
        5,
        ge=1,
        le=1000,
        description="Stop after this many epochs without a better eval accuracy and keep the best epoch's weights "
        "(needs eval_data_uri; unset trains every epoch)",
    )
    feature_layers: list[str] | Literal["auto"] | None = Field(
        None,
        description="Intermediate-feature matching: module paths of the teacher (as named_modules names them, "
        "e.g. ['layers.0', 'layers.2']; with a user student, paths of both models) whose outputs the student's "
        "same-named modules learn to match, or 'auto' for the outputs of the teacher's top-level blocks (a "
        "Sequential of blocks counts as its blocks; the logits' module excluded). Needs feature_weight > 0",
    )
    feature_weight: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Weight of the feature loss (per layer MSE / mean square of the teacher's feature, averaged "
        "over layers) added to the distillation loss; 0 (the default) leaves feature matching off",
    )
    seed: int = Field(0, ge=0, description="Seed of the student's initial weights, batches and data order")
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail (exit 3) when the student's eval accuracy is more than this below the teacher's",
    )

    @field_validator("feature_layers", mode="before")
    @classmethod
    def _layers_from_text(cls, value: object) -> object:
        """A string other than 'auto' (a rendered template, a trigger-form field) is a comma-separated list."""
        if isinstance(value, str) and value.strip() != "auto":
            return [part.strip() for part in value.split(",")]
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> DistillSpec:
        problems = []
        if self.model_uri.split("?", 1)[0].rstrip("/").lower().endswith(TORCHSCRIPT_SUFFIXES):
            problems.append(
                f"model_uri: {self.model_uri!r} looks like TorchScript or a torch.save checkpoint; the teacher must "
                "be a torch.export ExportedProgram (.pt2) or an MLflow pytorch model"
            )
        if self.student is not None and not STUDENT_PATTERN.match(self.student):
            problems.append(
                f"student: expected 'package.module:Name' (an importable module path, a colon, an attribute), "
                f"got {self.student!r}"
            )
        if self.student is not None and (self.width_factor is not None or self.round_to is not None):
            problems.append("width_factor: applies to the narrowed-teacher student only; remove it or student")
        if self.student is None and self.student_kwargs:
            problems.append("student_kwargs: only used with student='package.module:Name'")
        if isinstance(self.feature_layers, list):
            bad = [name for name in self.feature_layers if not LAYER_PATTERN.match(name)]
            if not self.feature_layers:
                problems.append("feature_layers: an empty list; name module paths (e.g. ['layers.0']) or 'auto'")
            elif bad:
                problems.append(f"feature_layers: expected module paths like 'layers.0' or 'features', got {bad}")
            elif len(set(self.feature_layers)) != len(self.feature_layers):
                problems.append(f"feature_layers: a layer is named twice in {self.feature_layers}")
        if self.feature_layers is not None and self.feature_weight == 0:
            problems.append("feature_weight: must be > 0 when feature_layers is set (it weighs the feature loss; "
                            "0 leaves feature matching off), e.g. feature_weight=1.0")
        if self.feature_layers is None and self.feature_weight > 0:
            problems.append("feature_layers: required when feature_weight > 0 (module paths of the teacher, or 'auto')")
        if self.max_accuracy_drop is not None and self.eval_data_uri is None:
            problems.append("eval_data_uri: required when max_accuracy_drop is set (accuracy is measured on it)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_width(self) -> float:
        return self.width_factor if self.width_factor is not None else DEFAULT_WIDTH
