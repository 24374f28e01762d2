"""Step promote: register passing candidates in the MLflow Model Registry, move aliases by policy.

* Before anything is registered, every passing candidate's model is checked: its run exists (and
  is not deleted) and holds the artifact, or its ``models:/`` URI resolves. Anything missing fails
  the step (InputError, exit 2, not retried) naming each such candidate's target and what is
  missing, with nothing registered and no alias moved.
* Every passing candidate becomes a version of ``registered_model_name`` with a short Markdown
  description (target, verdict, the validation and benchmark figures, lineage, runs, tool
  versions) and a handful of tags to filter on (target, verdict, source model, lineage, DAG run,
  calibration data, the key metrics ``KEY_METRICS``); when the version is an MLflow logged model,
  every metric of the candidate goes on that model (MLflow 3's Models tab). A candidate is
  identified by its build step's cache key: a retried or re-run promotion finds the version it
  registered before and registers none.
* Alias ``<target>`` moves to the newest passing version of that target.
* ``champion`` moves to the policy winner (lowest objective among passing candidates) only if it
  beats the current champion on the objective without a worse accuracy drop; otherwise the
  winner gets ``challenger``. Aliases move only after every registration succeeded.
* A summary (Markdown and HTML table of every candidate, the comparison plot) goes on the DAG
  run's parent run and into the result.
* The outcome ends the DAG run's parent run: tags ``modelopt.outcome`` (all_passed, some_failed,
  none_passed, error) and ``modelopt.failed_targets``, metrics ``modelopt.candidates``,
  ``modelopt.candidates_passed`` and ``modelopt.candidates_failed``, the winner's
  ``modelopt.champion_*`` (or ``challenger_*``) latency, size, accuracy and drop, params
  (registered model, objective, targets), then FINISHED, or FAILED
  when nothing passed or promotion itself failed. No passing candidate fails the step (GateFailed,
  naming each target's reason), so the DAG run does not end green with nothing promoted.

Concurrency (several promotions of one registered model at once, e.g. copies of a DAG run):

* Registration is create-then-reconcile, without a lock. A promotion that finds no version with
  the candidate key creates one (its tags, the key among them, are written in the same database
  transaction as the version), then lists the versions carrying that key again and keeps the
  lowest version number; if its own is not that one, it deletes its own duplicate and uses the
  lowest. This is race-free because the registry assigns version numbers of one model in commit
  order (the SQL store locks the registered model's row while it computes max(version) + 1), so
  whoever sees a version also sees every lower one: all racers agree on the same lowest version,
  and its creator never deletes it.
* Alias moves (``<target>``, ``champion``, ``challenger``) read the current champion and write
  aliases: a read-modify-write, so they are serialised by a registry-side lock. The lock is a
  registered model ``<name>.modelopt-lock``: creating a registered model is atomic (its name is
  unique), so exactly one promotion holds it; it is deleted on release. It carries its holder and a
  lease (``modelopt.lease_expires``, epoch seconds); a promotion that died holding it blocks others
  only until the lease ends, after which the next one breaks it. The lease is far longer than
  the critical section (a few registry calls), so breaking a live lock needs a stalled holder.
"""

from __future__ import annotations

import html
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.tracking import digest
from airflow_modelopt.exceptions import GateFailed, InputError, StepFailed
from airflow_modelopt.specs.promote import OBJECTIVE_METRICS, Candidate, PromoteSpec
from airflow_modelopt.uris import logged_model_id, uri_scheme
from airflow_modelopt.version import __version__

TAG_KEY = "modelopt.candidate_key"
TAG_TARGET = "modelopt.target"
METRIC_TAG = "modelopt.metric."
TAG_OUTCOME = "modelopt.outcome"
TAG_FAILED_TARGETS = "modelopt.failed_targets"
LOCK_SUFFIX = ".modelopt-lock"
TAG_LOCK_HOLDER = "modelopt.lock_holder"
TAG_LEASE_EXPIRES = "modelopt.lease_expires"
LOCK_LEASE_S = 120.0
LOCK_WAIT_S = 600.0


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Optimized deployables built by airflow-modelopt")
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by a parallel promotion


