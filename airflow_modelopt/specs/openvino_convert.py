"""Spec of the openvino_convert step: ONNX (or .pt2) -> OpenVINO IR, fp32, fp16 weights, or int8 with NNCF."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import ArtifactUri, StepSpec

OpenVINOPrecision = Literal["fp32", "fp16", "int8"]


class OpenVINOConvertSpec(StepSpec):
    """Convert a model to OpenVINO IR (``model.xml`` + ``model.bin``) with ``openvino.convert_model``:
    fp32, fp16-compressed weights, or int8 by NNCF post-training quantization on calibration data
    (accuracy-aware when ``max_accuracy_drop`` is set). The IR is checked against its source on
    eval (else calibration) data and timed on this CPU."""

    image_family: ClassVar[str] = "openvino"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "calibration_data_uri", "eval_data_uri")

    step: Literal["openvino_convert"] = "openvino_convert"
    model_uri: ArtifactUri = Field(
        description="Source model: ONNX (a .onnx file, a folder with model.onnx + external data, or an MLflow "
        "onnx-flavor model) or a torch.export ExportedProgram (.pt2, or an MLflow pytorch model holding one)"
    )
    precision: OpenVINOPrecision = Field(
        "fp32",
        description="fp32: weights kept fp32; fp16: weights saved as fp16 (ov.save_model compress_to_fp16), "
        "computed in fp32; int8: NNCF post-training quantization (nncf.quantize) calibrated on calibration_data_uri",
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description="int8 only (required there): .npz with one array per model input (keyed by input name, or x "
        "for a single input), first axis = samples",
    )
    calibration_samples: int = Field(
        300, ge=1, le=100000, description="int8: at most this many calibration samples (NNCF subset_size)"
    )
    preset: Literal["performance", "mixed"] = Field(
        "performance",
        description="int8: NNCF QuantizationPreset: performance (symmetric weights and activations) or mixed "
        "(asymmetric activations, better for non-ReLU activations)",
    )
    fast_bias_correction: bool = Field(
        True, description="int8: NNCF's fast bias correction (else the slower, sometimes more accurate full one)"
    )
    fp32_op_types: list[str] = Field(
        default_factory=lambda: ["LSTMSequence", "LSTMCell"], max_length=64,
        description="int8: OpenVINO op types NNCF leaves in floating point. Default: LSTM, whose state carries "
        "quantization error from step to step (an LSTM classifier kept 0.62 top-1 agreement quantized, 1.00 without)",
    )
    eval_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz like the calibration data, optionally with labels y: the IR is compared with its source "
        "on it (default: the calibration data). With labels and max_accuracy_drop, int8 uses NNCF's "
        "accuracy-aware quantization on it",
    )
    max_accuracy_drop: float | None = Field(
        None, gt=0, le=1,
        description="int8 only: absolute top-1 accuracy drop allowed on eval_data_uri (needs labels y); NNCF's "
        "quantize_with_accuracy_control returns layers to fp32 until the drop is within it",
    )
    threads: int = Field(
        1, ge=1, le=256,
        description="Threads for the check's latency (LATENCY hint, source and IR alike) and for the THROUGHPUT "
        "hint measurement",
    )
    throughput_seconds: float = Field(
        2.0, ge=0, le=600,
        description="Seconds the IR runs under OpenVINO's THROUGHPUT hint (throughput_mode_items_per_s); 0 skips it",
    )

    @model_validator(mode="after")
    def _check(self) -> OpenVINOConvertSpec:
        if self.precision == "int8" and self.calibration_data_uri is None:
            raise ValueError(
                "calibration_data_uri is required for precision 'int8': NNCF calibrates activation ranges on real "
                "samples (an .npz keyed by input name, or x)"
            )
        if self.precision != "int8":
            given = [n for n in ("calibration_data_uri", "max_accuracy_drop") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only used for precision 'int8' (precision is {self.precision!r})")
        if self.max_accuracy_drop is not None and self.eval_data_uri is None:
            raise ValueError(
                "max_accuracy_drop needs eval_data_uri: an .npz with labels y that NNCF measures the accuracy drop on"
            )
        return self


__all__ = ["OpenVINOConvertSpec", "OpenVINOPrecision"]
