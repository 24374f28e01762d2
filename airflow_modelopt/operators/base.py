"""The operator every step shares: spec building, validation and the choice of execution mode.

A step operator is one line of configuration (see ``operators/__init__.py``): its spec class.
The spec's fields become the operator's keyword arguments and template fields, so a field is
described once, in ``specs.py``, and the operator, the container and the docs agree on it.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from pydantic import TypeAdapter, ValidationError

from airflow_modelopt import config
from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.hooks.mlflow import MlflowHook, TrackingConfig
from airflow_modelopt.operators import worker_cache
from airflow_modelopt.operators.launchers import LAUNCHERS, Launcher, LaunchRequest, TrackingUnavailableError
from airflow_modelopt.operators.links import LINKS_ATTR, MlflowRegisteredModelLink, MlflowRunLink, step_links, ui_base
from airflow_modelopt.specs import RunContext, StepResult, StepSpec, format_validation_error
from airflow_modelopt.uris import check_experiment_name

if TYPE_CHECKING:
    from airflow.sdk import Context

_COMMON_TEMPLATE_FIELDS = ("execution_mode", "image", "experiment_name", "force")


def _is_templated(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(_is_templated(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_templated(v) for v in value)
    return False


def _coerce_rendered(value: Any) -> Any:
    """A Jinja-rendered list or dict arrives as its repr; turn it back into the object."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, str) and value.strip() in ("None", ""):
        return None
    return value


