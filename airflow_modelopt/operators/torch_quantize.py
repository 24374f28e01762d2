"""TorchQuantizeOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.torch_quantize import TorchQuantizeSpec


class TorchQuantizeOperator(ModelOptOperator):
    """Quantize a PyTorch model to int8 with PT2E (torchao's ``X86InductorQuantizer``) and log the
    quantized ExportedProgram.

    - ``mode="static"`` (default): int8 per-channel weights, uint8 activations calibrated on
      ``calibration_data_uri`` (required); ``"dynamic"``: activation scales per batch at run time;
      ``"weight_only"``: int8 weights, float activations.
    - Input: a torch.export ``.pt2`` or an MLflow pytorch model (TorchScript is refused, exit 2; a
      model torch.export cannot capture fails with exit 5).
    - Output ``model_pt2``: the quantized ExportedProgram (dynamic batch), loadable by every step
      without ``trust_model_code``; ``onnx_model`` (ONNX QDQ, MLflow onnx flavor) when
      ``export_onnx`` and the exporter supports the mode (``info.onnx_export`` says why not).
    - Metrics: ``top1_agreement``, ``accuracy``, ``fp32_accuracy``, ``accuracy_drop`` (with labels),
      ``max_abs_error`` on ``eval_data_uri`` (default the calibration data), ``fp32_bytes``,
      ``int8_bytes``, ``size_ratio``, ``quantized_layers``; ``max_accuracy_drop`` gates (exit 3).
    """

    spec_class = TorchQuantizeSpec
