"""Spec of the pruning step (PyTorch: unstructured or structured; Keras: TFMOT magnitude pruning).

Which framework a model belongs to is known on the Airflow side only when ``framework`` is set or
``model_uri`` ends in a telling suffix (``.pt2``; ``.keras``/``.h5``/``.hdf5``). Then options
of the other framework are refused here, before anything starts; otherwise the step refuses them
after it has looked at the model (``InputError``, exit code 2).

Image: the spec's ``image_family`` is ``torch`` (the step's default image). A Keras model needs
the ``tensorflow`` image; :meth:`PruneSpec.image_family_for_model` tells which one a spec needs,
and ``PruneOperator`` uses it to pick the tensorflow image for Keras models when no ``image`` is
given (see that operator's docstring).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

Framework = Literal["torch", "keras"]

#: model_uri endings that tell the framework before the model is fetched.
TORCH_SUFFIXES = (".pt2",)
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: TorchScript and torch.save pickles: not prunable here (no graph to prune, or pickled code).
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")

#: Options only the Keras (TFMOT) path understands: the PolynomialDecay pruning schedule.
KERAS_ONLY_OPTIONS = ("initial_sparsity", "begin_step", "end_step", "frequency")
#: Options only the PyTorch path understands.
TORCH_ONLY_OPTIONS = ("round_to",)

#: Fine-tuning epochs when fine_tune_epochs is not given: Keras prunes while it trains.
DEFAULT_KERAS_EPOCHS = 2


def framework_from_uri(uri: str) -> Framework | None:
    """The framework a model URI's suffix names, or None when the suffix does not tell."""
    path = uri.split("?", 1)[0].rstrip("/").lower()
    if path.endswith(TORCH_SUFFIXES):
        return "torch"
    if path.endswith(KERAS_SUFFIXES):
        return "keras"
    return None


def option_conflicts(spec: PruneSpec, framework: Framework) -> list[str]:
    """One message per option that the given framework's path does not understand."""
    problems = []
    if framework == "torch":
        for name in KERAS_ONLY_OPTIONS:
            if getattr(spec, name) is not None:
                problems.append(
                    f"{name}: a Keras-only option (TFMOT PolynomialDecay pruning schedule) but model_uri "
                    f"is a PyTorch model; remove {name} (PyTorch pruning is one-shot, then fine-tuned)"
                )
    else:
        if spec.method == "structured":
            problems.append(
                "method: 'structured' (channel pruning with torch-pruning) is PyTorch-only but model_uri "
                "is a Keras model; use method='unstructured' (TFMOT magnitude pruning)"
            )
        for name in TORCH_ONLY_OPTIONS:
            if getattr(spec, name) is not None:
                problems.append(f"{name}: a PyTorch-only option but model_uri is a Keras model; remove {name}")
        if spec.fine_tune_epochs == 0:
            problems.append(
                "fine_tune_epochs: Keras pruning (prune_low_magnitude) prunes while it trains; "
                "give at least 1 epoch"
            )
        if spec.train_data_uri is None:
            problems.append(
                "train_data_uri: required for a Keras model (prune_low_magnitude prunes during training)"
            )
        if spec.distill:
            problems.append(
                "distill: distillation is PyTorch-only; Keras pruning fine-tunes on the labels of train_data_uri"
            )
    return problems