def _versions_with_key(client: Any, name: str, key: str) -> list[Any]:
    """Versions of ``name`` carrying this candidate key, lowest version number first."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{TAG_KEY}` = '{key}'")
    return sorted(found, key=lambda v: int(v.version))


@contextmanager
def registry_lock(client: Any, name: str, log: Any, lease_s: float = LOCK_LEASE_S,
                  wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the registry-side lock of ``name`` (see the module docstring) while the body runs."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline, delay = time.monotonic() + wait_s, 0.1
    while True:
        try:
            client.create_registered_model(
                lock, tags={TAG_LOCK_HOLDER: holder, TAG_LEASE_EXPIRES: repr(time.time() + lease_s)},
                description=f"airflow-modelopt: held while a promotion moves the aliases of {name}")
            break
        except MlflowException as exc:
            # The server may also answer "does not exist" when a release races the create.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            current = client.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile
        other = current.tags.get(TAG_LOCK_HOLDER, "?")
        if other == holder:  # our create went through although its answer was an error
            break
        expired_for = time.time() - float(current.tags.get(TAG_LEASE_EXPIRES, "0"))
        if expired_for > 0:
            log.warning("Breaking the stale registry lock %s held by %s (its lease ended %.0f s ago)",
                        lock, other, expired_for)
            _release(client, lock, other)
            continue
        if time.monotonic() > deadline:
            raise StepFailed(f"registry lock {lock!r} is still held by {other} after waiting {wait_s:.0f} s; "
                             f"it expires in {-expired_for:.0f} s")
        time.sleep(delay + random.uniform(0, delay))
        delay = min(delay * 2, 2.0)
    try:
        yield
    finally:
        _release(client, lock, holder)


def _release(client: Any, lock: str, holder: str) -> None:
    """Delete the lock if ``holder`` still holds it; a lock already gone is fine."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_registered_model(lock).tags.get(TAG_LOCK_HOLDER) == holder:
            client.delete_registered_model(lock)
    except MlflowException:
        pass


#: MLflow error codes that mean "there is no such run, model or artifact".
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _has_entry(entries: list[Any], name: str) -> bool:
    return any(e.path.rstrip("/").rsplit("/", 1)[-1] == name for e in entries)


