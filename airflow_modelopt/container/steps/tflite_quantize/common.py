"""Shared pieces of the tflite_quantize converter paths: model I/O, layouts, calibration, errors."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.exceptions import InputError

#: Channel-first layout of an input of each rank, and its channel-last counterpart.
CHANNEL_FIRST = {2: "NC", 3: "NCW", 4: "NCHW"}
CHANNEL_LAST = {2: "NC", 3: "NWC", 4: "NHWC"}
TO_CHANNEL_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


@dataclass
class TensorIO:
    """One input or output of the source model, in the source model's layout."""

    name: str
    shape: list[int | None]
    dtype: str = "float32"
    layout: str | None = None  # of the source tensor
    tflite_layout: str | None = None  # of the matching TFLite tensor
    channel_last: bool = False  # the TFLite tensor is the source tensor transposed to channel-last


@dataclass
class SourceModel:
    """What model_uri holds: which converter path takes it and where its files are."""

    format: str  # pytorch, onnx, tensorflow
    kind: str  # exported_program, mlflow_pytorch, onnx, mlflow_onnx, saved_model, keras, mlflow_tensorflow
    path: Path  # the file or folder the converter reads
    root: Path  # the fetched artifact (for bytes)
    bytes: int = 0


@dataclass
class Conversion:
    """A converter path's result."""

    content: bytes
    conversion_time_s: float
    quantizer: str
    notes: dict[str, Any] = field(default_factory=dict)


def layout_for(rank: int, channel_last: bool) -> str | None:
    table = CHANNEL_LAST if channel_last else CHANNEL_FIRST
    return table.get(rank, "other" if rank >= 5 else None)


def to_tflite_layout(array: np.ndarray, io_: TensorIO) -> np.ndarray:
    """A source-layout batch turned into what the TFLite tensor takes."""
    if io_.channel_last and array.ndim in TO_CHANNEL_LAST:
        return np.ascontiguousarray(array.transpose(TO_CHANNEL_LAST[array.ndim]))
    return array


def shape_text(shape: list[int | None] | tuple[int | None, ...]) -> str:
    return "(" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(shape)) + ")"


def check_calibration(arrays: dict[str, np.ndarray], inputs: list[TensorIO], *, field: str) -> dict[str, np.ndarray]:
    """Arrays keyed by source input name, checked against the inputs' ranks, static dims and dtype."""
    from airflow_modelopt.container.data import as_model_dtype, match_inputs

    empty = {k: a.shape for k, a in arrays.items() if k != "y" and (a.ndim == 0 or a.shape[0] == 0)}
    if empty:
        raise InputError(
            f"{field}: the calibration set is empty (arrays {sorted(empty)} hold no samples; shapes "
            f"{ {k: list(v) for k, v in empty.items()} }); give at least one sample per input"
        )
    matched = match_inputs(arrays, [i.name for i in inputs], field=field)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        a = as_model_dtype(matched[spec.name])
        where = f"{field}: array for model input {spec.name!r}"
        expected = shape_text(spec.shape)
        layout = f" ({spec.layout})" if spec.layout else ""
        if spec.shape and a.ndim != len(spec.shape):
            raise InputError(
                f"{where} has shape {list(a.shape)} (rank {a.ndim}) but the input expects {expected}{layout} "
                f"(rank {len(spec.shape)})"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if axis > 0 and want is not None and want != got:
                raise InputError(
                    f"{where} has shape {list(a.shape)} but the input expects {expected}{layout}: dimension "
                    f"{axis} is {got}, expected {want}"
                )
        if np.dtype(spec.dtype).kind == "f" and a.dtype.kind != "f":
            raise InputError(f"{where} holds {a.dtype.name} values but the input takes {spec.dtype}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{where} holds NaN or infinite values")
        out[spec.name] = a.astype(spec.dtype) if np.dtype(spec.dtype).kind == "f" else a
    return out


def batches(arrays: dict[str, np.ndarray], batch: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of ``batch`` samples from the first ``limit``; a short last batch is
    padded by repeating its samples (a fixed-batch model takes no other size)."""
    n = min(limit, next(iter(arrays.values())).shape[0])
    for start in range(0, n, batch):
        part = {k: v[start:min(start + batch, n)] for k, v in arrays.items()}
        got = next(iter(part.values())).shape[0]
        if got < batch:
            reps = -(-batch // got)
            part = {k: np.concatenate([v] * reps)[:batch] for k, v in part.items()}
        yield part


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean(text: str) -> str:
    return _ANSI.sub("", text)


@contextlib.contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    """Converters print to stdout, where the step's result line goes: keep a copy and echo it to stderr."""

    class Tee(io.StringIO):
        def write(self, s: str) -> int:
            sys.stderr.write(s)
            return super().write(s)

    buf = Tee()
    with contextlib.redirect_stdout(buf):
        yield buf


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Drop records below WARNING from the named loggers (converters' per-op chatter) meanwhile."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name not in names

    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)
