"""Model formats, the image family holding each one's runtime, and how a file's suffix names its format.

Shared by the validate and benchmark specs (which pick an image from their models' formats) and by
the container's runtimes layer. This module imports only pydantic.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, get_args

from pydantic import Field

ModelFormat = Literal["pt2", "torchscript", "pytorch", "onnx", "tflite", "savedmodel", "keras", "tensorrt", "openvino",
                      "mnn"]
MODEL_FORMATS: tuple[str, ...] = get_args(ModelFormat)

#: Image family holding each format's runtime (images/<family>/Dockerfile).
FORMAT_IMAGE_FAMILY: dict[str, str] = {
    "pt2": "torch", "torchscript": "torch", "pytorch": "torch", "onnx": "base",
    "tflite": "tensorflow", "savedmodel": "tensorflow", "keras": "tensorflow", "tensorrt": "tensorrt",
    # images/openvino: the torch image plus OpenVINO, NNCF and MNN (the edge and mobile runtimes)
    "openvino": "openvino", "mnn": "openvino",
}

#: File suffixes that name a format on their own (used by the runtimes layer as well).
SUFFIX_FORMATS: dict[str, str] = {
    ".pt2": "pt2", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
    ".torchscript": "torchscript", ".jit": "torchscript", ".onnx": "onnx", ".tflite": "tflite",
    ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".engine": "tensorrt", ".plan": "tensorrt",
    ".trt": "tensorrt", ".xml": "openvino", ".mnn": "mnn",
}

Device = Literal["cpu", "auto"]
BatchSize = Annotated[int, Field(ge=1, le=65536)]


#: When two models need different families, the first of these that is needed holds both.
FAMILY_PRECEDENCE = ("tensorrt", "tensorflow", "openvino", "torch", "base")


def pick_family(families: set[str], default: str) -> str:
    return next((f for f in FAMILY_PRECEDENCE if f in families), default)


def family_for(uri: str, fmt: str | None) -> str | None:
    if fmt:
        return FORMAT_IMAGE_FAMILY[fmt]
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    return FORMAT_IMAGE_FAMILY.get(SUFFIX_FORMATS.get(suffix, ""))

