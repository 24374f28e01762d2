"""Steps that need the tensorflow image, in docker mode: Keras pruning, then TFLite from the pruned
Keras model (TFLiteConverter), and TFLite full int8 from a PyTorch .pt2 (litert-torch)."""

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_modelopt.operators import PruneOperator, TFLiteQuantizeOperator, artifact

with DAG(
    dag_id="modelopt_test_tensorflow_image", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
    params={name: Param(type="string") for name in (
        "keras_model_uri", "keras_train_uri", "keras_eval_uri", "pt2_uri", "calibration_uri")},
):
    prune = PruneOperator(
        task_id="prune_keras",
        model_uri="{{ params.keras_model_uri }}",
        framework="keras",
        sparsity=0.5,
        fine_tune_epochs=2,
        train_data_uri="{{ params.keras_train_uri }}",
        eval_data_uri="{{ params.keras_eval_uri }}",
        execution_mode="docker",
    )
    keras_tflite = TFLiteQuantizeOperator(
        task_id="tflite_from_keras",
        model_uri=artifact("prune_keras", "keras_model"),
        mode="dynamic_int8",
        calibration_data_uri="{{ params.keras_eval_uri }}",
        execution_mode="docker",
    )
    TFLiteQuantizeOperator(
        task_id="tflite_from_pt2",
        model_uri="{{ params.pt2_uri }}",
        mode="int8",
        calibration_data_uri="{{ params.calibration_uri }}",
        execution_mode="docker",
    )
    prune >> keras_tflite
