"""Spec of the mnn_convert step: ONNX -> MNN (fp32, fp16 weights, int8 weights, or full int8)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

MNNPrecision = Literal["fp32", "fp16", "int8_weights", "int8"]


class MNNConvertSpec(StepSpec):
    """Convert an ONNX model to MNN (``model.mnn``) with MNN's converter: fp32, fp16 weights, int8
    weights, or full int8 (weights and feature maps, calibrated with MNN's quantization tool). The
    MNN model is checked against its source on eval (else calibration) data and timed on this CPU."""

    image_family: ClassVar[str] = "openvino"  # images/openvino also holds MNN (specs/formats.py)
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "calibration_data_uri", "eval_data_uri")

    step: Literal["mnn_convert"] = "mnn_convert"
    model_uri: ArtifactUri = Field(
        description="ONNX model: a .onnx file (external data next to it), a folder holding model.onnx (+ its "
        "external data), or an MLflow onnx-flavor model (runs:/, models:/, mlflow-artifacts:/, file:// or a path)"
    )
    precision: MNNPrecision = Field(
        "fp32",
        description="fp32; fp16: weights stored as fp16 (converter --fp16); int8_weights: weights stored as int8 "
        "(--weightQuantBits 8), computed in float; int8: int8 weights and feature maps, ranges calibrated on "
        "calibration_data_uri (MNN's quantization tool)",
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description="int8 only (required there): .npz with one array per model input (keyed by input name, or x "
        "for a single input), first axis = samples",
    )
    calibration_samples: int = Field(200, ge=1, le=10000, description="int8: at most this many calibration samples")
    feature_quantize_method: Literal["KL", "ADMM", "EMA"] = Field(
        "ADMM", description="int8: how feature-map ranges are calibrated (MNN's feature_quantize_method). ADMM by "
        "default: MNN 3.6's KL crashed (SIGSEGV) on the zoo's MobileNet- and ResNet-style CNNs and kept a UNet at 0.75 "
        "pixel agreement (ADMM: 0.99, 1.00, 0.98); EMA lost the ResNet (0.10)"
    )
    weight_quantize_method: Literal["MAX_ABS", "ADMM"] = Field(
        "MAX_ABS", description="int8: how weight scales are chosen (MNN's weight_quantize_method)"
    )
    eval_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz like the calibration data, optionally with labels y: the MNN model is compared with its "
        "source on it (default: the calibration data)",
    )
    threads: int = Field(1, ge=1, le=256, description="Threads for the check's latency (source and MNN model alike)")

    @model_validator(mode="after")
    def _check(self) -> MNNConvertSpec:
        if self.precision == "int8" and self.calibration_data_uri is None:
            raise ValueError(
                "calibration_data_uri is required for precision 'int8': MNN calibrates feature-map ranges on real "
                "samples (an .npz keyed by input name, or x); int8_weights needs none"
            )
        if self.precision != "int8" and self.calibration_data_uri is not None:
            raise ValueError(
                f"calibration_data_uri is only read for precision 'int8' (precision is {self.precision!r}); use "
                "eval_data_uri for the check"
            )
        return self


__all__ = ["MNNConvertSpec", "MNNPrecision"]
