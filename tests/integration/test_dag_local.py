"""The example DAG under `airflow dags test`, local mode, against a real MLflow server:
train -> export to ONNX -> validate -> benchmark -> promote (target onnx_fp32 only, to stay quick)."""

from __future__ import annotations

import json

import pytest

DAG_ID = "modelopt_retrain_and_optimize"
STEP_TASKS = {"train", "optimize.export_onnx", "optimize.validate_onnx_fp32", "optimize.benchmark_onnx_fp32",
              "optimize.promote"}


def dag_conf(**extra) -> str:
    return json.dumps({"epochs": 6, "targets": ["onnx_fp32"], "registered_model_name": "digits-dag-test", **extra})


def step_runs_of_latest_dag_run(client, experiment_name: str) -> tuple[object, dict[str, object]]:
    exp = client.get_experiment_by_name(experiment_name)
    assert exp is not None, f"no MLflow experiment {experiment_name!r}"
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`modelopt.role` = 'dag_run'",
                                 order_by=["attributes.start_time DESC"])
    assert parents, "no parent run for the DAG run"
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.data.tags["airflow.task_id"]: c for c in children}


@pytest.fixture(scope="module")
def local_dag_run(airflow_home):
    proc = airflow_home.run("dags", "test", DAG_ID, "-c", dag_conf())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_dag_run_has_one_parent_and_a_nested_run_per_task(local_dag_run, mlflow_server):
    parent, steps = step_runs_of_latest_dag_run(mlflow_server.client(), DAG_ID)
    assert parent.data.tags["airflow.dag_id"] == DAG_ID
    assert parent.data.tags["airflow.run_id"].startswith("manual__")
    assert "airflow.logical_date" in parent.data.tags
    assert set(steps) == STEP_TASKS
    for task_id, run in steps.items():
        tags = run.data.tags
        assert tags["airflow.run_id"] == parent.data.tags["airflow.run_id"]
        assert tags["airflow.try_number"] == "1"
        assert tags["modelopt.execution_mode"] == "local"
        assert len(tags["modelopt.cache_key"]) == 64
        assert tags["modelopt.status"] == "succeeded"
        assert run.info.status == "FINISHED", task_id


def test_dag_exports_a_checked_onnx_model(local_dag_run, mlflow_server):
    _, steps = step_runs_of_latest_dag_run(mlflow_server.client(), DAG_ID)
    train, export = steps["train"], steps["optimize.export_onnx"]
    assert train.data.metrics["eval_accuracy"] > 0.85
    assert export.data.metrics["max_abs_error_batch_1"] < 1e-4
    assert export.data.metrics["max_abs_error_batch_7"] < 1e-4
    assert export.data.metrics["data_max_abs_error"] < 1e-4
    # The export read the model trained in the same DAG run, by URI.
    assert export.data.params["model_uri"].startswith(f"runs:/{train.info.run_id}/")
    models = mlflow_server.client().search_logged_models(
        experiment_ids=[export.info.experiment_id], filter_string=f"source_run_id = '{export.info.run_id}'")
    assert [m.name for m in models] == ["onnx_model"]


def test_dag_validates_benchmarks_and_promotes(local_dag_run, mlflow_server):
    client = mlflow_server.client()
    _, steps = step_runs_of_latest_dag_run(client, DAG_ID)
    validate, bench = steps["optimize.validate_onnx_fp32"], steps["optimize.benchmark_onnx_fp32"]
    assert validate.data.tags["modelopt.verdict"] == "passed"
    assert validate.data.metrics["accuracy_drop"] <= 0.02
    assert bench.data.metrics["latency_ms_p50"] > 0
    version = client.get_model_version_by_alias("digits-dag-test", "onnx_fp32")
    assert client.get_model_version_by_alias("digits-dag-test", "champion").version == version.version
    assert version.tags["modelopt.target"] == "onnx_fp32"
    assert version.tags["airflow.dag_id"] == DAG_ID


def test_every_step_of_a_dags_test_run_starts_from_the_warm_interpreter(local_dag_run):
    """`airflow dags test` runs every task in one process: its first local step starts the warm
    interpreter and every step, the first included, is forked from it (no fresh Python importing
    MLflow per step; operators/warm_start.py)."""
    out = local_dag_run.stdout + local_dag_run.stderr
    assert "from the warm interpreter (pid" in out, out[-4000:]
    # The launcher's line for a fresh process: "Starting <python> -m airflow_modelopt run <step> --spec -".
    assert "-m airflow_modelopt run" not in out, "a step started as a fresh process:\n" + out[-4000:]
    assert "Warm interpreter unavailable" not in out, out[-4000:]
