"""Container side: the recorded input/output signature of a model artifact.

A step that writes a model whose inputs differ from its source's (NCHW -> NHWC, int8 I/O) puts
``modelopt_signature.json`` beside the model file in the artifact folder, so validation and
benchmark feed it correctly from the record instead of guessing. Formats that describe
themselves fully (ONNX, ExportedProgram) may omit it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SIGNATURE_FILE = "modelopt_signature.json"

Layout = Literal["NCHW", "NHWC", "NCW", "NWC", "NC", "other"]


class Quantization(BaseModel):
    """Affine quantization of an integer tensor: real = scale * (q - zero_point)."""

    model_config = ConfigDict(extra="forbid")
    scale: float
    zero_point: int


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int | str | None] = Field(description="None or a string for a dynamic dimension")
    dtype: str = Field(description="numpy dtype name: float32, int8, uint8, ...")
    layout: Layout | None = None
    quantization: Quantization | None = None
    source_name: str | None = Field(None, description="Name of the matching tensor in the source model")


class ModelSignature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = Field(description="onnx, tflite, pt2, torchscript, savedmodel, keras, tensorrt")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_layout: Layout | None = Field(None, description="Layout of the source model's image inputs")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / SIGNATURE_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, folder: Path) -> ModelSignature | None:
        path = Path(folder) / SIGNATURE_FILE
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text()))
