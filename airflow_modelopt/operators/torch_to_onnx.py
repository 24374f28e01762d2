"""The ``torch_to_onnx`` step's operator (re-exported by ``airflow_modelopt.operators``).

Airflow side: imports the specs (pydantic only), never a model framework.
"""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.torch_to_onnx import TorchToOnnxSpec


class TorchToOnnxOperator(ModelOptOperator):
    """Export a PyTorch model (ExportedProgram .pt2, TorchScript, or MLflow pytorch model) to ONNX,
    check it with onnx.checker, and compare ONNX Runtime against torch at two batch sizes the
    export never saw. Logs the ONNX model with MLflow's onnx flavor, plus graph statistics."""

    spec_class = TorchToOnnxSpec


__all__ = ["TorchToOnnxOperator"]
