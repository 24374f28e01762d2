"""Spec of the ``validate`` step: equivalence of a candidate model to a reference.

Both read models of any format the runtimes layer loads (``airflow_modelopt/runtimes``): PyTorch
ExportedProgram (.pt2), TorchScript, MLflow pytorch models, ONNX (file or MLflow onnx folder),
TFLite, TF SavedModel, Keras and TensorRT engines. The format is detected from the file suffix or
the folder's contents; the ``*_format`` fields override the detection.

Images: both specs default to the ``base`` image family (ONNX Runtime). In docker and kubernetes
modes the image follows the models' formats (``resolved_image_family``): the richest family any
of them needs, in the order tensorrt, tensorflow (which also holds torch), torch, base. An
explicit ``image=`` or ``[modelopt] image_overrides`` still wins.

This module imports only pydantic, so both sides can use it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec
from airflow_modelopt.specs.formats import BatchSize, Device, ModelFormat, family_for, pick_family

#: Output-agreement gates applied when no labels decide (no ``y``, or not a classifier) and the spec
#: sets no comparison gate of its own: a verdict always rests on at least one measured gate.
DEFAULT_MIN_TOP1_AGREEMENT = 0.90   # classifiers: share of samples whose top-1 class matches
DEFAULT_MIN_COSINE = 0.99           # other outputs: cosine similarity of each output


class ValidateEquivalenceSpec(StepSpec):
    """Compare a candidate model with its reference on evaluation data, and gate on the difference.

    Outputs are compared element by element and, for classifiers, by top-1 class and (with
    labels) accuracy; see the fields for the gates."""

    image_family: ClassVar[str] = "base"
    input_fields: ClassVar[tuple[str, ...]] = ("reference_uri", "candidate_uri", "data_uri")

    step: Literal["validate"] = "validate"
    reference_uri: ArtifactUri = Field(
        description="The model the candidate must match (any supported format: .pt2, TorchScript, ONNX file "
        "or folder, .tflite, SavedModel, .keras, TensorRT engine, MLflow model folder or URI)"
    )
    candidate_uri: ArtifactUri = Field(description="The converted or compressed model under test (any supported format)")
    data_uri: ArtifactUri = Field(
        description="Evaluation data .npz: one array per model input keyed by input name (x for a single "
        "input) in the reference's source layout, optional integer labels under y"
    )
    reference_format: ModelFormat | None = Field(None, description="Format of the reference; default: detected")
    candidate_format: ModelFormat | None = Field(None, description="Format of the candidate; default: detected")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N samples of the data")
    batch_size: BatchSize = Field(256, description="Samples per inference call (fixed-batch models use their own)")
    threads: int = Field(1, ge=1, le=256, description="Intra-op threads of each runtime")
    device: Device = Field(
        "cpu", description="cpu, or auto: CUDA/TensorRT execution providers (ONNX Runtime) and CUDA (torch) when present"
    )
    atol: float | None = Field(
        None, ge=0, description="Gate: every output element within atol + rtol*|reference| (for fp32 conversions)"
    )
    rtol: float | None = Field(None, ge=0, description="Gate: relative tolerance added to atol, as numpy.allclose")
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Gate: minimum cosine similarity of each output (flattened over all samples); "
        f"for a non-classifier without any other comparison gate, {DEFAULT_MIN_COSINE} applies"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Gate: minimum share of samples whose top-1 class agrees (classifiers); "
        f"without labels and without any other comparison gate, {DEFAULT_MIN_TOP1_AGREEMENT} applies"
    )
    max_accuracy_drop: float | None = Field(
        0.02, ge=0, le=1,
        description="Gate: maximum top-1 accuracy drop, reference minus candidate, against the labels y "
        "(skipped when the data has no labels, unless set explicitly); null disables",
    )
    class_output: int = Field(0, ge=0, description="Index of the output holding class scores (top-1, accuracy)")
    candidate_name: str | None = Field(None, max_length=200, description="Label of the candidate in reports")

    @model_validator(mode="after")
    def _check(self) -> ValidateEquivalenceSpec:
        if self.rtol is not None and self.atol is None:
            raise ValueError("rtol is set but atol is not; set atol too (0 for a purely relative gate)")
        return self

    def image_families(self) -> set[str]:
        """Image families holding the runtimes of both models (unknown formats are left out)."""
        found = {family_for(self.reference_uri, self.reference_format), family_for(self.candidate_uri, self.candidate_format)}
        return {f for f in found if f}

    def resolved_image_family(self) -> str:
        return pick_family(self.image_families(), self.image_family)
