"""OpenVINOConvertOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.openvino_convert import OpenVINOConvertSpec


class OpenVINOConvertOperator(ModelOptOperator):
    """Convert an ONNX model (or a .pt2 ExportedProgram) to OpenVINO IR and log it to MLflow.

    ``precision="fp32"`` keeps fp32 weights; ``"fp16"`` saves them as fp16 (half the bytes, computed
    in fp32); ``"int8"`` quantizes with NNCF post-training quantization calibrated on
    ``calibration_data_uri``, or, with ``max_accuracy_drop`` and labelled ``eval_data_uri``, with
    NNCF's accuracy-aware quantization (layers return to fp32 until the top-1 drop is within it).

    The IR is checked against its source on the eval (else calibration) data and both are timed
    at batch 1 on ``threads`` threads. Result artifact: ``openvino_model`` (a folder: ``model.xml``,
    ``model.bin``, ``modelopt_signature.json``), which validate and benchmark load with OpenVINO's
    CPU plugin. Metrics: ``ir_bytes``, ``size_ratio``, ``precision_bits``, ``max_abs_error``,
    ``top1_agreement`` (and ``accuracy_drop`` with labels), ``latency_ms_p50``,
    ``source_latency_ms_p50``, ``speedup``, ``throughput_mode_items_per_s`` (OpenVINO's THROUGHPUT
    hint), and for int8 ``fake_quantize_nodes``. Runs in the ``openvino`` image.
    """

    spec_class = OpenVINOConvertSpec


__all__ = ["OpenVINOConvertOperator"]