def _missing(client: Any, c: Candidate) -> str | None:
    """What of candidate ``c``'s model cannot be found, in words; None when it is all there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = str(c.model_uri)
    scheme = uri_scheme(uri)
    try:
        if scheme == "runs":
            run_id, _, path = uri[len("runs:/"):].partition("/")
            path = path.strip("/")
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code in _NOT_FOUND:
                    return f"its MLflow run {run_id} does not exist ({uri})"
                raise
            if run.info.lifecycle_stage == "deleted":
                return f"its MLflow run {run_id} was deleted ({uri})"
            parent, _, name = path.rpartition("/")
            if path and not _has_entry(client.list_artifacts(run_id, parent or None), name):
                return f"its MLflow run {run_id} has no artifact {path!r} ({uri})"
        elif scheme in ("models", "mlflow-artifacts"):
            if not mlflow.artifacts.list_artifacts(artifact_uri=uri):
                parent, _, name = uri.rstrip("/").rpartition("/")
                if scheme == "models" or not _has_entry(mlflow.artifacts.list_artifacts(artifact_uri=parent), name):
                    return f"{uri} holds no files"
        else:
            from pathlib import Path

            if not Path(uri[len("file://"):] if scheme == "file" else uri).exists():
                return f"{uri} does not exist"
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return f"{uri} cannot be found: {str(exc).splitlines()[0]}"
        raise
    return None


def check_candidates(client: Any, candidates: list[Candidate]) -> None:
    """Raise InputError naming every candidate whose model is missing (before anything is registered)."""
    missing = [(c.target, why) for c in candidates if (why := _missing(client, c)) is not None]
    if missing:
        raise InputError("candidates: nothing was registered, because "
                         + "; ".join(f"candidate {target!r}: {why}" for target, why in missing))


def _candidate_key(c: Candidate) -> str:
    if c.candidate_key:
        return c.candidate_key
    import hashlib

    return hashlib.sha256(f"{c.target}|{c.model_uri}".encode()).hexdigest()


#: The metrics kept as version tags, the ones people filter and sort versions on (the policy
#: reads the objective metrics and accuracy_drop of the champion from them). Every metric of the
#: candidate goes on its MLflow logged model instead, when it has one (the Models tab).
KEY_METRICS = ("accuracy_drop", "candidate_accuracy", "top1_agreement", "latency_ms_p50", "model_bytes")

#: The rows of a version's description table: metric -> label (the ones the candidate has).
DESCRIPTION_METRICS = {
    "candidate_accuracy": "accuracy", "reference_accuracy": "source model accuracy",
    "accuracy_drop": "accuracy drop", "top1_agreement": "top-1 agreement with the source",
    "max_abs_error": "max abs error vs source", "cosine_similarity": "cosine similarity vs source",
    "latency_ms_p50": "latency p50 (ms)", "latency_ms_p95": "latency p95 (ms)",
    "throughput_items_per_s": "throughput (items/s)", "peak_rss_mb": "peak memory (MB)", "model_bytes": "size",
}


def _lineage(c: Candidate) -> list[dict[str, Any]]:
    """The chain of steps without cache keys (64 hex each): what a person reads in the tag."""
    return [{k: v for k, v in step.items() if k != "cache_key"} for step in c.lineage]


def _version_tags(spec: PromoteSpec, c: Candidate, calibration_digest: str | None = None) -> dict[str, str]:
    """A handful of tags to filter on; the full story is the version's description."""
    ctx = spec.context
    metrics = {*KEY_METRICS, *OBJECTIVE_METRICS.values()}
    tags = {
        TAG_KEY: _candidate_key(c),
        TAG_TARGET: c.target,
        "modelopt.verdict": "passed" if c.passed else "failed",
        "modelopt.source_model_uri": c.source_model_uri or "",
        "modelopt.lineage": json.dumps(_lineage(c), sort_keys=True)[:4900],
        "airflow.dag_id": ctx.dag_id or "",
        "airflow.run_id": ctx.run_id or "",
        "modelopt.calibration_data_uri": spec.calibration_data_uri or "",
        "modelopt.calibration_data_sha256": calibration_digest or "",
    }
    tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in c.metrics.items() if k in metrics})
    return {k: v for k, v in tags.items() if v != ""}


def _human_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def version_description(spec: PromoteSpec, c: Candidate, calibration_digest: str | None = None) -> str:
    """A short Markdown description of a registered candidate: what it is, its verdict, the
    validation and benchmark figures, where it came from."""
    import mlflow

    ctx = spec.context
    lines = [f"**{c.target}**: {'passed' if c.passed else 'failed'} every gate"
             + (f", built from `{c.source_model_uri}`" if c.source_model_uri else ""), ""]
    rows = [(label, c.metrics[k]) for k, label in DESCRIPTION_METRICS.items() if k in c.metrics]
    if rows:
        lines += ["| measure | value |", "| --- | --- |"]
        lines += [f"| {label} | {_human_bytes(v) if label == 'size' else f'{v:.4g}'} |" for label, v in rows]
        lines.append("")
    chain = " → ".join(f"{step.get('task_id', '?').split('.')[-1]} ({step.get('step', '?')})" for step in c.lineage)
    if chain:
        lines.append(f"Lineage: {chain}.")
    runs = ", ".join(f"{task.split('.')[-1]} `{run}`" for task, run in c.run_ids.items() if run)
    if runs:
        lines.append(f"MLflow runs: {runs}.")
    if ctx.dag_id:
        lines.append(f"Airflow: DAG `{ctx.dag_id}`, run `{ctx.run_id}`.")
    if spec.calibration_data_uri:
        digest_note = f" (sha256 {calibration_digest[:12]}…)" if calibration_digest else ""
        lines.append(f"Calibration data: `{spec.calibration_data_uri}`{digest_note}.")
    lines.append(f"Built by airflow-modelopt {__version__} with MLflow {mlflow.__version__}.")
    return "\n".join(lines)[:4900]


