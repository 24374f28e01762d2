"""Package two aliases of the registered model tests/container/test_openvino_image.py promotes
(OpenVINO int8 IR and the distilled ONNX int8) as a Triton model repository, in the base image."""

from datetime import datetime

from airflow.sdk import DAG

from airflow_modelopt.operators import TritonPackageOperator

with DAG(dag_id="modelopt_test_triton_package", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    TritonPackageOperator(
        task_id="triton_package",
        registered_model_name="digits-edge-docker",
        aliases=["openvino_int8", "distilled_onnx_int8"],
        model_name="digits",
        execution_mode="docker",
    )
