"""Container side: run one step under its own nested MLflow run.

The order matters for "nothing partial": inputs are resolved and hashed first (bad input fails
before any run exists), then the cache is consulted, then the nested run is created, the step
works in a private temporary folder, and only a step that returned gets its result logged and
its run tagged ``modelopt.status=succeeded``. A failure leaves a FAILED run carrying the error,
which the cache never reuses; a terminated step (SIGTERM, ``StepTerminated``) a KILLED one tagged
``modelopt.status=killed``. Either way the temporary folder is removed.

When MLflow stops answering, the step's requests share one retry budget (``tracking.RetryBudget``)
and the step then exits 4 (TrackingUnavailable); its run is marked FAILED if the server answers
again in time, else by the task's next try (``tracking.close_abandoned_runs``).
"""

from __future__ import annotations

import importlib
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from airflow_modelopt import caching
from airflow_modelopt.container import tracking, trust
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.steps import STEP_MODULES
from airflow_modelopt.exceptions import ModelOptError
from airflow_modelopt.specs import StepResult, StepSpec, parse_spec

log = logging.getLogger("airflow_modelopt.container.runner")


class StepTerminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the step's own
    """The process was asked to stop (SIGTERM: Airflow killed the task, a pod or container is
    stopped). A BaseException, so that no step's ``except Exception`` swallows it."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"terminated by {name}: the task was killed or its container stopped")
        self.exit_code = 128 + signum


def step_module(step: str) -> Any:
    """The module of a registered step (``container/steps/__init__.py`` lists them)."""
    return importlib.import_module(STEP_MODULES[step])


def code_digest() -> str:
    """sha256 of the container side's source, the specs and the key's own module (``caching.py``):
    a code change invalidates the cache in local mode too, where no image digest tells versions apart."""
    return caching.code_digest()


def cache_key(spec: StepSpec, input_digests: dict[str, str]) -> str:
    """sha256 over the step, its parameters (inputs by content, not by URI), the code and image
    (``caching.cache_key``, the one the Airflow side's lookup computes too)."""
    return caching.cache_key(spec, input_digests)


def _tags(spec: StepSpec, key: str, parent: str | None) -> dict[str, str]:
    return caching.step_tags(spec, key, parent, caching.local_code_digest())


def run_step(step: str, raw_spec: dict[str, Any] | str) -> StepResult:
    """Validate, resolve inputs, consult the cache, run the step, and log its result."""
    started = time.monotonic()
    spec = parse_spec(step, raw_spec)
    uri = tracking.configure()
    tracking.wait_for_server(uri)
    try:
        return _run(spec, uri, started)
    except Exception as exc:
        error = _explained(uri, exc)
        if error is exc:
            raise
        raise error from exc


def _explained(uri: str, exc: BaseException) -> BaseException:
    """The error to report: an unexpected error while the last MLflow request got no answer is
    MLflow's unavailability (exit 4), not the step's failure."""
    if tracking.BUDGET.in_outage and isinstance(exc, Exception) and not isinstance(exc, ModelOptError):
        return tracking.unavailable(uri, exc)
    return exc


def _run(spec: StepSpec, uri: str, started: float) -> StepResult:
    from mlflow import MlflowClient

    step = spec.step
    client = MlflowClient(tracking_uri=uri)
    # Records the input digests (for the Airflow side's cache lookups of the steps that read these
    # inputs later: no download) while the step goes on; waited for before the step returns.
    # record_digest logs its failures, never raises.
    recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelopt-digests")
    try:
        with tempfile.TemporaryDirectory(prefix=f"modelopt-{step}-") as tmp:
            return _in_workdir(spec, uri, started, client, recorder, Path(tmp))
    finally:
        recorder.shutdown(wait=True)


def _in_workdir(spec: StepSpec, uri: str, started: float, client: Any, recorder: ThreadPoolExecutor,
                workdir: Path) -> StepResult:
    import mlflow

    step = spec.step
    experiment_id, parent, inputs, digests = _prepare(client, spec, workdir)
    key = cache_key(spec, digests)
    log.info("Cache key %s", key)
    recorder.submit(_record_digests, client, spec, digests)
    if spec.cacheable and not spec.context.force:
        hit = tracking.find_cached(client, experiment_id, key)
        if hit is not None:
            return _reuse(client, spec, experiment_id, parent, key, hit, started)
    module = step_module(step)  # after the cache decision: a hit never imports the step's frameworks
    run_name = spec.context.task_id or step
    run = client.create_run(experiment_id, run_name=run_name, tags=_tags(spec, key, parent))
    run_id = run.info.run_id
    log.info("MLflow run %s (parent %s) in experiment %s", run_id, parent, experiment_id)
    ctx = StepContext(spec, run_id, experiment_id, parent, workdir / "work", inputs, client)
    ctx.workdir.mkdir()
    try:
        ctx.log_params(_flatten(spec.params()))
        client.log_dict(run_id, json.loads(spec.model_dump_json()), "modelopt/spec.json")
        # Leaving the fluent run ends it (FINISHED, or FAILED on an error): only once its result
        # and status are logged, so no reader sees it finished without them.
        with mlflow.start_run(run_id=run_id):
            with trust.policy(spec.context.trust_model_code):
                output: StepOutput = module.run(spec, ctx)
            result = StepResult(
                step=step, mlflow_run_id=run_id, parent_run_id=parent, experiment_id=experiment_id,
                cache_key=key, artifacts=output.artifacts, metrics=output.metrics, info=output.info,
                verdict=output.verdict, duration_s=round(time.monotonic() - started, 3),
            )
            ctx.log_metrics(output.metrics)
            client.log_dict(run_id, result.model_dump(mode="json"), tracking.RESULT_ARTIFACT)
            client.set_tag(run_id, tracking.TAG_STATUS, "succeeded")
        return result
    except BaseException as exc:
        error = _explained(uri, exc)
        _mark_failed(client, run_id, error)
        if error is exc:
            raise
        raise error from exc


def _prepare(client: Any, spec: StepSpec, workdir: Path
             ) -> tuple[str, str | None, dict[str, Path], dict[str, str]]:
    """The experiment's id, the DAG run's parent run, the step's inputs fetched under ``workdir``
    and their content digests, by field. Independent MLflow requests, so they go out together: the
    experiment (then the parent run) lookup, closing what earlier tries left open (from the second
    try on), and each input's download and hash. Errors are raised in that order, inputs in the
    spec's order."""
    fields = [name for name in spec.input_fields if getattr(spec, name)]
    with ThreadPoolExecutor(max_workers=len(fields) + 3, thread_name_prefix="modelopt-fetch") as pool:
        experiment = pool.submit(tracking.ensure_experiment, client, spec.context.experiment_name)
        fetching = {name: pool.submit(_fetch_and_hash, getattr(spec, name), workdir / "inputs" / name, name)
                    for name in fields}
        parent = pool.submit(lambda: spec.context.parent_run_id or tracking.get_or_create_parent_run(
            client, experiment.result(), spec.context))
        closing = pool.submit(lambda: _close_abandoned_runs(client, experiment.result(), spec.context)) \
            if spec.context.try_number > 1 else None
        experiment_id = experiment.result()
        if closing is not None:
            closing.result()
        fetched = {name: future.result() for name, future in fetching.items()}
        return (experiment_id, parent.result(), {n: f[0] for n, f in fetched.items()},
                {n: f[1] for n, f in fetched.items()})


def _fetch_and_hash(uri: str, dest: Path, field: str) -> tuple[Path, str]:
    log.info("Fetching %s: %s", field, uri)
    path = tracking.fetch(uri, dest, field=field)
    return path, tracking.digest(path)


def _close_abandoned_runs(client: Any, experiment_id: str, ctx: Any) -> None:
    """Bookkeeping of earlier tries; it must not fail this one."""
    try:
        tracking.close_abandoned_runs(client, experiment_id, ctx)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not close runs earlier tries left RUNNING: %s", exc)


def _record_digests(client: Any, spec: StepSpec, digests: dict[str, str]) -> None:
    for name, value in digests.items():
        tracking.record_digest(client, getattr(spec, name), value)


def _reuse(client: Any, spec: StepSpec, experiment_id: str, parent: str | None, key: str, hit: Any,
           started: float) -> StepResult:
    """Record the cache hit as its own small run and return the original result."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=hit.info.run_id, artifact_path=tracking.RESULT_ARTIFACT)
    original = StepResult.model_validate(json.loads(Path(local).read_text()))
    tags = caching.reuse_tags(spec, key, parent, caching.local_code_digest(), hit.info.run_id, original, "step")
    run = client.create_run(experiment_id, run_name=caching.reuse_run_name(spec), tags=tags)
    log.info("Cache hit: reusing MLflow run %s (cache key %s); pass force=True to rebuild", hit.info.run_id, key)
    result = original.model_copy(update={
        "mlflow_run_id": run.info.run_id, "parent_run_id": parent, "cache_hit": True,
        "cached_from_run_id": hit.info.run_id, "duration_s": round(time.monotonic() - started, 3),
    })
    client.log_dict(run.info.run_id, result.model_dump(mode="json"), tracking.RESULT_ARTIFACT)
    client.set_terminated(run.info.run_id, "FINISHED")
    return result


def _mark_failed(client: Any, run_id: str, exc: BaseException) -> None:
    """Tag the run with the error and end it: KILLED for a terminated step, else FAILED. Within the
    retry budget left (a server that is down makes this fail fast; the next try closes the run)."""
    killed = isinstance(exc, (StepTerminated, KeyboardInterrupt))
    try:
        client.set_tag(run_id, tracking.TAG_STATUS, "killed" if killed else "failed")
        client.set_tag(run_id, tracking.TAG_ERROR, f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, "KILLED" if killed else "FAILED")
    except Exception as error:  # the original error matters more than the bookkeeping
        if tracking.BUDGET.in_outage:
            log.error("could not mark MLflow run %s as %s: MLflow is unreachable (%s); the task's next try "
                      "will close it", run_id, "killed" if killed else "failed", tracking.BUDGET.last_error)
        else:
            log.error("could not mark MLflow run %s as failed: %s", run_id, error)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return flat


__all__ = ["StepContext", "StepOutput", "StepTerminated", "cache_key", "run_step", "step_module"]
