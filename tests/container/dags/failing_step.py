"""A DAG whose only step fails inside its container: the model URI names a run that does not exist."""

from datetime import datetime

from airflow.sdk import DAG

from airflow_modelopt.operators import TorchToOnnxOperator

with DAG(dag_id="modelopt_test_failing_container", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    TorchToOnnxOperator(
        task_id="export_missing_model",
        model_uri="runs:/00000000000000000000000000000000/model/model.pt2",
        input_shapes={"x": [2, 1, 8, 8]},
        execution_mode="docker",
        retries=2,
    )
