"""Scheduled: retrain the example digits CNN on real data, then optimize it.

# [START modelopt_retrain_and_optimize]
Train (scikit-learn's digits, logged to MLflow with its accuracy), then the same optimization
task group as ``modelopt_optimize``: every requested target is built, validated against the new
model on the evaluation split, benchmarked, and the passing ones are promoted in the MLflow
Model Registry. Steps run in ``[modelopt] execution_mode`` unless the run's param says otherwise.
# [END modelopt_retrain_and_optimize]
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_modelopt.operators import TrainExampleModelOperator, artifact
from airflow_modelopt.pipelines import optimization_pipeline
from airflow_modelopt.targets import TARGETS

with DAG(
    dag_id="modelopt_retrain_and_optimize",
    description="Retrain the example digits CNN weekly and build, validate, benchmark and promote its deployables.",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["modelopt", "example"],
    params={
        "epochs": Param(15, type="integer", minimum=1, maximum=500, description="Training epochs"),
        "targets": Param(["onnx_fp32", "onnx_int8_static", "tflite_int8"], type="array",
                         items={"type": "string", "enum": list(TARGETS)}, minItems=1,
                         description="Deployables to build from the retrained model"),
        "registered_model_name": Param("digits-cnn", type="string", minLength=1,
                                       description="MLflow registered model the passing candidates join"),
        "max_accuracy_drop": Param(0.02, type="number", minimum=0, maximum=1, description="Gate on accuracy drop"),
        "execution_mode": Param("", type=["null", "string"], enum=["", "local", "docker", "kubernetes"],
                                description="Where steps run; empty means [modelopt] execution_mode"),
        "force": Param(False, type="boolean", description="Rebuild even when a cached MLflow run matches"),
    },
) as dag:
    common = {"execution_mode": "{{ params.execution_mode }}", "force": "{{ params.force }}"}

    train = TrainExampleModelOperator(task_id="train", epochs="{{ params.epochs }}", **common)

    optimize = optimization_pipeline(
        model_uri=artifact("train", "model_pt2"),
        calibration_data_uri=artifact("train", "calibration_data"),
        eval_data_uri=artifact("train", "eval_data"),
        train_data_uri=artifact("train", "train_data"),
        targets="{{ params.targets }}",
        registered_model_name="{{ params.registered_model_name }}",
        max_accuracy_drop="{{ params.max_accuracy_drop }}",
        **common,
    )
    train >> optimize
