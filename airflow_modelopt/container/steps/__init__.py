"""The container side's steps, one module or package each, named as their spec (``specs/<step>.py``).

``STEP_MODULES`` is the registry the runner reads: step name -> module with ``run(spec, ctx)``.
Modules are imported only when their step runs (each imports its frameworks inside ``run``);
``tests/unit/test_step_registry.py`` checks that every spec has a step here and every step a spec.
"""

from __future__ import annotations

STEP_MODULES: dict[str, str] = {
    "benchmark": "airflow_modelopt.container.steps.benchmark",
    "distill": "airflow_modelopt.container.steps.distill",
    "onnx_quantize": "airflow_modelopt.container.steps.onnx_quantize",
    "promote": "airflow_modelopt.container.steps.promote",
    "prune": "airflow_modelopt.container.steps.prune",
    "tensorrt_build": "airflow_modelopt.container.steps.tensorrt_build",
    "tflite_quantize": "airflow_modelopt.container.steps.tflite_quantize",
    "torch_quantize": "airflow_modelopt.container.steps.torch_quantize",
    "torch_to_onnx": "airflow_modelopt.container.steps.torch_to_onnx",
    "train_example": "airflow_modelopt.container.steps.train_example",
    "validate": "airflow_modelopt.container.steps.validate",
    "mnn_convert": "airflow_modelopt.container.steps.mnn_convert",
    "openvino_convert": "airflow_modelopt.container.steps.openvino_convert",
    "triton_package": "airflow_modelopt.container.steps.triton_package",
}

__all__ = ["STEP_MODULES"]