def _logged_model_id(version: Any) -> str | None:
    """The MLflow logged model a version was registered from: its ``model_id``, else the id in its
    ``models:/<id>`` source (MLflow's SQL registry returns versions without ``model_id``)."""
    model_id = getattr(version, "model_id", None)
    return str(model_id) if model_id else logged_model_id(str(getattr(version, "source", "") or ""))


def _describe(client: Any, spec: PromoteSpec, c: Candidate, version: Any, run_id: str, log: Any,
              calibration_digest: str | None = None) -> None:
    """Give a version its description and, when it was registered from an MLflow logged model,
    the candidate's metrics that model does not have yet (the Models tab: a re-run, or the same
    model promoted into another registered model, adds no second point). Bookkeeping: a failure
    is logged, not raised."""
    from mlflow.entities import Metric

    try:
        if not (version.description or "").strip():
            client.update_model_version(spec.registered_model_name, version.version,
                                        description=version_description(spec, c, calibration_digest))
        model_id = _logged_model_id(version)
        if model_id and c.metrics:
            has = {m.key for m in client.get_logged_model(model_id).metrics or []}
            now = int(time.time() * 1000)
            missing = [Metric(k, float(v), now, 0, model_id=model_id) for k, v in sorted(c.metrics.items())
                       if k not in has]
            if missing:
                client.log_batch(run_id, metrics=missing)
    except Exception as exc:  # noqa: BLE001 - the registration and aliases matter more than this
        log.warning("%s: could not describe version %s: %s", c.target, version.version, exc)


def _register(client: Any, spec: PromoteSpec, c: Candidate, log: Any,
              calibration_digest: str | None = None) -> tuple[Any, bool]:
    """(model version, registered now?) — reuses the version a previous attempt registered."""
    import mlflow

    name = spec.registered_model_name
    key = _candidate_key(c)
    existing = _versions_with_key(client, name, key)
    if existing:
        log.info("%s: already registered as version %s (candidate key %s)", c.target, existing[0].version, key[:12])
        return existing[0], False
    if c.model_uri.startswith("runs:/"):
        # A plain artifact folder, not an MLflow logged model (candidates of steps from before every
        # deployable became one, or a user's own): register its resolved location, linked to its run.
        run_id, _, path = c.model_uri[len("runs:/"):].partition("/")
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path.strip("/")
        version = client.create_model_version(spec.registered_model_name, source, run_id=run_id,
                                              tags=_version_tags(spec, c, calibration_digest))
    else:
        version = mlflow.register_model(c.model_uri, spec.registered_model_name, tags=_version_tags(spec, c, calibration_digest),
                                        await_registration_for=300)
    keeper = _versions_with_key(client, name, key)[0]
    new = keeper.version == version.version
    if not new:  # a parallel promotion registered the same candidate first: drop our duplicate
        log.info("%s: a parallel promotion registered candidate key %s as version %s; deleting duplicate "
                 "version %s", c.target, key[:12], keeper.version, version.version)
        client.delete_model_version(name, version.version)
        version = keeper
    deadline = time.monotonic() + 300
    while version.status != "READY" and time.monotonic() < deadline:
        time.sleep(1)
        version = client.get_model_version(spec.registered_model_name, version.version)
    if version.status != "READY":
        raise StepFailed(f"{c.target}: model version {version.version} is {version.status}, not READY")
    if new:
        log.info("%s: registered version %s from %s", c.target, version.version, c.model_uri)
    return version, new


def _objective(c_metrics: dict[str, float], objective: str) -> float | None:
    value = c_metrics.get(OBJECTIVE_METRICS[objective])
    return None if value is None else float(value)


def _champion_metrics(client: Any, name: str) -> tuple[Any | None, dict[str, float]]:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, {}
    metrics = {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)}
    return version, metrics