class ModelOptOperator(BaseOperator):
    """Runs one airflow-modelopt step in the chosen execution mode and returns its result.

    Common arguments (every step operator takes these besides its spec fields):

    :param execution_mode: ``local``, ``docker`` or ``kubernetes``; default ``[modelopt] execution_mode``.
    :param image: image reference for docker/kubernetes; default from ``[modelopt]`` image options.
    :param mlflow_conn_id: Airflow connection of the MLflow tracking server (default ``mlflow_default``).
    :param experiment_name: MLflow experiment; default the DAG id.
    :param force: run even when a finished MLflow run with the same cache key exists.
    :param trust_model_code: let the step unpickle objects that run code from model files (a .pt2
        holding pickled objects, an MLflow pytorch model saved with pickle). Only for trusted
        sources; default ``[modelopt] trust_model_code`` (False). See docs/security.md.
    :param python: interpreter for local mode (default: ``[modelopt] local_python``, else this one).
    :param docker_kwargs: extra DockerOperator arguments (mem_limit, device_requests, ...).
    :param kubernetes_kwargs: extra KubernetesPodOperator arguments (container_resources,
        node_selector, tolerations, affinity, ...).
    :param retries: Airflow's; when neither it nor ``default_args`` sets it, a step that could not
        reach MLflow (exit code 4) is retried ``[modelopt] transient_failure_retries`` times with
        exponential backoff, and any other failure fails the task as Airflow's default would.
    """

    spec_class: ClassVar[type[StepSpec]]
    _spec_fields: ClassVar[tuple[str, ...]] = ()
    template_fields = _COMMON_TEMPLATE_FIELDS
    ui_color = "#dbeafe"
    #: A button on the task's page to its MLflow run (see operators/links.py); promote adds one to
    #: the registered model.
    operator_extra_links = (MlflowRunLink(),)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec_class")
        if spec is None:
            return
        fields = tuple(spec.user_fields())
        clashes = [f for f in fields if f in _COMMON_TEMPLATE_FIELDS or hasattr(BaseOperator, f)]
        if clashes:
            raise TypeError(f"{spec.__name__} fields clash with operator attributes: {clashes}")
        cls._spec_fields = fields
        if spec.step_name() == "promote":
            cls.operator_extra_links = (MlflowRunLink(), MlflowRegisteredModelLink())
        cls.template_fields = (*fields, *_COMMON_TEMPLATE_FIELDS, *getattr(cls, "extra_template_fields", ()))
        lines = [f"{cls.__doc__ or spec.__doc__ or ''}".rstrip(), "", f"Step ``{spec.step_name()}`` "
                 f"(image family ``{spec.image_family}``). Spec fields, all templated:", ""]
        for name, info in spec.user_fields().items():
            default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
            lines.append(f":param {name}: {info.description or ''} ({default})")
        cls.__doc__ = "\n".join(lines) + "\n\n" + (ModelOptOperator.__doc__ or "").split("Common arguments", 1)[-1]

    def __init__(
        self,
        *,
        execution_mode: str | None = None,
        image: str | None = None,
        mlflow_conn_id: str | None = None,
        experiment_name: str | None = None,
        force: bool = False,
        python: str | None = None,
        trust_model_code: bool | None = None,
        docker_kwargs: dict[str, Any] | None = None,
        kubernetes_kwargs: dict[str, Any] | None = None,
        retries: int | None = None,
        retry_exponential_backoff: float | None = None,
        **kwargs: Any,
    ) -> None:
        spec_values = {name: kwargs.pop(name) for name in self._spec_fields if name in kwargs}
        # Named here, not left in **kwargs, so that default_args fill them at this level: None
        # means neither the task nor its DAG set them.
        transient_retries = config.get_int("transient_failure_retries") if retries is None else 0
        if retries is not None:
            kwargs["retries"] = retries
        if retry_exponential_backoff is not None:
            kwargs["retry_exponential_backoff"] = retry_exponential_backoff
        super().__init__(**kwargs)
        #: The retries the task has for any failure; more may be added for transient ones only.
        self.own_retries = int(self.retries or 0)
        if transient_retries > self.own_retries:
            self.retries = transient_retries
            if retry_exponential_backoff is None:
                self.retry_exponential_backoff = 2.0
        self._spec_values_given = tuple(spec_values)
        for name in self._spec_fields:  # every template field must exist; unset ones stay None
            setattr(self, name, spec_values.get(name))
        self.execution_mode = execution_mode
        self.image = image
        self.mlflow_conn_id = mlflow_conn_id
        self.experiment_name = experiment_name
        self.force = force
        self.python = python
        self.trust_model_code = trust_model_code
        self.docker_kwargs = dict(docker_kwargs or {})
        self.kubernetes_kwargs = dict(kubernetes_kwargs or {})
        self._launcher: Launcher | None = None
        self._check_literal_arguments()

    # -- validation -------------------------------------------------------------------------

    def _spec_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._spec_values_given}

    def _check_literal_arguments(self) -> None:
        """Refuse bad literal arguments at DAG parse time; templated ones wait for rendering."""
        prefix = f"{type(self).__name__} {self.task_id!r}: "
        if self.execution_mode and not _is_templated(self.execution_mode):
            try:
                config.resolve_execution_mode(self.execution_mode)
            except SpecError as exc:
                raise ValueError(prefix + str(exc)) from None
        if self.experiment_name and not _is_templated(self.experiment_name):
            try:
                check_experiment_name(self.experiment_name)
            except ValueError as exc:
                raise ValueError(f"{prefix}experiment_name: {exc}") from None
        values = self._spec_values()
        templated = {k for k, v in values.items() if _is_templated(v)}
        if not templated and not self._runtime_filled():
            try:
                self.spec_class.model_validate({**values, "step": self.spec_class.step_name()})
            except ValidationError as exc:
                raise ValueError(format_validation_error(exc, prefix=prefix)) from None
            return
        fields = self.spec_class.user_fields()
        for name, value in values.items():
            if name in templated:
                continue
            info = fields[name]
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            adapter = TypeAdapter(annotation)  # type: ignore[misc]
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"{prefix}invalid spec: {name}: {first['msg']} (got {value!r})") from None
        missing = [n for n, i in fields.items()
                   if i.is_required() and n not in values and n not in self._runtime_filled()]
        if missing:
            raise ValueError(f"{prefix}missing required argument(s): {', '.join(missing)}")

    def _runtime_filled(self) -> tuple[str, ...]:
        """Required spec fields an operator fills itself at run time (from XCom, say)."""
        return ()

    def build_spec(self, context: Context | None = None, *, mode: str = "local") -> StepSpec:
        """The validated spec from rendered fields, with the run context filled in."""
        values = {k: _coerce_rendered(v) for k, v in self._spec_values().items()}
        try:
            ctx = self._run_context(context, mode)
            return self.spec_class.model_validate(
                {**values, "step": self.spec_class.step_name(), "context": ctx.model_dump()}
            )
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, prefix=f"{type(self).__name__} {self.task_id!r}: ")) from None

    def _run_context(self, context: Context | None, mode: str) -> RunContext:
        ti = context.get("ti") if context else None
        dag_run = context.get("dag_run") if context else None
        logical_date = context.get("logical_date") if context else None
        dag_id = getattr(ti, "dag_id", None) or (self.dag_id if self.has_dag() else None)
        force = self.force if isinstance(self.force, bool) else str(self.force).lower() in ("1", "true", "yes")
        return RunContext(
            dag_id=dag_id,
            run_id=getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None),
            task_id=self.task_id,
            try_number=int(getattr(ti, "try_number", 1) or 1),
            logical_date=logical_date.isoformat() if logical_date is not None else None,
            execution_mode=mode,
            experiment_name=self.experiment_name or dag_id or "airflow-modelopt",
            force=force,
            trust_model_code=(config.get_bool("trust_model_code") if self.trust_model_code is None
                              else bool(self.trust_model_code)),
        )

    # -- execution --------------------------------------------------------------------------

    @cached_property
    def mlflow_hook(self) -> MlflowHook:
        return MlflowHook(self.mlflow_conn_id or config.get("mlflow_conn_id"))

    def launch_request(self, spec: StepSpec, tracking: TrackingConfig) -> LaunchRequest:
        """What the launcher gets: the validated spec and this task's rendered arguments."""
        image = _coerce_rendered(self.image)
        return LaunchRequest(
            task_id=self.task_id, spec=spec, tracking=tracking, image=str(image) if image else None,
            python=self.python or None, docker_kwargs=self.docker_kwargs, kubernetes_kwargs=self.kubernetes_kwargs,
        )

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the step. Only an unreachable MLflow (exit 4) rides on the retries added for transient
        failures; any other error is retried only as often as the task's own ``retries`` allow."""
        try:
            return self._execute(context)
        except (AirflowFailException, AirflowSkipException, TrackingUnavailableError):
            raise
        except Exception as exc:
            if self._own_retries_spent(context):
                raise AirflowFailException(f"{exc}\n(no retry left: the task's retries are {self.own_retries}; "
                                           "only an unreachable MLflow is retried beyond them)") from exc
            raise

    def _execute(self, context: Context) -> dict[str, Any]:
        try:
            mode = config.resolve_execution_mode(self.execution_mode)
            spec = self.build_spec(context, mode=mode)
        except SpecError as exc:
            raise AirflowFailException(str(exc)) from None
        tracking = self.mlflow_hook.tracking_config()
        try:
            retry_budget = str(config.get_int("mlflow_retry_budget"))
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        tracking = dataclasses.replace(tracking, public_env={
            "MODELOPT_MLFLOW_CONNECT_RETRIES": config.get("mlflow_connect_retries"),
            "MODELOPT_MLFLOW_RETRY_BUDGET": retry_budget, **tracking.public_env})
        self.log.info(
            "Running step %s in %s mode; MLflow: %s (%s)", spec.step, mode, tracking.tracking_uri, tracking.source
        )
        self._launcher = LAUNCHERS[mode](self.launch_request(spec, tracking), self.log)
        self._launcher.prepare()
        result = self._worker_cache_hit(spec, tracking, self._launcher)
        if result is None:
            result = self._launcher.launch(context)
        self.log.info(
            "Step %s %s: MLflow run %s, cache key %s", spec.step,
            "reused a cached run" if result.cache_hit else "finished", result.mlflow_run_id, result.cache_key[:16],
        )
        for name, uri in sorted(result.artifacts.items()):
            self.log.info("  artifact %s: %s", name, uri)
        for name, value in sorted(result.metrics.items()):
            self.log.info("  metric %s = %.6g", name, value)
        output = result.model_dump(mode="json")
        setattr(self, LINKS_ATTR, step_links(ui_base(tracking.tracking_uri, self._ui_url()), output))
        return output

    def _worker_cache_hit(self, spec: StepSpec, tracking: TrackingConfig, launcher: Launcher) -> StepResult | None:
        """The cached result, found and recorded on this worker without starting a step process;
        None (the step is launched and decides) whenever that cannot be done for certain."""
        if not spec.cacheable or spec.context.force:
            return None
        known = launcher.known_image()
        if known is None:
            self.log.info("Cache lookup on the worker skipped: the %s image's content is not known before it "
                          "runs; the step looks itself", spec.context.execution_mode)
            return None
        image, digest = known
        if image is not None:
            spec = spec.model_copy(update={"context": spec.context.model_copy(
                update={"image": image, "image_digest": digest})})
        python = getattr(launcher, "python", None)
        try:
            cache = worker_cache.WorkerCache(worker_cache.MlflowRest(tracking), self.log)
            return cache.lookup(spec, python=python() if callable(python) else None,
                                environ={**os.environ, **launcher.request.tracking.public_env})
        except worker_cache.Uncertain as exc:
            self.log.info("Cache lookup on the worker: %s; starting the step", exc)
        except Exception as exc:  # noqa: BLE001 - the lookup only saves work: the step does it right
            self.log.warning("Cache lookup on the worker failed (%s: %s); starting the step", type(exc).__name__, exc)
        return None

    def _ui_url(self) -> str | None:
        """The MLflow UI people reach (connection extra ``ui_url``), when it differs from the tracking URI."""
        try:
            extra = self.mlflow_hook.get_connection(self.mlflow_hook.mlflow_conn_id).extra_dejson or {}
        except Exception:  # noqa: BLE001 - no connection: the embedded store, which has no UI to link to
            return None
        return extra.get("ui_url") or None

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Rendering runs before ``execute``: a template that fails (an upstream task left no XCom)
        is not a transient failure, so it must not ride on the retries added for exit 4."""
        try:
            super().render_template_fields(context, jinja_env)
        except (AirflowFailException, AirflowSkipException):
            raise
        except Exception as exc:
            if self._own_retries_spent(context):
                raise AirflowFailException(f"{type(self).__name__} {self.task_id!r}: a templated argument did not "
                                           f"render: {type(exc).__name__}: {exc}") from exc
            raise

    def _own_retries_spent(self, context: Context) -> bool:
        """True when Airflow would retry only because of the retries added for transient failures."""
        if self.retries is None or self.retries <= self.own_retries:
            return False
        ti = context.get("ti")
        return int(getattr(ti, "try_number", 1) or 1) > self.own_retries

    def on_kill(self) -> None:
        if self._launcher is not None:
            self._launcher.kill()
