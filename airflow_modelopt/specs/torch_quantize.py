"""Spec of the ``torch_quantize`` step: PyTorch-native int8 with PT2E (torchao's X86InductorQuantizer)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import MAX_OPSET, MIN_OPSET, ArtifactUri, StepSpec

#: model_uri endings of TorchScript and torch.save pickles: no torch.export graph to quantize.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")

#: What each mode quantizes (the step's docstring and the operator's say the same).
MODES = {
    "static": "int8 weights (per channel) and uint8 activations with scales calibrated on calibration_data_uri",
    "dynamic": "int8 weights (per channel); activation scales computed per batch at run time",
    "weight_only": "int8 weights (per channel) only; activations stay float32",
}


class TorchQuantizeSpec(StepSpec):
    """Quantize a PyTorch model to int8 with PT2E and save the quantized ExportedProgram (.pt2).

    The model is captured with torch.export, annotated by torchao's ``X86InductorQuantizer``
    (int8 per-channel symmetric weights, uint8 per-tensor affine activations), calibrated
    (``static``), converted to quantize/dequantize ops around float kernels, and exported again
    with a dynamic batch. ``torch.compile`` (inductor) fuses those patterns into int8 kernels on x86;
    eager PyTorch runs them as written. The same program is exported to ONNX (QDQ) when
    ``export_onnx`` is true and the exporter supports every op of the mode.
    """

    image_family: ClassVar[str] = "torch"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "calibration_data_uri", "eval_data_uri")

    step: Literal["torch_quantize"] = "torch_quantize"
    model_uri: ArtifactUri = Field(
        description="Model to quantize: torch.export ExportedProgram (.pt2) or MLflow pytorch model "
        "(TorchScript has no torch.export graph and is refused)"
    )
    mode: Literal["static", "dynamic", "weight_only"] = Field(
        "static", description="; ".join(f"{k}: {v}" for k, v in MODES.items())
    )
    calibration_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with one array per model input (x for a single input); required for mode "
        "'static' (activation ranges are observed on it); other modes use it only as example inputs",
    )
    eval_data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with inputs and optional labels y: agreement of the int8 model with the fp32 "
        "one (and both accuracies) is measured on it; default the calibration data",
    )
    calibration_samples: int = Field(
        512, ge=1, le=1_000_000, description="Calibration samples used (the first N of calibration_data_uri)"
    )
    calibration_batch_size: int = Field(32, ge=1, le=65536, description="Batch size of the calibration passes")
    reduce_range: bool = Field(
        False, description="7-bit activations (quant_max 127): for x86 CPUs without VNNI, which overflow otherwise"
    )
    export_onnx: bool = Field(
        True,
        description="Also export the quantized program to ONNX (QuantizeLinear/DequantizeLinear); a mode the "
        "exporter cannot express (dynamic) is recorded in the result's info, not a failure",
    )
    opset: int = Field(18, ge=MIN_OPSET, le=MAX_OPSET, description="ONNX opset of the QDQ export")
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail (exit 3) when accuracy on the evaluation data drops by more than this (absolute, "
        "e.g. 0.01) against the fp32 model; the data needs labels y",
    )

    @model_validator(mode="after")
    def _check(self) -> TorchQuantizeSpec:
        problems = []
        if self.model_uri.split("?", 1)[0].rstrip("/").lower().endswith(TORCHSCRIPT_SUFFIXES):
            problems.append(
                f"model_uri: {self.model_uri!r} looks like TorchScript or a torch.save checkpoint; PT2E needs a "
                "torch.export ExportedProgram (.pt2) or an MLflow pytorch model"
            )
        if self.mode == "static" and self.calibration_data_uri is None:
            problems.append(
                "calibration_data_uri: required for mode='static' (activation scales are calibrated on it); "
                "use mode='dynamic' or 'weight_only' to quantize without calibration data"
            )
        elif self.calibration_data_uri is None and self.eval_data_uri is None:
            problems.append(
                f"eval_data_uri: mode={self.mode!r} needs eval_data_uri or calibration_data_uri (sample inputs: the "
                "int8 model is measured against the fp32 one on them)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