def decide_champion(winner: dict[str, float], champion: dict[str, float] | None, objective: str,
                    tolerance: float) -> tuple[bool, str]:
    """Whether the winner replaces the champion, and why, in words."""
    metric = OBJECTIVE_METRICS[objective]
    if champion is None:
        return True, "no champion yet"
    new, old = winner.get(metric), champion.get(metric)
    if new is None:
        return False, f"the winner has no {metric}"
    if old is None:
        return True, f"the champion has no {metric} recorded"
    new_drop = winner.get("accuracy_drop", 0.0)
    old_drop = champion.get("accuracy_drop", 0.0)
    if new_drop > old_drop + tolerance:
        return False, f"accuracy drop {new_drop:.4f} is worse than the champion's {old_drop:.4f}"
    if new < old:
        return True, f"{metric} {new:.6g} beats the champion's {old:.6g}"
    return False, f"{metric} {new:.6g} does not beat the champion's {old:.6g}"


#: The summary table's columns: row key -> header a person reads.
TABLE_COLUMNS = {"target": "target", "verdict": "verdict", "version": "version", "aliases": "aliases",
                 "accuracy_drop": "accuracy drop", "candidate_accuracy": "accuracy",
                 "latency_ms_p50": "latency p50 (ms)", "model_bytes": "size", "reasons": "reasons"}


def _table(spec: PromoteSpec, rows: list[dict[str, Any]]) -> tuple[str, str]:
    cols = list(TABLE_COLUMNS)

    def cell(row: dict[str, Any], col: str) -> str:
        value = row.get(col)
        if col == "model_bytes" and isinstance(value, (int, float)):
            from airflow_modelopt.container.steps.benchmark import human_size

            return human_size(float(value))
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return "; ".join(str(v) for v in value)
        return "" if value is None else str(value)

    md = [f"# Candidates for `{spec.registered_model_name}` (objective: {spec.objective})", "",
          "| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r, c).replace("|", "/") for c in cols) + " |" for r in rows]
    head = "".join(f"<th>{html.escape(TABLE_COLUMNS[c])}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r, c))}</td>" for c in cols) + "</tr>" for r in rows)
    # Headers never wrap nor get cut: the reasons column takes what width is left.
    style = ("<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{white-space:nowrap;background:#f3f4f6}</style>")
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(spec.registered_model_name)}</title>{style}"
            f"</head><body><h1>Candidates for {html.escape(spec.registered_model_name)}</h1>"
            f"<table>{head and f'<tr>{head}</tr>'}{body}</table></body></html>")
    return "\n".join(md) + "\n", page


def _move_aliases(client: Any, spec: PromoteSpec, passing: list[Candidate], versions: dict[str, Any],
                  log: Any) -> tuple[dict[str, int], str]:
    """<target> -> this run's version of that target; champion/challenger by policy. Call under the lock."""
    name = spec.registered_model_name
    aliases: dict[str, int] = {}
    for target, version in versions.items():
        client.set_registered_model_alias(name, target, version.version)
        aliases[target] = int(version.version)
    ranked = [c for c in passing if _objective(c.metrics, spec.objective) is not None]
    if not ranked:
        raise InputError(
            f"candidates: no passing candidate has the objective metric {OBJECTIVE_METRICS[spec.objective]!r}; "
            "run the benchmark step for each target"
        )
    winner = min(ranked, key=lambda c: (_objective(c.metrics, spec.objective), c.metrics.get("accuracy_drop", 0.0)))
    champion_version, champion_metrics = _champion_metrics(client, name)
    wins, why = decide_champion(winner.metrics, champion_metrics if champion_version else None,
                                spec.objective, spec.accuracy_drop_tolerance)
    winner_version = versions[winner.target].version
    if champion_version is not None and champion_version.version == winner_version:
        wins, why = True, "the winner already is the champion"
    alias = "champion" if wins else "challenger"
    client.set_registered_model_alias(name, alias, winner_version)
    aliases[alias] = int(winner_version)
    decision = f"{winner.target} (version {winner_version}) -> {alias}: {why}"
    log.info("Policy: %s", decision)
    return aliases, decision


def _failure_reasons(failed: list[Candidate]) -> str:
    return "; ".join(f"{c.target}: {', '.join(c.reasons) or 'failed (no reason recorded)'}" for c in failed)


