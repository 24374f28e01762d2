"""Print what the demo's DAG run left in MLflow: runs, metrics, artifacts, and how to look."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow import MlflowClient  # noqa: E402

DAG_ID = "modelopt_retrain_and_optimize"
SHOWN = ("eval_accuracy", "train_time_s", "export_time_s", "max_abs_error_batch_1", "max_abs_error_batch_7",
         "onnx_bytes", "size_ratio", "accuracy_drop", "top1_agreement", "latency_ms_p50", "model_bytes")


def _result(client: MlflowClient, run_id: str) -> dict:
    """A step run's result (modelopt/result.json): its artifacts' URIs and its info."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "modelopt/result.json", tmp)).read_text())


def main(airflow_home: str) -> int:
    db = Path(airflow_home, "modelopt", "mlflow.db").resolve()
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(DAG_ID)
    if exp is None:
        print(f"no experiment {DAG_ID!r} in {uri}", file=sys.stderr)
        return 1
    parent = client.search_runs([exp.experiment_id], "tags.`modelopt.role` = 'dag_run'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    print(f"\nMLflow store: {uri}")
    print(f"Parent run {parent.info.run_id}  (DAG run {parent.data.tags.get('airflow.run_id')})")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    promoted = None
    trained = None
    for run in children:
        tags = run.data.tags
        hit = " (cache hit)" if tags.get("modelopt.cache_hit") == "true" else ""
        print(f"  {tags.get('airflow.task_id'):<14} run {run.info.run_id}  {run.info.status}{hit}")
        for key in SHOWN:
            if key in run.data.metrics:
                print(f"      {key:<24} {run.data.metrics[key]:.6g}")
        for model in client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"):
            print(f"      logged model {model.name}: models:/{model.model_id}")
        if tags.get("modelopt.step") == "train_example" and run.info.status == "FINISHED":
            trained = _result(client, run.info.run_id)["artifacts"]
        if tags.get("modelopt.step") == "promote" and run.info.status == "FINISHED":
            promoted = _result(client, run.info.run_id)["info"]
    if promoted:
        print()
        print(promoted["summary_markdown"])
        print(f"Policy: {promoted['decision']}")
        print(f"Aliases of {promoted['registered_model_name']}: "
              + ", ".join(f"@{a} -> v{v}" for a, v in sorted(promoted["aliases"].items())))
        name = promoted["registered_model_name"]
        print(f"Load the champion: mlflow.pyfunc.load_model('models:/{name}@champion')  "
              f"(tracking URI {uri}); its files: mlflow.artifacts.download_artifacts('models:/{name}@champion')")
    if trained:
        print("\nTo optimize this model again from the Airflow UI (modelopt_optimize's trigger form), paste:")
        for field, key in (("Model URI", "model_pt2"), ("Calibration data URI", "calibration_data"),
                           ("Evaluation data URI", "eval_data")):
            print(f"  {field:<22} {trained[key]}")
    print("\nSee it in the MLflow UI:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
