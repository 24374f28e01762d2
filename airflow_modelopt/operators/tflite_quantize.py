"""TFLiteQuantizeOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

import dataclasses
from typing import Any

from airflow_modelopt import config
from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.tflite_quantize import LITERT_PYTHON_ENV, TFLiteQuantizeSpec

#: ``[modelopt] litert_python``: the Python with litert-torch that local-mode steps hand PyTorch sources to.
LITERT_PYTHON_OPTION = "litert_python"


def configured_litert_python() -> str:
    """``[modelopt] litert_python`` (airflow.cfg or ``AIRFLOW__MODELOPT__LITERT_PYTHON``), else ""."""
    return config.get(LITERT_PYTHON_OPTION).strip()


class TFLiteQuantizeOperator(ModelOptOperator):
    """Convert a model to TFLite (LiteRT), optionally quantized, and log it as a folder artifact.

    The converter follows the source (``source_format="auto"``), and the path taken is tagged on
    the MLflow run (``modelopt.tflite.path``) and returned in ``info["conversion_path"]``:

    - a torch.export ExportedProgram (``.pt2``) or MLflow pytorch model: ``litert_torch``
      (litert-torch, no TensorFlow; inputs keep their NCHW layout; the batch is fixed to
      ``batch_size``, default 1). Quantization by ai-edge-quantizer. litert-torch cannot share a
      Python with Airflow, so in local mode point ``python=`` (or ``[modelopt] local_python``) at
      the venv made by ``scripts/make-litert-venv.sh``; the tensorflow image has all three paths.
    - an ONNX model (``.onnx``, a folder with ``model.onnx`` and external data, or an MLflow onnx
      model): ``onnx2tf`` (channel-first inputs become NHWC unless ``keep_nchw``), then
      TFLiteConverter.
    - a TensorFlow SavedModel, Keras file (``.keras``/``.h5``) or MLflow tensorflow model:
      ``tflite_converter``.

    ``mode``: ``fp32``; ``fp16`` (float16 weights, about half the size); ``dynamic_int8`` (int8
    weights, float activations quantized at run time); ``int8`` (full integer: integer-only ops,
    ``io_type`` int8, uint8 or float32 inputs/outputs), calibrated on ``calibration_data_uri``, an
    .npz keyed by input name (or ``x``) in the source layout. Full int8 never uses random data:
    without calibration data the task is refused when the DAG is parsed (or, for a templated
    value, before it launches anything). Calibration arrays whose names or shapes do not fit the
    model's inputs, or an empty calibration set, fail the task (exit 2, not retried) naming the
    input and the shape expected; a model the converter cannot handle fails it (exit 5, not
    retried) naming the op that blocked it and quoting the converter.

    The artifact ``tflite_model`` (``runs:/<run>/tflite_model``) holds ``model.tflite`` and
    ``modelopt_signature.json``: input/output tensor names, shapes, dtypes, layouts (so a
    validation step feeds NHWC models correctly), the source model's names and layout, and the
    scale/zero point of int8/uint8 inputs and outputs; ``info`` carries the same, plus
    ``layout_change`` and the op histogram. Metrics: ``tflite_bytes``, ``source_bytes``,
    ``size_ratio`` (TFLite / source), ``compression_ratio``, ``op_count``, ``float_op_count`` (ops
    still computing in float), ``flex_op_count`` (SELECT_TF_OPS, allowed only with
    ``allow_select_tf_ops``), ``custom_op_count``, ``conversion_time_s``, and, when calibration
    data is given, ``max_abs_error`` and ``top1_agreement`` against the source model on
    ``check_samples`` samples.

    ``fallback_model_uri`` (the pipeline's ``tflite_*`` builds: ``model_uri`` is the pipeline's
    PyTorch model, the fallback its ONNX export): when ``model_uri``'s converter is not installed or
    fails on the model, the same task converts the fallback instead. Tags
    ``modelopt.tflite.converter`` ("litert-torch 0.10.1", "onnx2tf 1.28.0", ...) and
    ``modelopt.tflite.path`` name what made the model, ``modelopt.tflite.fallback_reason`` why the
    first converter failed; params ``tflite_converter``, ``tflite_converter_version`` and
    ``tflite_source`` (model_uri or fallback_model_uri) say the same, and so does ``info``.

    Local mode: when the step's Python has no litert-torch, a PyTorch source is converted in the
    Python ``litert_python`` names (default ``[modelopt] litert_python``, e.g. the venv
    ``scripts/make-litert-venv.sh`` makes), passed to the step as ``MODELOPT_LITERT_PYTHON``;
    with neither, the fallback is converted and the run says why.
    """

    spec_class = TFLiteQuantizeSpec

    def __init__(self, *, litert_python: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.litert_python = litert_python

    def launch_request(self, spec: Any, tracking: Any) -> Any:
        python = self.litert_python or configured_litert_python()
        if python and config.resolve_execution_mode(self.execution_mode) == "local":
            tracking = dataclasses.replace(tracking, public_env={**tracking.public_env, LITERT_PYTHON_ENV: python})
        return super().launch_request(spec, tracking)


__all__ = ["TFLiteQuantizeOperator"]
