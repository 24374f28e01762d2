"""The pipeline's targets: which builds make each one, and how a run's target list is read.

A leaf module (standard library only): the task-group factory (``pipelines.py``), the promote
operator and the DAGs read it; it imports none of them. Operators are named by class name, so the
table can be read without importing Airflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Every target the pipeline can build, in the order branches are laid out.
TARGETS = (
    "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "tflite_fp16", "tflite_int8",
    "pruned_onnx_int8", "tensorrt_fp16", "tensorrt_int8", "torch_int8", "distilled_onnx_int8",
    "openvino_fp32", "openvino_int8", "mnn_fp32", "mnn_int8",
)


#: What each target produces, in a few words (the trigger form's choices, the DAG docs, group tooltips).
TARGET_DESCRIPTIONS: dict[str, str] = {
    "onnx_fp32": "ONNX fp32 export (ONNX Runtime)",
    "onnx_int8_dynamic": "ONNX int8, dynamic quantization (no calibration data; fastest measured configuration)",
    "onnx_int8_static": "ONNX int8, static quantization (calibration data; fastest measured configuration)",
    "tflite_fp16": "TFLite fp16 (litert-torch, else onnx2tf from the ONNX export)",
    "tflite_int8": "TFLite full int8 (litert-torch, else onnx2tf; calibration data)",
    "pruned_onnx_int8": "50% channel-pruned, fine-tuned, then ONNX static int8 (fastest measured)",
    "tensorrt_fp16": "TensorRT engine fp16 (needs an NVIDIA GPU)",
    "tensorrt_int8": "TensorRT engine int8 (NVIDIA GPU, calibration data)",
    "torch_int8": "PyTorch PT2E int8 .pt2 (calibration data)",
    "distilled_onnx_int8": "distilled half-width student, then ONNX static int8 (fastest measured)",
    "openvino_fp32": "OpenVINO IR fp32",
    "openvino_int8": "OpenVINO IR int8 with NNCF (calibration data)",
    "mnn_fp32": "MNN fp32 (mobile)",
    "mnn_int8": "MNN int8 (mobile, calibration data)",
}


@dataclass(frozen=True)
class Build:
    """One build task: which operator, with which arguments, from which upstream build."""

    task_id: str
    operator: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str | None = None            # upstream build task id; None means the pipeline's model
    source_artifact: str = ""            # the upstream artifact this build reads
    model_field: str = "model_uri"


#: The pipeline's ONNX int8 builds run onnx_quantize's measured search, so the worker's CPU decides:
#: which kernels pay differs between CPUs (VNNI or not, AMX or not) and architectures (static QDQ on
#: CNNs, dynamic int8 on the transformer-fused graph on transformers; docs/coverage.md). Each keeps
#: to its kind, static or dynamic; the search's default accuracy gate applies (2 points with labels).
STATIC_INT8_SEARCH = {
    "mode": "search", "calibration_data_uri": "{calibration}", "eval_data_uri": "{eval}",
    "search_configs": ["qdq_u8s8_per_channel", "qdq_u8u8_per_tensor", "qdq_s8s8_per_channel_symmetric",
                       "qoperator_u8s8_per_channel", "qoperator_u8s8_per_channel_asymmetric",
                       "qoperator_u8s8_per_channel_layerwise"],
}
DYNAMIC_INT8_SEARCH = {
    "mode": "search", "eval_data_uri": "{eval}",
    "search_configs": ["dynamic_u8_per_tensor", "dynamic_s8_per_channel"],  # each also on the fused graph
}


def builds() -> dict[str, Build]:
    return {b.task_id: b for b in (
        Build("export_onnx", "TorchToOnnxOperator", {"data_uri": "{eval}"}),
        Build("onnx_int8_dynamic", "OnnxQuantizeOperator", DYNAMIC_INT8_SEARCH, "export_onnx", "onnx_model"),
        Build("onnx_int8_static", "OnnxQuantizeOperator", STATIC_INT8_SEARCH, "export_onnx", "onnx_model"),
        # TFLite from the pipeline's PyTorch model with litert-torch (NCHW kept, batch fixed), falling back
        # in the same task to the ONNX export with onnx2tf (NHWC): both recorded in the signature, the
        # converter that made it on the run. Local mode finds litert-torch through [modelopt] litert_python.
        Build("tflite_fp16", "TFLiteQuantizeOperator", {"mode": "fp16", "model_uri": "{model}"},
              "export_onnx", "onnx_model", model_field="fallback_model_uri"),
        Build("tflite_int8", "TFLiteQuantizeOperator",
              {"mode": "int8", "calibration_data_uri": "{calibration}", "model_uri": "{model}"},
              "export_onnx", "onnx_model", model_field="fallback_model_uri"),
        # 40 epochs of batch 32 at lr 3e-3, distilling on mixup + noise batches with BatchNorm statistics
        # re-estimated (the step's defaults): a 50% channel prune recovers without labels on a 200-sample
        # calibration split (residual CNN: drop 0.007 in-process, vs 0.050 with 20 epochs of plain KD).
        Build("prune", "PruneOperator", {"method": "structured", "sparsity": 0.5, "fine_tune_epochs": 40,
                                         "batch_size": 32, "learning_rate": 0.003, "train_data_uri": "{train}",
                                         "eval_data_uri": "{eval}"}),
        Build("export_pruned_onnx", "TorchToOnnxOperator", {"data_uri": "{eval}"}, "prune", "model_pt2"),
        Build("pruned_onnx_int8", "OnnxQuantizeOperator", STATIC_INT8_SEARCH, "export_pruned_onnx", "onnx_model"),
        Build("tensorrt_fp16", "TensorRTBuildOperator", {"precision": "fp16"}, "export_onnx", "onnx_model"),
        Build("tensorrt_int8", "TensorRTBuildOperator",
              {"precision": "int8", "calibration_data_uri": "{calibration}"}, "export_onnx", "onnx_model"),
        # PyTorch-native int8 (PT2E, X86InductorQuantizer): the candidate is the quantized .pt2 itself.
        Build("torch_int8", "TorchQuantizeOperator",
              {"mode": "static", "calibration_data_uri": "{calibration}", "eval_data_uri": "{eval}"}),
        # Knowledge distillation into the teacher narrowed to half its channels, then ONNX static int8.
        Build("distill", "DistillOperator", {"train_data_uri": "{train}", "eval_data_uri": "{eval}", "epochs": 10}),
        Build("export_distilled_onnx", "TorchToOnnxOperator", {"data_uri": "{eval}"}, "distill", "model_pt2"),
        Build("distilled_onnx_int8", "OnnxQuantizeOperator", STATIC_INT8_SEARCH, "export_distilled_onnx",
              "onnx_model"),
        # Edge (OpenVINO IR, NNCF int8) and mobile (MNN, int8 weights and feature maps) from the ONNX export.
        Build("openvino_fp32", "OpenVINOConvertOperator", {"precision": "fp32"}, "export_onnx", "onnx_model"),
        Build("openvino_int8", "OpenVINOConvertOperator", {"precision": "int8", "calibration_data_uri": "{calibration}"},
              "export_onnx", "onnx_model"),
        Build("mnn_fp32", "MNNConvertOperator", {"precision": "fp32"}, "export_onnx", "onnx_model"),
        Build("mnn_int8", "MNNConvertOperator", {"precision": "int8", "calibration_data_uri": "{calibration}"},
              "export_onnx", "onnx_model"),
    )}


#: target -> (build chain, artifact of the last build, candidate format for validation/benchmark)
TARGET_CHAINS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "onnx_fp32": (("export_onnx",), "onnx_model", "onnx"),
    "onnx_int8_dynamic": (("export_onnx", "onnx_int8_dynamic"), "onnx_model", "onnx"),
    "onnx_int8_static": (("export_onnx", "onnx_int8_static"), "onnx_model", "onnx"),
    "tflite_fp16": (("export_onnx", "tflite_fp16"), "tflite_model", "tflite"),
    "tflite_int8": (("export_onnx", "tflite_int8"), "tflite_model", "tflite"),
    "pruned_onnx_int8": (("prune", "export_pruned_onnx", "pruned_onnx_int8"), "onnx_model", "onnx"),
    "tensorrt_fp16": (("export_onnx", "tensorrt_fp16"), "tensorrt_engine", "tensorrt"),
    "tensorrt_int8": (("export_onnx", "tensorrt_int8"), "tensorrt_engine", "tensorrt"),
    "torch_int8": (("torch_int8",), "model_pt2", "pt2"),
    "distilled_onnx_int8": (("distill", "export_distilled_onnx", "distilled_onnx_int8"), "onnx_model", "onnx"),
    "openvino_fp32": (("export_onnx", "openvino_fp32"), "openvino_model", "openvino"),
    "openvino_int8": (("export_onnx", "openvino_int8"), "openvino_model", "openvino"),
    "mnn_fp32": (("export_onnx", "mnn_fp32"), "mnn_model", "mnn"),
    "mnn_int8": (("export_onnx", "mnn_int8"), "mnn_model", "mnn"),
}


def parse_targets(value: Any) -> list[str]:
    """Targets from a list, a JSON/Python list literal, or a comma-separated string; unknown ones refused."""
    import ast

    if isinstance(value, str):
        text = value.strip()
        value = ast.literal_eval(text) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
    targets = [str(t).strip() for t in value or []]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if not targets:
        raise ValueError(f"targets is empty; choose one or more of {', '.join(TARGETS)}")
    return list(dict.fromkeys(targets))


__all__ = ["TARGETS", "TARGET_CHAINS", "TARGET_DESCRIPTIONS", "Build", "builds", "parse_targets"]
