"""Scheduled: retrain the example digits CNN on real data, then optimize it.

# [START modelopt_retrain_and_optimize]
Train (scikit-learn's digits, logged to MLflow with its accuracy) -> export to ONNX, checked
against torch with ONNX Runtime at batch sizes 1 and 7. Every step runs in the execution mode
of ``[modelopt] execution_mode`` unless the run's ``execution_mode`` param says otherwise.
# [END modelopt_retrain_and_optimize]
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_modelopt.operators import TorchToOnnxOperator, TrainExampleModelOperator, artifact

with DAG(
    dag_id="modelopt_retrain_and_optimize",
    description="Retrain the example digits CNN weekly and export it to a checked ONNX model.",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["modelopt", "example"],
    params={
        "epochs": Param(15, type="integer", minimum=1, maximum=500, description="Training epochs"),
        "execution_mode": Param(
            "",
            type="string",
            enum=["", "local", "docker", "kubernetes"],
            description="Where steps run; empty means [modelopt] execution_mode",
        ),
        "force": Param(False, type="boolean", description="Rebuild even when a cached MLflow run matches"),
    },
) as dag:
    common = {"execution_mode": "{{ params.execution_mode }}", "force": "{{ params.force }}"}

    train = TrainExampleModelOperator(task_id="train", epochs="{{ params.epochs }}", **common)

    to_onnx = TorchToOnnxOperator(
        task_id="torch_to_onnx",
        model_uri=artifact("train", "model_pt2"),
        data_uri=artifact("train", "eval_data"),
        opset=18,
        check_batch_sizes=[1, 7],
        **common,
    )

    train >> to_onnx
