"""Spec of the promotion step: register passing candidates, move aliases by policy."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec, _Strict

#: What the champion minimizes among passing candidates, and the metric each objective reads.
OBJECTIVE_METRICS = {"latency_p50": "latency_ms_p50", "size": "model_bytes"}
Objective = Literal["latency_p50", "size"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_TARGET = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
RESERVED_ALIASES = ("champion", "challenger")


class Candidate(_Strict):
    """One built deployable with its verdict and measurements, as the pipeline collected them."""

    target: str = Field(description="Target name, e.g. onnx_int8_static; also the alias it moves")
    model_uri: ArtifactUri | None = Field(None, description="The candidate artifact (None when its build failed)")
    passed: bool = Field(description="Every gate passed (validation verdict, benchmark targets when enforced)")
    reasons: list[str] = Field(default_factory=list, description="Why it failed, gate by gate")
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation and benchmark metrics")
    candidate_key: str | None = Field(None, description="Cache key of the build step: the candidate's identity")
    source_model_uri: str | None = None
    lineage: list[dict[str, Any]] = Field(default_factory=list, description="The chain of steps and their params")
    run_ids: dict[str, str] = Field(default_factory=dict, description="MLflow run of each step: build, validate, benchmark")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if not _TARGET.match(value) or value in RESERVED_ALIASES:
            raise ValueError(f"target {value!r} must be lower_snake_case and not {' or '.join(RESERVED_ALIASES)}")
        return value

    @model_validator(mode="after")
    def _passing_needs_model(self) -> Candidate:
        if self.passed and not self.model_uri:
            raise ValueError(f"candidate {self.target!r} passed but has no model_uri")
        return self


class PromoteSpec(StepSpec):
    """Register every passing candidate in the MLflow Model Registry and move aliases by policy."""

    cacheable: ClassVar[bool] = False  # every DAG run promotes and closes its own parent run

    image_family: ClassVar[str] = "base"
    input_fields: ClassVar[tuple[str, ...]] = ("calibration_data_uri",)

    step: Literal["promote"] = "promote"
    registered_model_name: str = Field(description="Registered model the candidates become versions of")
    candidates: list[Candidate] = Field(min_length=1, description="Every candidate of the DAG run, passing or not")
    calibration_data_uri: ArtifactUri | None = Field(
        None, description="Calibration data the candidates were built with; its content digest tags every version"
    )
    objective: Objective = Field("latency_p50", description="What the champion minimizes: latency_p50 or size")
    accuracy_drop_tolerance: float = Field(
        0.0, ge=0, le=1,
        description="How much larger an accuracy drop than the champion's a new champion may have",
    )
    write_summary: bool = Field(True, description="Log the candidate table and comparison plot on the parent run")

    @field_validator("registered_model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-200 characters: letters, digits, '_', '-', '.', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _unique_targets(self) -> PromoteSpec:
        seen: set[str] = set()
        for c in self.candidates:
            if c.target in seen:
                raise ValueError(f"candidates: target {c.target!r} appears twice")
            seen.add(c.target)
        return self
