"""Spec of the TensorRT engine build step (ONNX -> serialized engine, fp32 / fp16 / int8)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

Precision = Literal["fp32", "fp16", "int8"]

#: Bits per value of each precision (the ``precision_bits`` metric).
PRECISION_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8}

Dim = Annotated[int, Field(ge=1, le=1 << 30)]
InputName = Annotated[str, Field(min_length=1, max_length=1000)]


class ShapeRange(BaseModel):
    """The shapes one optimization profile allows for one input: every dimension, batch first."""

    model_config = ConfigDict(extra="forbid")

    min: list[Dim] = Field(min_length=1, max_length=16, description="Smallest shape accepted at run time")
    opt: list[Dim] = Field(
        min_length=1, max_length=16,
        description="Shape the kernels are tuned for (int8 calibration also runs at this shape)",
    )
    max: list[Dim] = Field(min_length=1, max_length=16, description="Largest shape accepted at run time")

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        ranks = {"min": len(self.min), "opt": len(self.opt), "max": len(self.max)}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"min, opt and max must have the same rank (number of dimensions), got {ranks}")
        for d, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                raise ValueError(
                    f"dimension {d} must satisfy min <= opt <= max, got min={lo}, opt={mid}, max={hi} "
                    f"(shapes min={self.min}, opt={self.opt}, max={self.max})"
                )
        return self


Profile = dict[InputName, ShapeRange]


class TensorRTBuildSpec(StepSpec):
    """Build a TensorRT engine from an ONNX model: fp32, fp16, or int8 calibrated on real data,
    with optimization profiles for dynamic shapes and a reusable timing cache. Needs an NVIDIA
    GPU and the tensorrt package (the ``tensorrt`` image)."""

    image_family: ClassVar[str] = "tensorrt"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "calibration_data_uri", "timing_cache_uri")

    step: Literal["tensorrt_build"] = "tensorrt_build"
    model_uri: ArtifactUri = Field(
        description="ONNX model: a .onnx file (external data next to it), a folder holding model.onnx (+ its "
        "external data), or an MLflow onnx-flavor model (runs:/, models:/, mlflow-artifacts:/, file:// or a path)"
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description="int8 only (required there): .npz with one array per model input keyed by input name (x for "
        "a single input); batches are drawn from it in order at the opt shape of the first optimization profile",
    )
    precision: Precision = Field(
        "fp16",
        description="fp32; fp16 (BuilderFlag.FP16); int8 (BuilderFlag.INT8, entropy calibration on "
        "calibration_data_uri)",
    )
    int8_fp16_fallback: bool = Field(
        True, description="int8 only: also allow fp16 kernels for layers that do not run in int8 (else fp32)"
    )
    optimization_profiles: list[Profile] | None = Field(
        None,
        min_length=1, max_length=32,
        description="Optimization profiles: a list of {input name: {min, opt, max}} (each shape lists every "
        "dimension, batch first); a single mapping is taken as one profile. Default: for inputs whose only "
        "dynamic dimension is the batch, min 1, opt opt_batch_size, max max_batch_size",
    )
    opt_batch_size: Dim = Field(
        8, le=65536, description="Default profile: batch size the kernels are tuned for (and int8 calibrates at)"
    )
    max_batch_size: Dim = Field(64, le=65536, description="Default profile: largest batch size the engine accepts")
    workspace_mb: int = Field(
        1024, ge=16, le=1 << 20, description="Builder workspace memory pool limit (MemoryPoolType.WORKSPACE), MiB"
    )
    builder_optimization_level: int = Field(
        3, ge=0, le=5,
        description="0-5: higher searches more tactics (slower build, possibly faster engine); TensorRT's default is 3",
    )
    timing_cache_uri: ArtifactUri | None = Field(
        None,
        description="Timing cache to start from, e.g. the timing_cache artifact of an earlier tensorrt_build on the "
        "same GPU model and TensorRT version (a cache that does not match is ignored, with a warning)",
    )
    calibration_batches: int = Field(
        16, ge=1, le=100000, description="int8: at most this many calibration batches are drawn from the data"
    )
    device: int = Field(0, ge=0, le=63, description="CUDA device index the engine is built on")

    @field_validator("optimization_profiles", mode="before")
    @classmethod
    def _single_profile(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [value]
        return value

    @model_validator(mode="after")
    def _check(self) -> TensorRTBuildSpec:
        if self.precision == "int8" and self.calibration_data_uri is None:
            raise ValueError(
                "calibration_data_uri is required for precision 'int8': TensorRT calibrates int8 ranges on real "
                "input batches (an .npz keyed by input name, or x)"
            )
        if self.precision != "int8" and self.calibration_data_uri is not None:
            raise ValueError(
                f"calibration_data_uri is only read for precision 'int8' (got {self.precision!r}); leave it unset"
            )
        if self.opt_batch_size > self.max_batch_size:
            raise ValueError(
                f"opt_batch_size ({self.opt_batch_size}) must not exceed max_batch_size ({self.max_batch_size})"
            )
        profiles = self.optimization_profiles or []
        for i, profile in enumerate(profiles):
            if not profile:
                raise ValueError(f"optimization_profiles[{i}] is empty; give {{input name: {{min, opt, max}}}}")
            if set(profile) != set(profiles[0]):
                raise ValueError(
                    f"optimization_profiles[{i}] names inputs {sorted(profile)} but optimization_profiles[0] names "
                    f"{sorted(profiles[0])}; every profile must give shapes for the same inputs"
                )
            for name, rng in profile.items():
                if len(rng.min) != len(profiles[0][name].min):
                    raise ValueError(
                        f"optimization_profiles[{i}][{name!r}] has rank {len(rng.min)} but "
                        f"optimization_profiles[0][{name!r}] has rank {len(profiles[0][name].min)}"
                    )
        return self


__all__ = ["PRECISION_BITS", "Precision", "ShapeRange", "TensorRTBuildSpec"]
