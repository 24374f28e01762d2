"""PromoteModelOperator: gathers the pipeline's candidates from XCom and runs the promote step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.promote import PromoteSpec

if TYPE_CHECKING:
    from airflow.sdk import Context


class PromoteModelOperator(ModelOptOperator):
    """Register every passing candidate as a version of ``registered_model_name`` (tagged with its
    lineage and metrics), move the ``<target>`` alias to the newest passing version of each target,
    and move ``champion`` to the policy winner only if it beats the current champion on the
    objective without a worse accuracy drop (else the winner becomes ``challenger``). Re-runs never
    register a candidate twice. Writes the candidate table and comparison plot on the DAG run's
    parent MLflow run.

    Candidates come either literally (``candidates=[...]``) or from the pipeline's tasks:
    ``candidate_tasks={target: {"chain": [build task ids, in order], "artifact": "onnx_model",
    "validate": task_id, "benchmark": task_id}}``. A target whose tasks failed or were skipped is a
    failing candidate with the reason; it is never registered. Runs with trigger rule
    ``all_done`` by default, so one failed branch does not stop the others from promoting. When no
    candidate passed, the task fails (not retried), naming each target's reason, so the DAG run
    fails too; with some failed targets it succeeds and the parent MLflow run says which failed.
    Copies of a promotion running at once register each candidate once (see the promote step).
    """

    spec_class = PromoteSpec

    def __init__(self, *, candidate_tasks: dict[str, dict[str, Any]] | None = None,
                 selected_targets: Any = None, source_model_uri: str | None = None, **kwargs: Any) -> None:
        self.candidate_tasks = candidate_tasks or {}
        self.selected_targets = selected_targets
        self.source_model_uri = source_model_uri
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)

    extra_template_fields = ("source_model_uri", "selected_targets")

    def _runtime_filled(self) -> tuple[str, ...]:
        return ("candidates",) if self.candidate_tasks else ()

    def build_spec(self, context: Context | None = None, *, mode: str = "local"):
        if self.candidate_tasks and context is not None:
            chosen = self.candidate_tasks
            if self.selected_targets:
                from airflow_modelopt.targets import parse_targets

                wanted = parse_targets(self.selected_targets)
                chosen = {t: v for t, v in self.candidate_tasks.items() if t in wanted}
            self.candidates = [self._collect(target, tasks, context["ti"]) for target, tasks in chosen.items()]
            if "candidates" not in self._spec_values_given:
                self._spec_values_given = (*self._spec_values_given, "candidates")
        return super().build_spec(context, mode=mode)

    def _collect(self, target: str, tasks: dict[str, Any], ti: Any) -> dict[str, Any]:
        """One candidate from its build chain, validation and benchmark results."""
        reasons: list[str] = []
        chain = []
        for task_id in tasks.get("chain", []):
            result = ti.xcom_pull(task_ids=task_id)
            if not result:
                reasons.append(f"build task {task_id} did not succeed")
                break
            chain.append({"task_id": task_id, "step": result.get("step"), "run_id": result.get("mlflow_run_id"),
                          "cache_key": result.get("cache_key"), "artifacts": result.get("artifacts", {})})
        model_uri = None
        if chain and not reasons:
            model_uri = chain[-1]["artifacts"].get(tasks.get("artifact", ""))
            if not model_uri:
                reasons.append(f"build task {chain[-1]['task_id']} has no artifact {tasks.get('artifact')!r}")
        metrics: dict[str, float] = {}
        run_ids = {c["task_id"]: c["run_id"] for c in chain if c["run_id"]}
        for role in ("validate", "benchmark"):
            task_id = tasks.get(role)
            if not task_id:
                continue
            result = ti.xcom_pull(task_ids=task_id)
            if not result:
                reasons.append(f"{role} task {task_id} did not succeed (see its log and MLflow run)")
                continue
            metrics.update({k: float(v) for k, v in result.get("metrics", {}).items()})
            run_ids[task_id] = result.get("mlflow_run_id")
            verdict = result.get("verdict")
            if verdict and not verdict.get("passed", False):
                reasons.extend(verdict.get("reasons") or [f"{role} verdict failed"])
        lineage = [{k: v for k, v in c.items() if k != "artifacts"} for c in chain]
        return {
            "target": target, "model_uri": model_uri, "passed": not reasons and model_uri is not None,
            "reasons": reasons, "metrics": metrics, "lineage": lineage, "run_ids": run_ids,
            "candidate_key": chain[-1]["cache_key"] if chain and not reasons else None,
            "source_model_uri": self.source_model_uri,
        }
