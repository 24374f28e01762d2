"""Data for the step: the calibration and evaluation sets checked against the model's inputs, the
batches they are fed in, and the ORT calibration reader over them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from airflow_modelopt.container.data import LABEL_KEY, SINGLE_INPUT_KEY, load_npz, take_batch
from airflow_modelopt.container.steps.onnx_quantize.model import TensorInfo
from airflow_modelopt.exceptions import InputError

#: Calibration batches collected per pass (bounds the memory of stored intermediate outputs).
CALIBRATION_CHUNK = 16


@dataclass
class Dataset:
    field: str
    features: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def samples(self) -> int:
        return next(iter(self.features.values())).shape[0]


def load_dataset(path: Path, field_name: str, inputs: list[TensorInfo], limit: int | None = None) -> Dataset:
    """Arrays for every model input, checked by name, rank, fixed dimensions and dtype."""
    expected = "; ".join(i.expectation() for i in inputs)
    try:
        arrays = load_npz(path, field=field_name)
    except InputError as exc:
        raise InputError(f"{exc}; expected one array per model {expected}") from None
    features = {k: v for k, v in arrays.items() if k != LABEL_KEY}
    if not features:
        raise InputError(f"{field_name}: the data holds only labels {LABEL_KEY!r}; expected an array for model {expected}")
    matched: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for inp in inputs:
        if inp.name in features:
            key = inp.name
        elif len(inputs) == 1 and SINGLE_INPUT_KEY in features:
            key = SINGLE_INPUT_KEY
        else:
            raise InputError(
                f"{field_name}: no array for model {inp.expectation()}; the data has arrays {sorted(arrays)}. "
                f"Key each input's array by its name (or {SINGLE_INPUT_KEY!r} for a single-input model)"
            )
        matched[inp.name] = features[key]
        used.add(key)
    extra = sorted(set(features) - used)
    if extra:
        raise InputError(
            f"{field_name}: array(s) {extra} match no model input; the model takes {expected} "
            f"(labels go under {LABEL_KEY!r})"
        )
    for inp in inputs:
        matched[inp.name] = _check_array(matched[inp.name], inp, field_name)
    counts = {name: a.shape[0] for name, a in matched.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{field_name}: input arrays must hold the same number of samples (first axis), got {counts}")
    labels = arrays.get(LABEL_KEY)
    n = next(iter(counts.values()))
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != n):
        raise InputError(f"{field_name}: labels {LABEL_KEY!r} have shape {list(labels.shape)}; expected {n} labels")
    if limit is not None and limit < n:
        matched = {k: v[:limit] for k, v in matched.items()}
        labels = labels[:limit] if labels is not None else None
    return Dataset(field_name, matched, labels)


def _check_array(a: np.ndarray, inp: TensorInfo, field_name: str) -> np.ndarray:
    where = f"{field_name}: the array for model {inp.expectation()}"
    if a.ndim == 0 or a.shape[0] == 0:
        raise InputError(
            f"{where} holds no samples (shape {list(a.shape)}): the set is empty; expected shape "
            f"{inp.shape_text()} with N >= 1 samples on the first axis"
        )
    if a.ndim != len(inp.shape):
        raise InputError(f"{where} has shape {list(a.shape)} (rank {a.ndim}); expected rank {len(inp.shape)}")
    for d in range(1, a.ndim):
        want = inp.shape[d]
        if isinstance(want, int) and want > 0 and a.shape[d] != want:
            raise InputError(
                f"{where} has shape {list(a.shape)}: dimension {d} is {a.shape[d]}, the model expects {want}"
            )
    try:
        want_dtype: np.dtype | None = np.dtype(inp.dtype)
    except TypeError:
        want_dtype = None
    if want_dtype is not None and a.dtype != want_dtype:
        # the runtimes layer's rule (validate and benchmark read the same data): floats feed float
        # inputs, integers integer inputs; integer data for a float input is refused, not converted
        if a.dtype.kind != want_dtype.kind and not (a.dtype.kind in "iu" and want_dtype.kind in "iu"):
            raise InputError(f"{where} has dtype {a.dtype}, but the model's input is {want_dtype}: give "
                             f"{'float' if want_dtype.kind == 'f' else 'integer'} values")
        a = a.astype(want_dtype)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise InputError(f"{where} contains NaN or infinite values")
    return np.ascontiguousarray(a)


def fixed_batch(inputs: list[TensorInfo]) -> int | None:
    """The batch size the graph fixes on dimension 0, if it fixes one."""
    sizes = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None


def iter_batches(features: dict[str, np.ndarray], size: int, pad: bool) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(feed, valid samples) per batch; with pad, the last batch is filled up from the first samples."""
    n = next(iter(features.values())).shape[0]
    for start in range(0, n, size):
        feed = {k: v[start : start + size] for k, v in features.items()}
        valid = next(iter(feed.values())).shape[0]
        if pad and valid < size:
            feed = {k: np.concatenate([v, np.resize(features[k], (size - valid, *v.shape[1:]))]) for k, v in feed.items()}
        yield {k: np.ascontiguousarray(v) for k, v in feed.items()}, valid


def latency_feed(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """The batch the models are timed on: the data's first ``batch`` samples, repeated as needed (as
    the benchmark step fills a batch from its data)."""
    return take_batch(data.features, batch)


class CalibrationReader:
    """ORT CalibrationDataReader over the calibration arrays, in equal-shape batches."""

    def __init__(self, features: dict[str, np.ndarray], batch: int) -> None:
        self.batches = [feed for feed, _ in iter_batches(features, batch, pad=True)]
        self.start, self.end = 0, len(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.end:
            return None
        self.start += 1
        return self.batches[self.start - 1]

    def __iter__(self) -> CalibrationReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.batches))

    def stride(self) -> int | None:
        """Batches per collection pass: a divisor of the batch count, at most CALIBRATION_CHUNK."""
        n = len(self.batches)
        if n <= CALIBRATION_CHUNK:
            return None
        return max(d for d in range(1, CALIBRATION_CHUNK + 1) if n % d == 0)
