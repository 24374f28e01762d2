"""Specs of the validation steps: equivalence of two models (``validate``) and their cost (``benchmark``).

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

from pathlib import PurePosixPath
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

ModelFormat = Literal["pt2", "torchscript", "pytorch", "onnx", "tflite", "savedmodel", "keras", "tensorrt"]
MODEL_FORMATS: tuple[str, ...] = get_args(ModelFormat)

#: Image family holding each format's runtime (images/<family>/Dockerfile).
FORMAT_IMAGE_FAMILY: dict[str, str] = {
    "pt2": "torch", "torchscript": "torch", "pytorch": "torch", "onnx": "base",
    "tflite": "tensorflow", "savedmodel": "tensorflow", "keras": "tensorflow", "tensorrt": "tensorrt",
}

#: File suffixes that name a format on their own (used by the runtimes layer as well).
SUFFIX_FORMATS: dict[str, str] = {
    ".pt2": "pt2", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
    ".torchscript": "torchscript", ".jit": "torchscript", ".onnx": "onnx", ".tflite": "tflite",
    ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".engine": "tensorrt", ".plan": "tensorrt",
    ".trt": "tensorrt",
}

Device = Literal["cpu", "auto"]
BatchSize = Annotated[int, Field(ge=1, le=65536)]


#: When two models need different families, the first of these that is needed holds both.
FAMILY_PRECEDENCE = ("tensorrt", "tensorflow", "torch", "base")


def pick_family(families: set[str], default: str) -> str:
    return next((f for f in FAMILY_PRECEDENCE if f in families), default)


def _family_for(uri: str, fmt: str | None) -> str | None:
    if fmt:
        return FORMAT_IMAGE_FAMILY[fmt]
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    return FORMAT_IMAGE_FAMILY.get(SUFFIX_FORMATS.get(suffix, ""))


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
        None, ge=-1, le=1, description="Gate: minimum cosine similarity of each output (flattened over all samples)"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Gate: minimum share of samples whose top-1 class agrees (classifiers)"
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
        found = {_family_for(self.reference_uri, self.reference_format), _family_for(self.candidate_uri, self.candidate_format)}
        return {f for f in found if f}

    def resolved_image_family(self) -> str:
        return pick_family(self.image_families(), self.image_family)


class BenchmarkSpec(StepSpec):
    """Measure a model's latency, throughput, peak memory and size on this machine.

    The report flags the guide's targets: latency < 100 ms, > 30 items/s, peak memory < 500 MB."""

    cache_per_machine: ClassVar[bool] = True
    image_family: ClassVar[str] = "base"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "data_uri")

    step: Literal["benchmark"] = "benchmark"
    model_uri: ArtifactUri = Field(description="The model to measure (any supported format)")
    model_format: ModelFormat | None = Field(None, description="Format of the model; default: detected")
    data_uri: ArtifactUri | None = Field(
        None,
        description="Sample inputs .npz (arrays keyed by input name, x for a single input); default: random "
        "normal values shaped by the model's inputs",
    )
    batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1, 8], min_length=1, max_length=32, description="Batch sizes to measure"
    )
    warmup_runs: int = Field(10, ge=0, le=100000, description="Untimed runs per batch size before the timed ones")
    timed_runs: int = Field(100, ge=1, le=1000000, description="Timed runs per batch size (at least 1)")
    threads: int = Field(1, ge=1, le=256, description="Intra-op threads of the runtime")
    device: Device = Field(
        "cpu", description="cpu, or auto: CUDA/TensorRT execution providers (ONNX Runtime) and CUDA (torch) when present"
    )
    measure_memory: bool = Field(
        True, description="Measure the peak RSS of a fresh process that loads the model and runs every batch size"
    )
    memory_timeout_s: float = Field(600, gt=0, le=86400, description="Time limit of the peak-memory process")
    max_latency_ms: float = Field(100, gt=0, description="Target: p95 latency at the smallest batch size, in ms")
    min_throughput: float = Field(30, gt=0, description="Target: items per second at the smallest batch size (FPS)")
    max_peak_memory_mb: float = Field(500, gt=0, description="Target: peak RSS of the fresh process, in MB (10^6 bytes)")
    enforce_targets: bool = Field(False, description="Fail the task (gate) when a target is missed; default: flag only")
    candidate_name: str | None = Field(None, max_length=200, description="Label of the model in reports and plots")

    @model_validator(mode="after")
    def _check(self) -> BenchmarkSpec:
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch_sizes must not repeat a size, got {self.batch_sizes}")
        self.batch_sizes = sorted(self.batch_sizes)
        return self

    def image_families(self) -> set[str]:
        family = _family_for(self.model_uri, self.model_format)
        return {family} if family else set()

    def resolved_image_family(self) -> str:
        return pick_family(self.image_families(), self.image_family)


__all__ = ["FORMAT_IMAGE_FAMILY", "MODEL_FORMATS", "SUFFIX_FORMATS", "BenchmarkSpec", "ModelFormat",
           "ValidateEquivalenceSpec"]