def _end_parent_run(ctx: StepContext, spec: PromoteSpec, failed: list[Candidate], outcome: str,
                    error: str | None = None, output: StepOutput | None = None) -> None:
    """Record the outcome on the DAG run's parent run and end it (FINISHED, or FAILED when nothing
    was promoted). Without a parent run, the tags and metrics go on this step's run."""
    from mlflow.entities import Metric, Param, RunTag

    client, target = ctx.client, ctx.parent_run_id or ctx.run_id
    total = len(spec.candidates)
    now = int(time.time() * 1000)
    metrics = [Metric("modelopt.candidates", float(total), now, 0),
               Metric("modelopt.candidates_passed", float(total - len(failed)), now, 0),
               Metric("modelopt.candidates_failed", float(len(failed)), now, 0)]
    tags = [RunTag(TAG_OUTCOME, outcome), RunTag(TAG_FAILED_TARGETS, _failure_reasons(failed)[:5000])]
    # The policy winner of this DAG run (champion, or challenger when it did not beat the champion).
    info = output.info if output is not None else {}
    aliases = info.get("aliases") or {}
    winner_version = aliases.get("champion", aliases.get("challenger"))
    winner = next((r for r in info.get("candidates", []) if winner_version is not None
                   and r.get("version") == winner_version), None)
    if winner:
        role = "champion" if "champion" in aliases else "challenger"
        metrics += [Metric(f"modelopt.{role}_{k}", float(winner[k]), now, 0)
                    for k in ("latency_ms_p50", "model_bytes", "accuracy_drop", "candidate_accuracy")
                    if winner.get(k) is not None]
        tags += [RunTag(f"modelopt.{role}", f"{winner['target']} (version {winner_version})"),
                 RunTag("modelopt.decision", str(info.get("decision", ""))[:5000])]
    params = [Param("registered_model_name", spec.registered_model_name), Param("objective", spec.objective),
              Param("targets", ",".join(c.target for c in spec.candidates)[:500])]
    if error:
        tags.append(RunTag("modelopt.promote_error", error[:5000]))
    try:
        client.log_batch(target, metrics=metrics, tags=tags)
        try:  # params are write-once: a re-run of promote for this DAG run finds them set
            client.log_batch(target, params=params)
        except Exception as exc:  # noqa: BLE001
            ctx.log.info("parameters of MLflow run %s already set: %s", target, exc)
        if ctx.parent_run_id:
            client.set_terminated(ctx.parent_run_id, "FINISHED" if outcome in ("all_passed", "some_failed") else "FAILED")
    except Exception as exc:  # noqa: BLE001 - the promotion's own outcome matters more than this bookkeeping
        ctx.log.error("could not record the outcome on MLflow run %s: %s", target, exc)


def run(spec: PromoteSpec, ctx: StepContext) -> StepOutput:
    passing = [c for c in spec.candidates if c.passed]
    failed = [c for c in spec.candidates if not c.passed]
    try:
        output = _promote(spec, ctx, passing)
    except BaseException as exc:  # a terminated promotion (SIGTERM) ends the DAG run's parent run too
        _end_parent_run(ctx, spec, failed, "error", f"{type(exc).__name__}: {exc}")
        raise
    if not passing:
        _end_parent_run(ctx, spec, failed, "none_passed")
        raise GateFailed(f"no candidate passed, nothing was promoted to {spec.registered_model_name!r}: "
                         f"{_failure_reasons(failed)}")
    if failed:
        ctx.log.warning("%d of %d candidates failed: %s", len(failed), len(spec.candidates), _failure_reasons(failed))
    _end_parent_run(ctx, spec, failed, "some_failed" if failed else "all_passed", output=output)
    return output


