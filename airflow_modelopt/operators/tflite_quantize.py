"""TFLiteQuantizeOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec


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
    """

    spec_class = TFLiteQuantizeSpec


__all__ = ["TFLiteQuantizeOperator"]
