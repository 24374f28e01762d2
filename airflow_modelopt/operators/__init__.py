"""Public operators, one module per step. Importing this module loads no ML framework
(tests/unit/test_import_boundary.py).

Adding a step: its spec in ``specs/<step>.py``, its code in ``container/steps/<step>``, its operator in
``operators/<step>.py`` (re-exported here), its tests.
"""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.operators.benchmark import BenchmarkOperator
from airflow_modelopt.operators.distill import DistillOperator
from airflow_modelopt.operators.mnn_convert import MNNConvertOperator
from airflow_modelopt.operators.onnx_quantize import OnnxQuantizeOperator
from airflow_modelopt.operators.openvino_convert import OpenVINOConvertOperator
from airflow_modelopt.operators.promote import PromoteModelOperator
from airflow_modelopt.operators.prune import PruneOperator
from airflow_modelopt.operators.tensorrt_build import TensorRTBuildOperator
from airflow_modelopt.operators.tflite_quantize import TFLiteQuantizeOperator
from airflow_modelopt.operators.torch_quantize import TorchQuantizeOperator
from airflow_modelopt.operators.torch_to_onnx import TorchToOnnxOperator
from airflow_modelopt.operators.train_example import TrainExampleModelOperator
from airflow_modelopt.operators.triton_package import TritonPackageOperator
from airflow_modelopt.operators.validate import ValidateEquivalenceOperator
from airflow_modelopt.operators.xcom import artifact, metric

__all__ = [
    "BenchmarkOperator",
    "DistillOperator",
    "ModelOptOperator",
    "OnnxQuantizeOperator",
    "PromoteModelOperator",
    "PruneOperator",
    "TFLiteQuantizeOperator",
    "TensorRTBuildOperator",
    "TorchQuantizeOperator",
    "TorchToOnnxOperator",
    "TrainExampleModelOperator",
    "ValidateEquivalenceOperator",
    "MNNConvertOperator",
    "OpenVINOConvertOperator",
    "TritonPackageOperator",
    "artifact",
    "metric",
]
