"""Container side: data artifacts (.npz) and how their arrays meet a model's inputs.

Convention: one array per model input, keyed by the input's name (``x`` for a single-input
model, whatever the graph calls it); labels under ``y``. The first dimension is the sample axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from airflow_modelopt.exceptions import InputError

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"


def load_npz(path: Path, *, field: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz (a file, or a folder holding exactly one .npz)."""
    if path.is_dir():
        candidates = sorted(path.rglob("*.npz"))
        if len(candidates) != 1:
            raise InputError(f"{field}: {path} is a directory; expected one .npz file, found {len(candidates)}")
        path = candidates[0]
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{field}: {path.name} is not a readable .npz file: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        kind = "a single .npy array" if isinstance(loaded, np.ndarray) else type(loaded).__name__
        raise InputError(f"{field}: {path.name} is {kind}, not an .npz archive; save it with numpy.savez "
                         f"(inputs keyed by name, '{SINGLE_INPUT_KEY}' for a single input, labels under '{LABEL_KEY}')")
    try:
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise InputError(f"{field}: {path.name} is not a readable .npz file: {exc}") from None
    if not arrays:
        raise InputError(f"{field}: {path.name} holds no arrays")
    for name, a in arrays.items():
        check_finite(a, f"{field}: array {name!r} of {path.name}")
    return arrays


def check_finite(a: np.ndarray, where: str) -> None:
    """Refuse NaN or inf in data: a model's outputs on them measure nothing (bad input, exit 2)."""
    if a.dtype.kind not in "fc" or a.size == 0:
        return
    finite = np.isfinite(a)
    if not finite.all():
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        first = [int(i) for i in np.argwhere(~finite)[0]]
        raise InputError(f"{where} holds {nan} NaN and {inf} inf values (first at index {first}); "
                         "evaluation and calibration data must be finite")


def match_inputs(arrays: dict[str, np.ndarray], input_names: list[str], *, field: str) -> dict[str, np.ndarray]:
    """The arrays feeding each model input, by name; a single input may also be keyed ``x``."""
    features = {k: v for k, v in arrays.items() if k != LABEL_KEY}
    matched: dict[str, np.ndarray] = {}
    for name in input_names:
        if name in features:
            matched[name] = features[name]
        elif len(input_names) == 1 and SINGLE_INPUT_KEY in features:
            matched[name] = features[SINGLE_INPUT_KEY]
        else:
            raise InputError(
                f"{field}: the model has input {name!r} but the data artifact has arrays "
                f"{sorted(arrays)}; key each input's array by its name (or 'x' for a single input)"
            )
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in matched.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(f"{field}: input arrays must share a non-empty first (sample) dimension, got {counts}")
    return matched


def take_batch(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of every input, repeating the data when it holds fewer."""
    out = {}
    for name, a in arrays.items():
        if a.shape[0] < batch:
            reps = -(-batch // a.shape[0])
            a = np.concatenate([a] * reps, axis=0)
        out[name] = np.ascontiguousarray(a[:batch])
    return out


def as_model_dtype(a: np.ndarray) -> np.ndarray:
    """float64 arrays (numpy's default) feed float32 models; other dtypes pass unchanged."""
    return a.astype(np.float32) if a.dtype == np.float64 else a