class PruneSpec(StepSpec):
    """Prune a model and report what was reached: sparsity, parameters, FLOPs, bytes, accuracy.

    PyTorch (.pt2 ExportedProgram or MLflow pytorch model): ``method='unstructured'`` zeroes the
    ``sparsity`` fraction of all Conv/Linear weights with the smallest magnitude, globally (L1),
    and makes it permanent; ``method='structured'`` removes that fraction of channels of every
    Conv/Linear layer (except the layers producing the model's outputs) with torch-pruning's
    dependency graph, so residual and concatenated channels stay consistent, and the network
    really shrinks. The fine-tune learns from the labels of ``train_data_uri`` or, when it has none
    (or ``distill`` is true), from the unpruned model's outputs (distillation). Output: an
    ExportedProgram (.pt2) with a dynamic batch dimension.

    Keras (.keras, .h5, SavedModel or MLflow tensorflow model): TFMOT ``prune_low_magnitude``
    with a PolynomialDecay schedule from ``initial_sparsity`` to ``sparsity`` while fine-tuning
    on the training data, then ``strip_pruning``. Output: a Keras model in the source's format.
    """

    image_family: ClassVar[str] = "torch"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "train_data_uri", "eval_data_uri")

    step: Literal["prune"] = "prune"
    model_uri: ArtifactUri = Field(
        description="Model to prune: torch.export ExportedProgram (.pt2), MLflow pytorch model, Keras "
        ".keras/.h5 file, Keras SavedModel folder or MLflow tensorflow model (TorchScript is not supported)"
    )
    framework: Literal["auto", "torch", "keras"] = Field(
        "auto",
        description="Framework of model_uri; auto detects it from the model (a Keras model needs the "
        "tensorflow image: with auto, only a .keras/.h5/.hdf5 suffix tells the operator so)",
    )
    method: Literal["unstructured", "structured"] = Field(
        "unstructured",
        description="unstructured: zero the smallest-magnitude weights (global L1 for PyTorch, TFMOT for "
        "Keras); structured: remove whole channels (PyTorch only), which shrinks parameters and FLOPs",
    )
    sparsity: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Target fraction in (0, 1): of weights zeroed (unstructured; the final sparsity of "
        "the Keras schedule) or of channels removed per layer (structured)",
    )
    train_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with inputs (x, or one array per input name) for fine-tuning, with labels y or "
        "without (then the pruned model learns from the unpruned one, see distill)",
    )
    eval_data_uri: ArtifactUri | None = Field(
        None, description=".npz with inputs and labels y; accuracy is measured on it before and after pruning. "
        "PyTorch models: without labels (a segmenter's masks, unlabelled data) the pruned model's argmax "
        "agreement with the unpruned one is measured instead (agreement_* metrics; max_accuracy_drop then "
        "bounds 1 - agreement); Keras models need the labels"
    )
    fine_tune_epochs: int | None = Field(
        None,
        ge=0,
        le=1000,
        description=f"Epochs of fine-tuning on train_data_uri (Adam; cross-entropy on labels and/or "
        f"distillation, see distill); default 0 for PyTorch, {DEFAULT_KERAS_EPOCHS} for Keras (which prunes "
        "while it trains)",
    )
    distill: bool | None = Field(
        None,
        description="PyTorch: fine-tune by distillation, the unpruned model as teacher (temperature-scaled KL "
        "on a classifier's logits, mean squared error on other outputs), mixed with cross-entropy when "
        "train_data_uri has labels y; unset means distil only when it has none; false means labels only",
    )
    distill_temperature: float = Field(
        4.0, gt=0, le=100, description="Distillation temperature T: both logits are divided by T (KL scaled by T^2)"
    )
    distill_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation term when labels are used too: alpha * KL + (1 - alpha) * "
        "cross-entropy (without labels the loss is the distillation term alone)",
    )
    distill_augment: bool = Field(
        True,
        description="PyTorch distillation: train on mixup + gaussian-noise versions of the train_data_uri inputs "
        "(float inputs), labelled by the unpruned model on the fly, so a few hundred unlabelled inputs make "
        "a richer transfer set; false distils on the inputs as given",
    )
    fine_tune_batchnorm: Literal["update", "frozen"] = Field(
        "update",
        description="PyTorch fine-tune: 'update' trains BatchNorm layers on batch statistics and re-estimates "
        "their running statistics (stale after a structured prune); 'frozen' keeps the whole model in "
        "inference mode. Dropout stays off either way",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate of the fine-tune")
    batch_size: int = Field(64, ge=1, le=65536, description="Fine-tuning batch size")
    seed: int = Field(0, ge=0, description="Seed of the fine-tune's weights order and batches")
    ignored_layers: list[str] | None = Field(
        None,
        description="Layers left unpruned: PyTorch module names (e.g. classifier.3) or Keras layer names",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail (exit 3) when eval accuracy drops by more than this (absolute, e.g. 0.02); "
        "needs eval_data_uri",
    )
    round_to: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="PyTorch structured only: keep channel counts a multiple of this (e.g. 8 for SIMD)",
    )
    initial_sparsity: float | None = Field(
        None, ge=0, lt=1, description="Keras only: sparsity where the PolynomialDecay schedule starts; unset means 0"
    )
    begin_step: int | None = Field(
        None, ge=0, description="Keras only: training step at which pruning begins; unset means 0"
    )
    end_step: int | None = Field(
        None,
        ge=1,
        description="Keras only: training step at which the final sparsity is reached; unset means about 70% "
        "of the fine-tune's steps (the rest recovers accuracy at the final sparsity)",
    )
    frequency: int | None = Field(
        None, ge=1, description="Keras only: prune every this many steps; unset means 10 updates over the schedule"
    )

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        problems = []
        lower = self.model_uri.split("?", 1)[0].rstrip("/").lower()
        if lower.endswith(TORCHSCRIPT_SUFFIXES):
            problems.append(
                f"model_uri: {self.model_uri!r} looks like TorchScript or a torch.save checkpoint, which the "
                "prune step does not support; give a torch.export ExportedProgram (.pt2) or an MLflow pytorch model"
            )
        if self.fine_tune_epochs and self.train_data_uri is None:
            problems.append(f"train_data_uri: required when fine_tune_epochs is {self.fine_tune_epochs}")
        if self.max_accuracy_drop is not None and self.eval_data_uri is None:
            problems.append("eval_data_uri: required when max_accuracy_drop is set (accuracy is measured on it)")
        if self.distill and self.fine_tune_epochs == 0:
            problems.append("distill: true needs fine_tune_epochs of at least 1 (distillation is the fine-tune)")
        if self.round_to is not None and self.method != "structured":
            problems.append("round_to: only applies to method='structured' (channel counts)")
        if self.initial_sparsity is not None and self.initial_sparsity >= self.sparsity:
            problems.append(
                f"initial_sparsity: must be below sparsity (the schedule's final sparsity, {self.sparsity}), "
                f"got {self.initial_sparsity}"
            )
        if self.begin_step is not None and self.end_step is not None and self.end_step <= self.begin_step:
            problems.append(f"end_step: must be after begin_step={self.begin_step}, got {self.end_step}")
        if self.ignored_layers is not None and any(not n.strip() for n in self.ignored_layers):
            problems.append("ignored_layers: layer names must be non-empty")
        declared = self.declared_framework()
        if declared is not None:
            problems.extend(option_conflicts(self, declared))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def declared_framework(self) -> Framework | None:
        """The framework named by ``framework`` or by model_uri's suffix; None until the model is seen."""
        if self.framework != "auto":
            return self.framework
        return framework_from_uri(self.model_uri)

    def resolved_image_family(self) -> str:
        return self.image_family_for_model()

    def image_family_for_model(self) -> str:
        """``tensorflow`` for a (declared) Keras model, else this step's default ``torch`` image."""
        return "tensorflow" if self.declared_framework() == "keras" else self.image_family

    def epochs_for(self, framework: Framework) -> int:
        if self.fine_tune_epochs is not None:
            return self.fine_tune_epochs
        return DEFAULT_KERAS_EPOCHS if framework == "keras" else 0
