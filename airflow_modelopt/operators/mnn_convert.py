"""MNNConvertOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.mnn_convert import MNNConvertSpec


class MNNConvertOperator(ModelOptOperator):
    """Convert an ONNX model to MNN (``model.mnn``) with MNN's converter and log it to MLflow.

    ``precision="fp32"``; ``"fp16"`` stores fp16 weights; ``"int8_weights"`` stores int8 weights
    (computed in float: smaller download, same kernels); ``"int8"`` quantizes weights and feature
    maps with MNN's post-training quantization tool, calibrated on ``calibration_data_uri``
    (``feature_quantize_method`` ADMM by default, KL or EMA).

    The MNN model is checked against its source on the eval (else calibration) data and both are
    timed at batch 1 on ``threads`` threads. Result artifact: ``mnn_model`` (a folder: ``model.mnn``
    and ``modelopt_signature.json``, which keeps the source's dynamic batch), which validate and
    benchmark load with MNN's CPU runtime. Metrics: ``mnn_bytes``, ``size_ratio``,
    ``precision_bits``, ``max_abs_error``, ``top1_agreement`` (and ``accuracy_drop`` with labels),
    ``latency_ms_p50``, ``source_latency_ms_p50``, ``speedup``. A converter failure (an operator
    MNN does not support, say) fails the task at once (exit 5) quoting MNN's message. Runs in the
    ``openvino`` image, which holds MNN too.
    """

    spec_class = MNNConvertSpec


__all__ = ["MNNConvertOperator"]
