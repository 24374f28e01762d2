"""Spec of the ``benchmark`` step: a model's latency, throughput, peak memory and size on this machine.

The model format and image family rules are those of ``specs/formats.py`` (see ``specs/validate.py``).
This module imports only pydantic, so both sides can use it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec
from airflow_modelopt.specs.formats import (
    BatchSize,
    Device,
    ModelFormat,
    family_for,
    pick_family,
)


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
        family = family_for(self.model_uri, self.model_format)
        return {family} if family else set()

    def resolved_image_family(self) -> str:
        return pick_family(self.image_families(), self.image_family)


__all__ = ["BenchmarkSpec"]
