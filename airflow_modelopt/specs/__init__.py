"""The contract between the two sides: typed, versioned step specs and the step result.

The Airflow side builds a spec from an operator's rendered fields and validates it before it
launches anything; the container side validates the same JSON again before it does any work.
The result is what a step prints as its last stdout line and what XCom carries between tasks.

One module per group of steps; importing this package registers every step's spec. These
modules import only pydantic, so both sides can use them.
"""

from airflow_modelopt.specs.base import (
    EXECUTION_MODES,
    MAX_OPSET,
    MIN_OPSET,
    SPEC_VERSION,
    ArtifactUri,
    ExecutionMode,
    RunContext,
    StepResult,
    StepSpec,
    Verdict,
    format_validation_error,
    parse_spec,
    spec_class_for,
)
from airflow_modelopt.specs.benchmark import BenchmarkSpec
from airflow_modelopt.specs.distill import DistillSpec
from airflow_modelopt.specs.mnn_convert import MNNConvertSpec
from airflow_modelopt.specs.onnx_quantize import OnnxQuantizeSpec
from airflow_modelopt.specs.openvino_convert import OpenVINOConvertSpec
from airflow_modelopt.specs.promote import Candidate, PromoteSpec
from airflow_modelopt.specs.prune import PruneSpec
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec
from airflow_modelopt.specs.torch_quantize import TorchQuantizeSpec
from airflow_modelopt.specs.torch_to_onnx import TorchToOnnxSpec
from airflow_modelopt.specs.train_example import TrainExampleSpec
from airflow_modelopt.specs.triton_package import TritonPackageSpec
from airflow_modelopt.specs.validate import ValidateEquivalenceSpec

__all__ = [
    "EXECUTION_MODES", "MAX_OPSET", "MIN_OPSET", "SPEC_VERSION", "ArtifactUri", "ExecutionMode",
    "RunContext", "StepResult", "StepSpec", "Verdict", "format_validation_error", "parse_spec",
    "spec_class_for",
    "BenchmarkSpec", "Candidate", "OnnxQuantizeSpec", "PromoteSpec", "PruneSpec", "TFLiteQuantizeSpec",
    "TensorRTBuildSpec", "TorchToOnnxSpec", "TrainExampleSpec", "ValidateEquivalenceSpec",
    "DistillSpec", "TorchQuantizeSpec",
    "MNNConvertSpec", "OpenVINOConvertSpec", "TritonPackageSpec",
]
