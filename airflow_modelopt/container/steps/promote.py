"""Step promote: register passing candidates in the MLflow Model Registry, move aliases by policy.

* Every passing candidate becomes a version of ``registered_model_name``, tagged with its
  lineage (source model, target, chain of steps and their parameters, tool versions, DAG run)
  and its validation and benchmark metrics. A candidate is identified by its build step's cache
  key: a retried or re-run promotion finds the version it registered before and registers none.
* Alias ``<target>`` moves to the newest passing version of that target.
* ``champion`` moves to the policy winner (lowest objective among passing candidates) only if it
  beats the current champion on the objective without a worse accuracy drop; otherwise the
  winner gets ``challenger``. Aliases move only after every registration succeeded.
* A summary (Markdown and HTML table of every candidate, the comparison plot) goes on the DAG
  run's parent run and into the result.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.tracking import digest
from airflow_modelopt.exceptions import InputError, StepFailed
from airflow_modelopt.specs.promote import OBJECTIVE_METRICS, Candidate, PromoteSpec
from airflow_modelopt.version import __version__

TAG_KEY = "modelopt.candidate_key"
TAG_TARGET = "modelopt.target"
METRIC_TAG = "modelopt.metric."


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Optimized deployables built by airflow-modelopt")
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by a parallel promotion


def _find_version(client: Any, name: str, key: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{TAG_KEY}` = '{key}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _candidate_key(c: Candidate) -> str:
    if c.candidate_key:
        return c.candidate_key
    import hashlib

    return hashlib.sha256(f"{c.target}|{c.model_uri}".encode()).hexdigest()


def _version_tags(spec: PromoteSpec, c: Candidate, calibration_digest: str | None = None) -> dict[str, str]:
    import mlflow

    ctx = spec.context
    tags = {
        TAG_KEY: _candidate_key(c),
        TAG_TARGET: c.target,
        "modelopt.source_model_uri": c.source_model_uri or "",
        "modelopt.lineage": json.dumps(c.lineage, sort_keys=True)[:4900],
        "modelopt.tool_versions": json.dumps({"airflow-modelopt": __version__, "mlflow": mlflow.__version__}),
        "airflow.dag_id": ctx.dag_id or "",
        "airflow.run_id": ctx.run_id or "",
        "modelopt.calibration_data_uri": spec.calibration_data_uri or "",
        "modelopt.calibration_data_sha256": calibration_digest or "",
    }
    tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in c.metrics.items()})
    tags.update({f"modelopt.run.{k}": v for k, v in c.run_ids.items()})
    return {k: v for k, v in tags.items() if v != ""}


def _register(client: Any, spec: PromoteSpec, c: Candidate, log: Any,
              calibration_digest: str | None = None) -> tuple[Any, bool]:
    """(model version, registered now?) — reuses the version a previous attempt registered."""
    import mlflow

    key = _candidate_key(c)
    existing = _find_version(client, spec.registered_model_name, key)
    if existing is not None:
        log.info("%s: already registered as version %s (candidate key %s)", c.target, existing.version, key[:12])
        return existing, False
    if c.model_uri.startswith("runs:/"):
        # A plain artifact folder (a TFLite model, a TensorRT engine) is not an MLflow logged model:
        # register its resolved artifact location, linked to the run that made it.
        run_id, _, path = c.model_uri[len("runs:/"):].partition("/")
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path.strip("/")
        version = client.create_model_version(spec.registered_model_name, source, run_id=run_id,
                                              tags=_version_tags(spec, c, calibration_digest))
    else:
        version = mlflow.register_model(c.model_uri, spec.registered_model_name, tags=_version_tags(spec, c, calibration_digest),
                                        await_registration_for=300)
    deadline = time.monotonic() + 300
    while version.status != "READY" and time.monotonic() < deadline:
        time.sleep(1)
        version = client.get_model_version(spec.registered_model_name, version.version)
    if version.status != "READY":
        raise StepFailed(f"{c.target}: model version {version.version} is {version.status}, not READY")
    log.info("%s: registered version %s from %s", c.target, version.version, c.model_uri)
    return version, True


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


def _table(spec: PromoteSpec, rows: list[dict[str, Any]]) -> tuple[str, str]:
    cols = ["target", "verdict", "version", "aliases", "accuracy_drop", "candidate_accuracy", "latency_ms_p50",
            "model_bytes", "reasons"]

    def cell(row: dict[str, Any], col: str) -> str:
        value = row.get(col)
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, list):
            return "; ".join(str(v) for v in value)
        return "" if value is None else str(value)

    md = [f"# Candidates for `{spec.registered_model_name}` (objective: {spec.objective})", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r, c).replace("|", "/") for c in cols) + " |" for r in rows]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r, c))}</td>" for c in cols) + "</tr>" for r in rows)
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(spec.registered_model_name)}</title></head>"
            f"<body><h1>Candidates for {html.escape(spec.registered_model_name)}</h1>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table></body></html>")
    return "\n".join(md) + "\n", page


def run(spec: PromoteSpec, ctx: StepContext) -> StepOutput:
    client = ctx.client
    name = spec.registered_model_name
    passing = [c for c in spec.candidates if c.passed]
    rows: list[dict[str, Any]] = []
    for c in spec.candidates:
        rows.append({"target": c.target, "verdict": "passed" if c.passed else "failed", "reasons": c.reasons,
                     **{k: c.metrics.get(k) for k in ("accuracy_drop", "candidate_accuracy", "latency_ms_p50", "model_bytes")}})
    by_target = {r["target"]: r for r in rows}
    for c in spec.candidates:
        if not c.passed:
            ctx.log.info("%s: not registered (%s)", c.target, "; ".join(c.reasons) or "failed")

    # 1. Register (idempotent) every passing candidate; no alias moves until all are in.
    versions: dict[str, Any] = {}
    registered_now = 0
    if passing:
        _ensure_registered_model(client, name)
    calibration = ctx.input("calibration_data_uri")
    calibration_digest = digest(calibration) if calibration is not None else None
    for c in passing:
        version, new = _register(client, spec, c, ctx.log, calibration_digest)
        versions[c.target] = version
        registered_now += int(new)
        by_target[c.target]["version"] = int(version.version)

    # 2. Aliases: <target> -> newest passing version of that target; champion/challenger by policy.
    aliases: dict[str, int] = {}
    for target, version in versions.items():
        client.set_registered_model_alias(name, target, version.version)
        aliases[target] = int(version.version)
    decision = "no passing candidate: no alias moved"
    if passing:
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
        ctx.log.info("Policy: %s", decision)
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
            Path(tmp, "candidates.md").write_text(markdown + f"\nPolicy: {decision}\n")
            Path(tmp, "candidates.html").write_text(page)
            Path(tmp, "candidates.json").write_text(json.dumps({"rows": rows, "aliases": aliases, "decision": decision},
                                                               indent=2, default=str))
            client.log_artifacts(summary_run, tmp, "summary")
        artifacts["summary"] = f"runs:/{summary_run}/summary/candidates.md"
        plot_rows = [{"name": r["target"], "latency_ms": r["latency_ms_p50"], "size_bytes": r["model_bytes"],
                      "accuracy": r.get("candidate_accuracy")} for r in rows
                     if r.get("latency_ms_p50") is not None and r.get("model_bytes") is not None]
        if plot_rows:
            from airflow_modelopt.container.steps.benchmark import log_comparison_plot

            artifacts["comparison_plot"] = log_comparison_plot(client, summary_run, plot_rows)
    print_table = markdown.splitlines()
    for line in print_table:
        ctx.log.info("%s", line)
    return StepOutput(
        artifacts=artifacts,
        metrics={"candidates": float(len(spec.candidates)), "passed": float(len(passing)),
                 "registered_now": float(registered_now)},
        info={"registered_model_name": name, "aliases": aliases, "decision": decision, "candidates": rows,
              "summary_markdown": markdown},
    )
