"""Spec of the TFLite conversion and quantization step."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

TFLiteMode = Literal["fp32", "fp16", "dynamic_int8", "int8"]
TFLiteSourceFormat = Literal["auto", "pytorch", "onnx", "tensorflow"]
TFLiteIOType = Literal["int8", "uint8", "float32"]
#: Environment variable naming a Python with litert-torch, for a step running in one without it
#: (local mode: the operator sets it from ``litert_python`` / ``[modelopt] litert_python``).
LITERT_PYTHON_ENV = "MODELOPT_LITERT_PYTHON"


class TFLiteQuantizeSpec(StepSpec):
    """Convert a PyTorch, ONNX or TensorFlow/Keras model to TFLite, optionally quantized."""

    image_family: ClassVar[str] = "tensorflow"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "fallback_model_uri", "calibration_data_uri")

    step: Literal["tflite_quantize"] = "tflite_quantize"
    model_uri: ArtifactUri = Field(
        description="Source model: a torch.export ExportedProgram (.pt2) or MLflow pytorch model "
        "(converted with litert-torch); an ONNX model (.onnx file, a folder with model.onnx and its "
        "external data, or an MLflow onnx model; converted with onnx2tf); or a TensorFlow SavedModel "
        "folder, Keras file (.keras/.h5) or MLflow tensorflow model (converted with TFLiteConverter)"
    )
    fallback_model_uri: ArtifactUri | None = Field(
        None,
        description="A second source of the same model (the pipeline gives its ONNX export), converted "
        "when model_uri cannot be: its converter is not installed, or it fails on the model (an op "
        "without a lowering, an unsupported model kind). Auto-detected like model_uri; source_format "
        "applies to model_uri only. The converter that made the model, its version and why the "
        "first one failed are recorded on the run (tags modelopt.tflite.converter and "
        "modelopt.tflite.fallback_reason)",
    )
    mode: TFLiteMode = Field(
        description="fp32 (no quantization), fp16 (float16 weights), dynamic_int8 (int8 weights, "
        "activations quantized at run time) or int8 (full integer: int8 weights and activations, "
        "integer-only ops, calibrated on calibration_data_uri)"
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with one array per model input (keyed by input name, or x for a single "
        "input), in the source model's layout (NCHW for PyTorch/ONNX images; the step transposes "
        "for NHWC models). Required for mode int8 (its representative dataset); otherwise used to "
        "check the TFLite model against the source",
    )
    source_format: TFLiteSourceFormat = Field(
        "auto", description="Which converter path to take; auto detects it from the model artifact"
    )
    io_type: TFLiteIOType | None = Field(
        None,
        description="Input and output tensor type of a full int8 model (mode int8 only): int8 "
        "(the default there), uint8, or float32 (quantize/dequantize ops at the edges). Other modes "
        "keep float32 inputs and outputs",
    )
    per_channel: bool = Field(True, description="Per-channel (per output channel) weight scales for int8 modes")
    calibration_samples: int = Field(
        500, ge=1, le=100_000,
        description="At most this many samples of the calibration data form the representative dataset",
    )
    allow_select_tf_ops: bool = Field(
        False,
        description="TensorFlow and ONNX paths: let ops without a TFLite builtin run as Flex "
        "(SELECT_TF_OPS) ops, which need the Flex delegate at run time. Off: such an op fails the "
        "conversion, naming the op. With a PyTorch model_uri and a fallback_model_uri it applies to "
        "the fallback only (litert-torch lowers to builtins)",
    )
    keep_nchw: bool = Field(
        False,
        description="ONNX path: keep channel-first inputs (onnx2tf inserts transposes) instead of "
        "converting them to channel-last (NHWC); the PyTorch path always keeps NCHW",
    )
    batch_size: int | None = Field(
        None, ge=1, le=4096,
        description="Fix the batch dimension of the TFLite model. Default: dynamic where the "
        "converter keeps it (ONNX, TensorFlow), 1 on the PyTorch path (litert-torch traces a fixed batch)",
    )
    check_samples: int = Field(
        64, ge=0, le=10_000,
        description="Calibration samples run through both the source and the TFLite model to log "
        "their agreement (max_abs_error, top1_agreement); 0 skips the check",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> TFLiteQuantizeSpec:
        if self.mode == "int8" and not self.calibration_data_uri:
            raise ValueError(
                "calibration_data_uri is required for mode='int8': full integer quantization draws its "
                "representative dataset from calibration data (never random data); give "
                "calibration_data_uri (an .npz keyed by input name, or x) or choose mode fp32, fp16 or "
                "dynamic_int8"
            )
        # Checked on the value, not on whether it was set: the spec crosses to the container as
        # JSON with every field, where "set" and "default" look the same.
        if self.mode != "int8" and self.io_type not in (None, "float32"):
            raise ValueError(
                f"io_type={self.io_type!r} applies to mode='int8' only; mode={self.mode!r} keeps float32 "
                "inputs and outputs"
            )
        if self.keep_nchw and self.source_format in ("pytorch", "tensorflow") and not self.fallback_model_uri:
            raise ValueError(
                f"keep_nchw applies to ONNX sources only, but source_format={self.source_format!r} "
                "(litert-torch keeps NCHW by itself; TensorFlow models keep their own layout)"
            )
        if self.fallback_model_uri and self.fallback_model_uri == self.model_uri:
            raise ValueError("fallback_model_uri is model_uri itself; give a second source (e.g. the ONNX export) "
                             "or leave it unset")
        if self.allow_select_tf_ops and self.source_format == "pytorch" and not self.fallback_model_uri:
            raise ValueError(
                "allow_select_tf_ops applies to the TensorFlow and ONNX paths only; litert-torch "
                "(source_format='pytorch') never emits Flex ops"
            )
        return self

    @property
    def interface_type(self) -> str:
        """The TFLite model's input/output type: io_type for full int8 (int8 unless given), else float32."""
        if self.mode != "int8":
            return "float32"
        return self.io_type or "int8"
