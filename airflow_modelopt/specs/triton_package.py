"""Spec of the triton_package step: a Triton Inference Server model repository for registry aliases."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from airflow_modelopt.specs.base import StepSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
Alias = Annotated[str, Field(min_length=1, max_length=255)]
BatchSize = Annotated[int, Field(ge=1, le=1 << 20)]


class TritonPackageSpec(StepSpec):
    """Write a Triton model repository (``<model>/config.pbtxt`` + ``<model>/<version>/<model file>``)
    for the model versions that registry aliases point at, log it as an artifact folder and a
    tarball. ONNX models get platform onnxruntime_onnx, TensorRT engines tensorrt_plan, OpenVINO
    IR the openvino backend; inputs and outputs come from each model's recorded signature."""

    image_family: ClassVar[str] = "base"
    input_fields: ClassVar[tuple[str, ...]] = ()

    step: Literal["triton_package"] = "triton_package"
    registered_model_name: str = Field(min_length=1, max_length=255, description="MLflow registered model name")
    aliases: list[Alias] = Field(
        default_factory=lambda: ["champion"], min_length=1, max_length=16,
        description="Registry aliases to package, one Triton model each (the version each points at)",
    )
    model_name: str | None = Field(
        None, min_length=1, max_length=128,
        description="Triton model name: with one alias, the model's name; with several, each is "
        "<model_name>_<alias>. Default: the registered model name",
    )
    max_batch_size: int = Field(
        64, ge=0, le=1 << 20,
        description="Triton max_batch_size: the largest batch Triton forms (0: no batching; inputs then keep their "
        "full shapes). Models whose batch dimension is fixed are packaged with 0",
    )
    dynamic_batching: bool = Field(True, description="Let Triton combine requests into batches (dynamic_batching)")
    preferred_batch_sizes: list[BatchSize] = Field(
        default_factory=list, max_length=32, description="dynamic_batching.preferred_batch_size"
    )
    max_queue_delay_microseconds: int = Field(
        100, ge=0, le=10_000_000, description="dynamic_batching.max_queue_delay_microseconds"
    )
    instance_count: int = Field(1, ge=1, le=256, description="instance_group count: model copies per device")
    instance_kind: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="instance_group kind: auto (GPU for TensorRT engines, CPU otherwise), cpu, or gpu"
    )

    @field_validator("registered_model_name", "model_name")
    @classmethod
    def _no_slash(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError(f"{value!r} must not contain '/'")
        return value

    @model_validator(mode="after")
    def _check(self) -> TritonPackageSpec:
        if self.model_name is not None and not _NAME.match(self.model_name):
            raise ValueError(
                f"model_name {self.model_name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
            )
        dupes = sorted({a for a in self.aliases if self.aliases.count(a) > 1})
        if dupes:
            raise ValueError(f"aliases: {dupes} listed more than once")
        if self.max_batch_size == 0 and (self.dynamic_batching or self.preferred_batch_sizes):
            raise ValueError(
                "dynamic_batching and preferred_batch_sizes need max_batch_size > 0 (Triton batches requests only up "
                "to it); set dynamic_batching=False for max_batch_size 0"
            )
        too_big = [b for b in self.preferred_batch_sizes if b > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} exceed max_batch_size ({self.max_batch_size})")
        if self.preferred_batch_sizes and not self.dynamic_batching:
            raise ValueError("preferred_batch_sizes is only used with dynamic_batching=True")
        return self

    def triton_names(self) -> dict[str, str]:
        """alias -> Triton model name."""
        base = self.model_name or re.sub(r"[^A-Za-z0-9_.-]", "_", self.registered_model_name)
        if len(self.aliases) == 1:
            return {self.aliases[0]: base}
        return {a: f"{base}_{re.sub(r'[^A-Za-z0-9_.-]', '_', a)}" for a in self.aliases}


__all__ = ["TritonPackageSpec"]
