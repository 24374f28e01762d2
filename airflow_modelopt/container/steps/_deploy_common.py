"""What the deployment-format conversions (openvino_convert, mnn_convert) share: reading the source
model, the data they calibrate and check on, the check of a converted model against its source,
and the record of its signature.

The check loads both models through ``container.runtimes`` and compares and times them through
``container.measure`` (``agreement``, ``time_models``), so its figures mean what validate's and
benchmark's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.data import LABEL_KEY, as_model_dtype, load_npz, match_inputs
from airflow_modelopt.container.measure import agreement, latency_stats, time_models
from airflow_modelopt.container.signature import ModelSignature
from airflow_modelopt.exceptions import ConversionFailed, InputError, ModelOptError

#: Timed runs of each model (source and converted) at batch 1 in the step's own check.
CHECK_RUNS = 60
CHECK_WARMUP = 5


@dataclass
class Source:
    """The model a conversion reads: its format, the file to convert, its input/output tensors."""

    format: str
    path: Path
    uri: str
    signature: ModelSignature
    bytes: int

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.signature.inputs]


def read_source(path: Path, uri: str, formats: tuple[str, ...], *, field: str = "model_uri") -> Source:
    """Detect the source model's format (one of ``formats``) and read its tensors with its runtime."""
    from airflow_modelopt.container.runtimes import detect, load

    fmt, target, _ = detect(path, field=field)
    if fmt not in formats:
        raise InputError(f"{field}: {uri} is a {fmt} model; this step converts {' or '.join(formats)} models")
    with load(target, fmt, field=field, origin=uri) as runtime:
        signature = ModelSignature(format=fmt, inputs=runtime.inputs, outputs=runtime.outputs,
                                   source_layout=runtime.source_layout)
        size = runtime.model_bytes()
    return Source(format=fmt, path=target, uri=uri, signature=signature, bytes=size)


def read_data(path: Path | None, source: Source, *, field: str) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """A data artifact's arrays keyed by the source's input names (float64 as float32), and its
    labels ``y`` (or None); None when no artifact was given."""
    if path is None:
        return None
    arrays = load_npz(path, field=field)
    feeds = {k: as_model_dtype(v) for k, v in match_inputs(arrays, source.input_names, field=field).items()}
    labels = arrays.get(LABEL_KEY)
    return feeds, labels


def converted_signature(source: Source, fmt: str) -> ModelSignature:
    """The record written beside a converted model: the source's tensors under the new format."""
    return source.signature.model_copy(update={"format": fmt})


def check_against_source(source: Source, converted: Path, fmt: str, feeds: dict[str, np.ndarray],
                         labels: np.ndarray | None, *, threads: int, timed_runs: int = CHECK_RUNS) -> dict[str, float]:
    """Outputs of the converted model vs the source's on ``feeds`` (max_abs_error, top1_agreement,
    and with labels accuracy, fp32_accuracy, accuracy_drop), then both timed at batch 1 one after
    the other (``measure.time_models``): latency_ms_p50, source_latency_ms_p50, speedup."""
    from airflow_modelopt.container.runtimes import load

    def open_model(name: str) -> Any:
        if name == "source":
            return load(source.path, source.format, threads=threads, field="model_uri", origin=source.uri)
        return load(converted, fmt, threads=threads, field="converted model", origin=str(converted))

    outputs = {}
    for name in ("source", "converted"):
        with open_model(name) as runtime:
            try:
                outputs[name] = runtime.run(feeds, batch_size=64)
            except ModelOptError:
                raise
            except Exception as exc:  # noqa: BLE001 - a converted model that does not run is a failed conversion
                if name == "source":
                    raise
                text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
                raise ConversionFailed(f"converted model: the {fmt} model does not run on the check data: "
                                       f"{type(exc).__name__}: {text}") from None
    metrics = agreement(outputs["source"], outputs["converted"], labels)
    one = {k: v[:1] for k, v in feeds.items()}
    times = time_models(open_model, ["source", "converted"], one, CHECK_WARMUP, timed_runs)
    mine, theirs = latency_stats(times["converted"], 1), latency_stats(times["source"], 1)
    metrics["latency_ms_p50"] = mine["latency_ms_p50"]
    metrics["source_latency_ms_p50"] = theirs["latency_ms_p50"]
    metrics["speedup"] = theirs["latency_ms_p50"] / mine["latency_ms_p50"] if mine["latency_ms_p50"] > 0 else 0.0
    return metrics


def file_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.is_file())


__all__ = ["Source", "check_against_source", "converted_signature", "file_bytes", "read_data", "read_source"]
