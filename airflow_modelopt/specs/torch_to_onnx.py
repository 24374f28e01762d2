"""Spec of the ONNX export step."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from airflow_modelopt.specs.base import MAX_OPSET, MIN_OPSET, ArtifactUri, StepSpec


class TorchToOnnxSpec(StepSpec):
    """Export a PyTorch model to ONNX and prove ONNX Runtime computes the same thing."""

    image_family: ClassVar[str] = "torch"
    input_fields: ClassVar[tuple[str, ...]] = ("model_uri", "data_uri")

    step: Literal["torch_to_onnx"] = "torch_to_onnx"
    model_uri: ArtifactUri = Field(
        description="torch.export ExportedProgram (.pt2), TorchScript file (.pt/.pth/.ts) or an MLflow "
        "pytorch model (runs:/, models:/, mlflow-artifacts:/, file:// or a plain path)"
    )
    data_uri: ArtifactUri | None = Field(
        None,
        description=".npz with one array per model input (keyed by input name, or x for a single "
        "input); sample inputs for export and the ORT check",
    )
    input_shapes: dict[str, list[int]] | None = Field(
        None,
        description="Example input shape per input name, batch dimension first; used when data_uri "
        "is not given (random normal samples)",
    )
    input_names: list[str] | None = Field(
        None, description="ONNX graph input names; default: keys of the data artifact, or x"
    )
    output_names: list[str] | None = Field(None, description="ONNX graph output names; default: output, output_1, ...")
    opset: int = Field(18, ge=MIN_OPSET, le=MAX_OPSET, description="ONNX opset version")
    dynamic_batch: bool = Field(True, description="Make dimension 0 of every input and output dynamic")
    dynamic_axes: dict[str, dict[int, str]] | None = Field(
        None, description="Extra dynamic dimensions: {input name: {dimension index: symbolic name}}"
    )
    export_batch_size: int = Field(2, ge=2, le=4096, description="Batch size of the export example (2 or more)")
    check_batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None,
        description="Batch sizes ONNX Runtime is checked at against torch; default [1, 7] "
        "(must differ from export_batch_size); with dynamic_batch false, only the export batch",
    )
    atol: float = Field(1e-4, gt=0, description="Max absolute error allowed between torch and ORT")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance added to atol, as numpy.allclose")

    @model_validator(mode="after")
    def _check_batches(self) -> TorchToOnnxSpec:
        if self.data_uri is None and not self.input_shapes:
            raise ValueError("give data_uri (an .npz of sample inputs) or input_shapes")
        if self.input_shapes:
            for name, shape in self.input_shapes.items():
                if not shape or any(d < 1 for d in shape):
                    raise ValueError(f"input_shapes[{name!r}] must be a list of positive dimensions, got {shape}")
        if self.dynamic_batch:
            sizes = self.check_batch_sizes if self.check_batch_sizes is not None else [1, 7]
            if self.export_batch_size in sizes:
                sizes = [s for s in sizes if s != self.export_batch_size]
                if self.check_batch_sizes is not None:
                    raise ValueError(
                        f"check_batch_sizes must differ from export_batch_size={self.export_batch_size}: "
                        "a dynamic batch is only proven at sizes the export never saw"
                    )
            if len(set(sizes)) < 2:
                raise ValueError("check_batch_sizes needs at least two different batch sizes")
            self.check_batch_sizes = sorted(set(sizes))
        else:
            if self.check_batch_sizes not in (None, [self.export_batch_size]):
                raise ValueError("check_batch_sizes other than the export batch need dynamic_batch=true")
            self.check_batch_sizes = [self.export_batch_size]
        return self
