"""Spec of the ONNX Runtime int8 quantization step (dynamic, static, or a measured search)."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

QuantMode = Literal["dynamic", "static", "search"]
CalibrationMethodName = Literal["MinMax", "Entropy", "Percentile"]
QuantFormatName = Literal["QDQ", "QOperator"]
Int8Type = Literal["uint8", "int8"]
TransformerFusion = Literal["auto", "on", "off"]

#: Configurations the search mode can try, by name. "static" ones are calibrated (with the
#: spec's calibration_method); "dynamic" ones quantize weights ahead of time and activations at
#: run time. Keys: method, quant_format, activation_type, weight_type, per_channel,
#: activation_symmetric, weight_symmetric, layerwise (``onnx_quantize.layerwise``).
SEARCH_CONFIGS: dict[str, dict[str, object]] = {
    "qdq_u8s8_per_channel": {"method": "static", "quant_format": "QDQ", "activation_type": "uint8",
                             "weight_type": "int8", "per_channel": True, "activation_symmetric": False},
    "qdq_u8u8_per_tensor": {"method": "static", "quant_format": "QDQ", "activation_type": "uint8",
                            "weight_type": "uint8", "per_channel": False, "activation_symmetric": False},
    "qdq_u8s8_per_tensor": {"method": "static", "quant_format": "QDQ", "activation_type": "uint8",
                            "weight_type": "int8", "per_channel": False, "activation_symmetric": False},
    "qdq_s8s8_per_channel_symmetric": {"method": "static", "quant_format": "QDQ", "activation_type": "int8",
                                       "weight_type": "int8", "per_channel": True, "activation_symmetric": True},
    "qoperator_u8s8_per_channel": {"method": "static", "quant_format": "QOperator", "activation_type": "uint8",
                                   "weight_type": "int8", "per_channel": True, "activation_symmetric": False},
    "qoperator_u8u8_per_tensor": {"method": "static", "quant_format": "QOperator", "activation_type": "uint8",
                                  "weight_type": "uint8", "per_channel": False, "activation_symmetric": False},
    # ORT runs a QLinearConv with asymmetric int8 weights through its general int8 GEMM (im2col), with
    # symmetric ones through its direct convolution kernel: which is faster depends on layer and CPU
    "qoperator_u8s8_per_channel_asymmetric": {"method": "static", "quant_format": "QOperator",
                                              "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                                              "activation_symmetric": False, "weight_symmetric": False},
    # per QLinearConv, the weights of whichever of the two kernels ORT's profiler timed faster here
    "qoperator_u8s8_per_channel_layerwise": {"method": "static", "quant_format": "QOperator",
                                             "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                                             "activation_symmetric": False, "layerwise": True},
    "dynamic_u8_per_tensor": {"method": "dynamic", "weight_type": "uint8", "per_channel": False},
    "dynamic_s8_per_channel": {"method": "dynamic", "weight_type": "int8", "per_channel": True},
}
SearchConfigName = Literal[
    "qdq_u8s8_per_channel", "qdq_u8u8_per_tensor", "qdq_u8s8_per_tensor", "qdq_s8s8_per_channel_symmetric",
    "qoperator_u8s8_per_channel", "qoperator_u8u8_per_tensor", "qoperator_u8s8_per_channel_asymmetric",
    "qoperator_u8s8_per_channel_layerwise", "dynamic_u8_per_tensor", "dynamic_s8_per_channel",
]
#: What search mode tries when search_configs is not given.
DEFAULT_SEARCH_CONFIGS: tuple[str, ...] = (
    "qdq_u8s8_per_channel", "qdq_u8u8_per_tensor", "qdq_s8s8_per_channel_symmetric",
    "qoperator_u8s8_per_channel", "qoperator_u8s8_per_channel_asymmetric", "qoperator_u8s8_per_channel_layerwise",
    "dynamic_u8_per_tensor",
)
#: The calibrated ones among them (a search of these needs calibration data).
STATIC_SEARCH_CONFIGS: tuple[str, ...] = tuple(n for n in SEARCH_CONFIGS if SEARCH_CONFIGS[n]["method"] == "static")
#: Search mode's accuracy gates when the spec sets none: accuracy drop when the evaluation data
#: has labels (y), else top-1 agreement with the fp32 model.
DEFAULT_MAX_ACCURACY_DROP = 0.02
DEFAULT_MIN_TOP1_AGREEMENT = 0.98

#: Name prefix of a search configuration built on the transformer-fused graph.
FUSED_PREFIX = "fused_"

_OP_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

#: Fields that only mean something for calibrated (static) quantization.
_STATIC_ONLY = ("calibration_method", "calibration_percentile", "calibration_samples", "quant_format",
                "activation_type", "activation_symmetric")
#: Fields a search configuration decides; setting them in search mode would be silently ignored.
_DECIDED_BY_SEARCH = ("quant_format", "activation_type", "weight_type", "per_channel", "activation_symmetric",
                      "weight_symmetric")

NodeName = Annotated[str, Field(min_length=1, max_length=1000)]


class OnnxQuantizeSpec(StepSpec):
    """Quantize an ONNX model to int8 with ONNX Runtime: dynamic, static (calibrated), or a search
    that measures several configurations on this CPU and keeps the fastest one that stays accurate."""

    image_family: ClassVar[str] = "base"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "calibration_data_uri", "eval_data_uri")

    step: Literal["onnx_quantize"] = "onnx_quantize"
    model_uri: ArtifactUri = Field(
        description="ONNX model: a .onnx file (external data next to it), a folder holding model.onnx (+ its "
        "external data), or an MLflow onnx-flavor model (runs:/, models:/, mlflow-artifacts:/, file:// or a path)"
    )
    mode: QuantMode = Field(
        "static",
        description="dynamic: int8 weights, activations quantized at run time (no calibration); static: int8 "
        "weights and activations with ranges calibrated on calibration_data_uri; search: try several "
        "configurations (search_configs), measure latency and agreement with fp32, keep the fastest that passes "
        "the accuracy gate",
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with one array per model input (keyed by input name, or x for a single input), first "
        "axis = samples; static and search calibrate on it and measure latency at its shapes (required for static "
        "and for a search with static configurations; otherwise only used to measure)",
    )
    eval_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz like calibration_data_uri, optionally with labels y; top-1 agreement with fp32 (and "
        "accuracy with labels) is measured on it. Default: the calibration data (optimistic: the ranges were "
        "fitted on it)",
    )
    calibration_method: CalibrationMethodName = Field(
        "MinMax", description="How activation ranges are calibrated (static and search modes)"
    )
    calibration_percentile: float | None = Field(
        None, gt=90, lt=100, description="Percentile of |activation| kept by the Percentile method (ORT default 99.999)"
    )
    calibration_samples: int | None = Field(
        None, ge=1, description="Use at most this many calibration samples (default: all)"
    )
    quant_format: QuantFormatName = Field(
        "QDQ",
        description="Static quantization graph format: QDQ (QuantizeLinear/DequantizeLinear pairs around float "
        "ops, fused by ORT) or QOperator (QLinearConv, QGemm, ... operators)",
    )
    activation_type: Int8Type = Field("uint8", description="Type of quantized activations (static)")
    weight_type: Int8Type = Field("int8", description="Type of quantized weights")
    per_channel: bool = Field(True, description="One scale per output channel of each weight (else per tensor)")
    activation_symmetric: bool = Field(
        False, description="Symmetric activation ranges, zero point 0 (ORT extra option ActivationSymmetric)"
    )
    weight_symmetric: bool | None = Field(
        None, description="Symmetric weight ranges (ORT extra option WeightSymmetric); default: ORT's choice, "
        "symmetric for int8 weights"
    )
    reduce_range: bool = Field(
        False, description="Quantize weights to 7 bits: avoids int16 saturation on x86 CPUs without VNNI"
    )
    nodes_to_exclude: list[NodeName] = Field(
        default_factory=list, description="Names of nodes to keep in fp32 (names as in the source model)"
    )
    op_types_to_exclude: list[str] = Field(
        default_factory=list, description="ONNX op types whose nodes all stay in fp32, e.g. [\"Gemm\"]"
    )
    preprocess: bool = Field(
        True,
        description="Run ORT's quantization pre-processing first (symbolic shape inference and graph "
        "optimization), as ORT recommends",
    )
    preprocess_optimize: bool = Field(
        True, description="Let pre-processing optimize the graph (turn off if it removes nodes you exclude by name)"
    )
    optimize_transformer: TransformerFusion = Field(
        "auto",
        description="Transformer graph fusions before quantizing: self-attention blocks into ONNX Runtime's fused "
        "Attention op, GELU into BiasGelu/FastGelu (Add+LayerNormalization stays unfused: ORT's CPU "
        "SkipLayerNormalization kernel ran slower than the two ops). auto: when "
        "the graph has attention (a Softmax between two activation MatMuls), dynamic quantization runs on the fused "
        "graph (its QAttention and DynamicQuantizeMatMul kernels are what make int8 pay on transformers) and search "
        "mode tries each dynamic configuration both fused (fused_<config>) and not; on: every configuration "
        "quantizes the fused graph; off: never. The fused graph must reproduce the source's outputs on the "
        "evaluation data, else it is not used; what fused is recorded on the run",
    )
    num_heads: int | None = Field(
        None, ge=1, le=1024,
        description="Attention heads per block for the Attention fusion; default: read off the attention scores' "
        "shape on one data sample",
    )
    search_configs: list[SearchConfigName] | None = Field(
        None,
        description="Configurations search mode tries; default "
        + ", ".join(DEFAULT_SEARCH_CONFIGS) + ". Known: " + ", ".join(SEARCH_CONFIGS),
    )
    min_top1_agreement: float | None = Field(
        None, gt=0, le=1,
        description="Gate: share of evaluation samples whose top-1 class (argmax of the first output) equals "
        f"fp32's. Search mode defaults to {DEFAULT_MIN_TOP1_AGREEMENT} when no gate is set and the data has no labels",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1,
        description="Gate: fp32 accuracy minus int8 accuracy on eval data with labels y. Search mode defaults "
        f"to {DEFAULT_MAX_ACCURACY_DROP} when no gate is set and the data has labels",
    )
    max_abs_error: float | None = Field(
        None, gt=0, description="Gate: largest absolute difference from fp32 over all outputs and eval samples"
    )
    require_speedup: bool = Field(
        False, description="Fail (gate) unless the chosen int8 model is faster than fp32 in the latency measurement"
    )
    intra_op_threads: int = Field(
        1, ge=1, le=256, description="ONNX Runtime intra-op threads for the latency measurement; set it to your serving's thread count"
    )
    latency_batch_size: int = Field(1, ge=1, le=4096, description="Batch size latency is measured at")
    warmup_runs: int = Field(5, ge=0, le=10000, description="Untimed runs per model before latency is measured")
    timed_runs: int = Field(30, ge=3, le=100000, description="Timed runs per model")
    latency_statistic: Literal["median", "min"] = Field(
        "median",
        description="Statistic of the timed runs that latencies are compared and reported by: median, or min on "
        "workers shared with other jobs (the least disturbed by them)",
    )

    def _changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` set to something other than their default.

        Compared by value, not by "was it given": the operator sends the container the full spec
        (defaults included), and both sides must reach the same verdict."""
        fields = type(self).model_fields
        return [n for n in names if getattr(self, n) != fields[n].get_default(call_default_factory=True)]

    @model_validator(mode="after")
    def _check_combination(self) -> OnnxQuantizeSpec:
        calibrated = self.mode == "static" or (
            self.mode == "search" and any(c in STATIC_SEARCH_CONFIGS for c in self.configs_to_search()))
        if calibrated and self.calibration_data_uri is None:
            raise ValueError(
                f"calibration_data_uri is required for mode {self.mode!r}"
                + (" with static configurations" if self.mode == "search" else "")
                + ": static int8 ranges are calibrated on real samples (an .npz keyed by input name, or x), never on "
                "random data"
            )
        if self.mode == "search" and self.calibration_data_uri is None and self.eval_data_uri is None:
            raise ValueError("eval_data_uri: search mode measures each configuration's latency and agreement on data; "
                             "give eval_data_uri (or calibration_data_uri)")
        if self.mode == "dynamic":
            irrelevant = self._changed(_STATIC_ONLY)
            if irrelevant:
                raise ValueError(
                    f"{', '.join(irrelevant)}: only used by static quantization (mode 'static' or 'search'); "
                    "dynamic quantization has no calibration and always uses uint8 activations at run time"
                )
        if self.mode == "search":
            decided = self._changed(_DECIDED_BY_SEARCH)
            if decided:
                raise ValueError(
                    f"{', '.join(decided)}: decided by each search configuration in mode 'search'; choose the "
                    "configurations with search_configs, or use mode 'static' to fix them"
                )
        elif self.search_configs is not None:
            raise ValueError(f"search_configs: only used in mode 'search' (mode is {self.mode!r})")
        if self.search_configs is not None:
            if not self.search_configs:
                raise ValueError("search_configs: give at least one configuration, or leave it unset for the default set")
            dupes = sorted({c for c in self.search_configs if self.search_configs.count(c) > 1})
            if dupes:
                raise ValueError(f"search_configs: {dupes} listed more than once")
        if self.calibration_percentile is not None and self.calibration_method != "Percentile":
            raise ValueError(
                f"calibration_percentile: only used with calibration_method 'Percentile' "
                f"(calibration_method is {self.calibration_method!r})"
            )
        if self.mode == "static" and self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError(
                "activation_type 'int8' with weight_type 'uint8' is not supported by ONNX Runtime; use int8 weights "
                "(s8s8) or uint8 activations"
            )
        if self.optimize_transformer == "off" and self.num_heads is not None:
            raise ValueError("num_heads: only used by the transformer fusions; optimize_transformer is 'off'")
        for name in ("nodes_to_exclude", "op_types_to_exclude"):
            values = getattr(self, name)
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{name}: {dupes} listed more than once")
        bad = [t for t in self.op_types_to_exclude if not _OP_TYPE.match(t)]
        if bad:
            raise ValueError(f"op_types_to_exclude: {bad} are not ONNX op type names (like Conv, Gemm, MatMul)")
        if self.calibration_data_uri is None and self.eval_data_uri is None:
            needing = self._changed(("min_top1_agreement", "max_accuracy_drop", "max_abs_error", "require_speedup"))
            if needing:
                raise ValueError(
                    f"{', '.join(needing)}: a gate needs data to measure on; give calibration_data_uri or eval_data_uri"
                )
        return self

    def configs_to_search(self) -> list[str]:
        """The search configuration names, in the order they are tried."""
        return list(self.search_configs or DEFAULT_SEARCH_CONFIGS)


__all__ = [
    "FUSED_PREFIX",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_MIN_TOP1_AGREEMENT",
    "DEFAULT_SEARCH_CONFIGS",
    "SEARCH_CONFIGS",
    "OnnxQuantizeSpec",
]