def _promote(spec: PromoteSpec, ctx: StepContext, passing: list[Candidate]) -> StepOutput:
    rows: list[dict[str, Any]] = []
    for c in spec.candidates:
        rows.append({"target": c.target, "verdict": "passed" if c.passed else "failed", "reasons": c.reasons,
                     **{k: c.metrics.get(k) for k in ("accuracy_drop", "candidate_accuracy", "latency_ms_p50", "model_bytes")}})
    plot_rows = [{"name": r["target"], "latency_ms": r["latency_ms_p50"], "size_bytes": r["model_bytes"],
                  "accuracy": r.get("candidate_accuracy")} for r in rows
                 if r.get("latency_ms_p50") is not None and r.get("model_bytes") is not None]
    # The comparison plot needs only the candidates' metrics: it is drawn and logged while the
    # registry work goes on (leaving the block waits for it, whatever happens).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelopt-plot") as drawing:
        plot = None
        if spec.write_summary and plot_rows:
            from airflow_modelopt.container.steps.benchmark import log_comparison_plot

            plot = drawing.submit(log_comparison_plot, ctx.client, ctx.parent_run_id or ctx.run_id, plot_rows)
        return _register_and_summarize(spec, ctx, passing, rows, plot)


def _register_and_summarize(spec: PromoteSpec, ctx: StepContext, passing: list[Candidate],
                            rows: list[dict[str, Any]], plot: Future[str] | None) -> StepOutput:
    client = ctx.client
    name = spec.registered_model_name
    by_target = {r["target"]: r for r in rows}
    for c in spec.candidates:
        if not c.passed:
            ctx.log.info("%s: not registered (%s)", c.target, "; ".join(c.reasons) or "failed")

    # 0. Every passing candidate's model exists, or nothing is registered.
    check_candidates(client, passing)

    # 1. Register (idempotent, race-free) every passing candidate; no alias moves until all are in.
    versions: dict[str, Any] = {}
    registered_now = 0
    if passing:
        _ensure_registered_model(client, name)
    calibration = ctx.input("calibration_data_uri")
    calibration_digest = digest(calibration) if calibration is not None else None
    for c in passing:
        version, new = _register(client, spec, c, ctx.log, calibration_digest)
        _describe(client, spec, c, version, ctx.run_id, ctx.log, calibration_digest)
        versions[c.target] = version
        registered_now += int(new)
        by_target[c.target]["version"] = int(version.version)

    # 2. Aliases, serialised with other promotions of this registered model.
    aliases: dict[str, int] = {}
    decision = "no passing candidate: no alias moved"
    if passing:
        with registry_lock(client, name, ctx.log):
            aliases, decision = _move_aliases(client, spec, passing, versions, ctx.log)
    for target in aliases:
        if target in by_target:
            by_target[target].setdefault("aliases", target)
    for alias in ("champion", "challenger"):
        if alias in aliases:
            for r in rows:
                if r.get("version") == aliases[alias]:
                    r["aliases"] = f"{r.get('aliases', '')}, {alias}".strip(", ")

    # 3. Summary on the parent run and in the result.
    markdown, page = _table(spec, rows)
    artifacts: dict[str, str] = {}
    summary_run = ctx.parent_run_id or ctx.run_id
    if spec.write_summary:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="modelopt-summary-") as tmp:
            outcome = f"{len(passing)} of {len(spec.candidates)} candidates passed"
            Path(tmp, "candidates.md").write_text(markdown + f"\nOutcome: {outcome}\n\nPolicy: {decision}\n")
            Path(tmp, "candidates.html").write_text(page)
            Path(tmp, "candidates.json").write_text(json.dumps({"rows": rows, "aliases": aliases, "decision": decision},
                                                               indent=2, default=str))
            client.log_artifacts(summary_run, tmp, "summary")
        artifacts["summary"] = f"runs:/{summary_run}/summary/candidates.md"
    if plot is not None:
        artifacts["comparison_plot"] = plot.result()
    print_table = markdown.splitlines()
    for line in print_table:
        ctx.log.info("%s", line)
    return StepOutput(
        artifacts=artifacts,
        metrics={"candidates": float(len(spec.candidates)), "passed": float(len(passing)),
                 "failed": float(len(spec.candidates) - len(passing)), "registered_now": float(registered_now)},
        info={"registered_model_name": name, "aliases": aliases, "decision": decision, "candidates": rows,
              "summary_markdown": markdown},
    )
