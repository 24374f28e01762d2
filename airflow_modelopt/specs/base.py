"""The envelope every step spec shares, and the step result.

The Airflow side builds a spec from an operator's rendered fields and validates it before it
launches anything; the container side validates the same JSON again before it does any work.
The result is what a step prints as its last stdout line and what XCom carries between tasks.

This module imports only pydantic, so both sides can use it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.uris import check_artifact_uri, check_experiment_name

SPEC_VERSION = 1

#: ONNX opsets the torch_to_onnx step accepts. torch.onnx's dynamo exporter starts at 18 and
#: down-converts to 17; the top is what onnx 1.18+ and onnxruntime 1.20+ both implement.
MIN_OPSET = 17
MAX_OPSET = 23

ExecutionMode = Literal["local", "docker", "kubernetes"]
EXECUTION_MODES: tuple[str, ...] = ("local", "docker", "kubernetes")

ArtifactUri = Annotated[str, AfterValidator(check_artifact_uri)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunContext(_Strict):
    """Where a step runs and what it belongs to. The operator fills this in, never the user."""

    dag_id: str | None = None
    run_id: str | None = Field(None, description="Airflow DAG run id")
    task_id: str | None = None
    try_number: int = Field(1, ge=0)
    logical_date: str | None = None
    execution_mode: ExecutionMode = "local"
    image: str | None = Field(None, description="Image the step runs in (docker and kubernetes modes)")
    image_digest: str | None = Field(None, description="Content digest of that image")
    experiment_name: Annotated[str, AfterValidator(check_experiment_name)] = "airflow-modelopt"
    parent_run_id: str | None = Field(None, description="MLflow run of the DAG run")
    force: bool = Field(False, description="Run even if a finished run with the same cache key exists")
    trust_model_code: bool = Field(
        False, description="Let loaders unpickle objects that run code from model files (trusted sources only; "
        "operator argument trust_model_code or [modelopt] trust_model_code)"
    )


class StepSpec(_Strict):
    """Base of every step's spec. Subclasses add the step's own fields."""

    #: Every concrete spec, by step name.
    registry: ClassVar[dict[str, type[StepSpec]]] = {}
    #: Image family the step runs in: images/<family>/Dockerfile.
    image_family: ClassVar[str] = "base"
    #: Fields holding artifact URIs whose content feeds the cache key.
    input_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether results depend on the machine (benchmarks): the hardware joins the cache key.
    cache_per_machine: ClassVar[bool] = False
    #: Whether a finished run with the same cache key may stand in for this one. Not for steps
    #: whose effect is outside their run (promotion moves aliases and ends the DAG run's parent run).
    cacheable: ClassVar[bool] = True

    spec_version: Literal[1] = SPEC_VERSION
    step: str
    context: RunContext = Field(default_factory=RunContext)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        step_field = cls.model_fields.get("step")
        if step_field is not None and isinstance(step_field.default, str):
            StepSpec.registry[step_field.default] = cls

    def resolved_image_family(self) -> str:
        """The image family this spec needs; specs whose models decide it (validate, benchmark,
        prune) override this. Docker and Kubernetes modes pick the image from it."""
        return self.image_family

    @classmethod
    def step_name(cls) -> str:
        return cls.model_fields["step"].default

    @classmethod
    def user_fields(cls) -> dict[str, Any]:
        """The fields a user sets: everything but the envelope (version, step, context)."""
        return {k: v for k, v in cls.model_fields.items() if k not in ("spec_version", "step", "context")}

    def params(self) -> dict[str, Any]:
        """The user fields as JSON-able values: what the cache key and MLflow params are made of."""
        return self.model_dump(mode="json", include=set(self.user_fields()))


# --------------------------------------------------------------------------------------------
# Result


class Verdict(_Strict):
    passed: bool
    reasons: list[str] = Field(default_factory=list)


class StepResult(_Strict):
    """What a step returns: printed as the last stdout line, carried by XCom."""

    spec_version: Literal[1] = SPEC_VERSION
    step: str
    mlflow_run_id: str
    parent_run_id: str | None = None
    experiment_id: str | None = None
    cache_key: str
    cache_hit: bool = False
    cached_from_run_id: str | None = None
    artifacts: dict[str, str] = Field(default_factory=dict, description="Output name -> artifact URI")
    metrics: dict[str, float] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict, description="Small JSON facts: signatures, layouts")
    verdict: Verdict | None = None
    duration_s: float = 0.0

    def to_line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)


# --------------------------------------------------------------------------------------------
# Helpers


def spec_class_for(step: str) -> type[StepSpec]:
    try:
        return StepSpec.registry[step]
    except KeyError:
        known = ", ".join(sorted(StepSpec.registry))
        raise SpecError(f"unknown step {step!r}; known steps: {known}") from None


def format_validation_error(err: ValidationError, *, prefix: str = "") -> str:
    """One line per problem, each naming the field, what was expected and what was given."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of this step's spec)"
        given = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{loc}: {msg}{shown}")
    head = f"{prefix}invalid {err.title} spec" if prefix or err.title else "invalid spec"
    return head + ":\n  " + "\n  ".join(lines)


def parse_spec(step: str, raw: dict[str, Any] | str) -> StepSpec:
    """Validate raw JSON (dict or text) as the spec of ``step``; raise SpecError naming each field."""
    cls = spec_class_for(step)
    try:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec must be a JSON object, got {type(data).__name__}")
    data.setdefault("step", step)
    if data["step"] != step:
        raise SpecError(f"spec is for step {data['step']!r} but step {step!r} was asked to run")
    if data.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
        raise SpecError(
            f"spec_version {data.get('spec_version')!r} is not supported by this image "
            f"(it understands version {SPEC_VERSION}); use images matching the provider's version"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc)
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            from airflow_modelopt.version import __version__

            message += (f"\n(this is airflow-modelopt {__version__}; if the Airflow side runs a newer provider, "
                        "rebuild or update the step images to match it)")
        raise SpecError(message) from None
