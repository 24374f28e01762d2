"""Public operators. Importing this module loads no ML framework (tests/unit/test_import_boundary.py).

Adding a step: its spec in ``specs/``, its module in ``steps/``, one class line here, its tests.
"""

from __future__ import annotations

from airflow_modelopt.operators._onnx_quantize_operator import OnnxQuantizeOperator
from airflow_modelopt.operators._prune_operator import PruneOperator
from airflow_modelopt.operators._tensorrt_operator import TensorRTBuildOperator
from airflow_modelopt.operators._tflite_operator import TFLiteQuantizeOperator
from airflow_modelopt.operators._validation_operators import BenchmarkOperator, ValidateEquivalenceOperator
from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.operators.promote import PromoteModelOperator
from airflow_modelopt.operators.xcom import artifact, metric
from airflow_modelopt.specs import TorchToOnnxSpec, TrainExampleSpec


class TorchToOnnxOperator(ModelOptOperator):
    """Export a PyTorch model (ExportedProgram .pt2, TorchScript, or MLflow pytorch model) to ONNX,
    check it with onnx.checker, and compare ONNX Runtime against torch at two batch sizes the
    export never saw. Logs the ONNX model with MLflow's onnx flavor, plus graph statistics."""

    spec_class = TorchToOnnxSpec


class TrainExampleModelOperator(ModelOptOperator):
    """Train the example digits CNN (scikit-learn's digits, no download) and log it to MLflow as an
    ExportedProgram (.pt2) and an MLflow pytorch model, with train/calibration/eval .npz splits."""

    spec_class = TrainExampleSpec


__all__ = [
    "BenchmarkOperator",
    "ModelOptOperator",
    "OnnxQuantizeOperator",
    "PromoteModelOperator",
    "PruneOperator",
    "TFLiteQuantizeOperator",
    "TensorRTBuildOperator",
    "TorchToOnnxOperator",
    "TrainExampleModelOperator",
    "ValidateEquivalenceOperator",
    "artifact",
    "metric",
]
