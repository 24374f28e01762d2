"""OnnxQuantizeOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.onnx_quantize import OnnxQuantizeSpec


class OnnxQuantizeOperator(ModelOptOperator):
    """Quantize an ONNX model to int8 with ONNX Runtime and log it with MLflow's onnx flavor.

    ``mode="dynamic"``: int8 weights, activations quantized at run time; no calibration.
    ``mode="static"``: int8 weights and activations, ranges calibrated (MinMax, Entropy or
    Percentile) on ``calibration_data_uri`` (an .npz keyed by input name, or ``x``; never
    random data), in QDQ or QOperator format with the chosen activation/weight types,
    per-channel or per-tensor weights, symmetric or not. ORT's quantization pre-processing
    (symbolic shape inference, graph optimization) runs first; ``nodes_to_exclude`` and
    ``op_types_to_exclude`` keep nodes in fp32.
    ``mode="search"``: int8 is not automatically faster and the winner depends on the CPU, so
    several configurations (``search_configs``) are built from one calibration, each is measured
    against fp32 on this worker (latency: median of timed runs after warm-up, at the calibration
    data's shapes, ``latency_batch_size``, ``intra_op_threads``; top-1 agreement, accuracy drop
    with labels, max abs error on ``eval_data_uri``), and the fastest that passes the accuracy
    gate is kept. Every configuration is logged (``search/search_results.json`` and ``.md``,
    metrics ``search.<config>.latency_ms`` ...), even when none passes (the task then fails
    with the gate, exit 3).

    Transformers: ``optimize_transformer="auto"`` (default) fuses a graph with attention (a Softmax
    between two activation MatMuls) before dynamic quantization: self-attention into ONNX
    Runtime's ``Attention`` op (int8 ``QAttention`` once quantized), GELU into ``BiasGelu``
    (Add+LayerNorm stays unfused: ORT's SkipLayerNormalization ran slower on CPU); search mode
    tries each dynamic configuration fused (``fused_<config>``) and not. The fused graph must reproduce the source's outputs on the
    evaluation data or it is not used. What fused is in ``info["transformer_fusion"]``, the metrics
    ``fused_nodes.<op>`` and the run tag ``modelopt.onnx_quantize.transformer_fusion``. ``"on"``
    quantizes the fused graph in every mode, ``"off"`` never fuses; ``num_heads`` overrides the head
    count read off the attention scores.

    Calibration or evaluation arrays whose names or shapes do not match the model's inputs, or
    an empty calibration set, fail the task before any work (exit 2, not retried), naming the
    input and the shape it expects. Result artifacts: ``onnx_model`` (``models:/`` URI),
    ``report``, and in search mode ``search_results``/``search_table``; metrics include
    ``size_ratio``, ``quantized_nodes.<op>``, ``fp32_latency_ms``, ``int8_latency_ms``; the
    chosen configuration is in ``info["config"]`` and the run tag
    ``modelopt.onnx_quantize.config``.
    """

    spec_class = OnnxQuantizeSpec


__all__ = ["OnnxQuantizeOperator"]
