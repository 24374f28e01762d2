"""The one measuring module of the container side: how two models' outputs are compared and how a
model's latency is timed. Validate, benchmark, the ONNX quantization search and the TFLite checks
all measure through these functions, so a figure means the same thing wherever it is logged.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# -- comparing outputs ------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def output_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """Error statistics of one output; non-finite elements are counted and left out of the rest."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    finite = np.isfinite(r) & np.isfinite(c)
    rf, cf = r[finite], c[finite]
    diff = np.abs(rf - cf)
    nonzero = np.abs(rf) > 0
    rel = diff[nonzero] / np.abs(rf[nonzero])
    n = r.shape[0] if r.ndim else 1
    per_sample = []
    if r.ndim >= 1 and n:
        r2, c2 = r.reshape(n, -1), c.reshape(n, -1)
        for i in range(n):
            ok = np.isfinite(r2[i]) & np.isfinite(c2[i])
            per_sample.append(cosine(r2[i][ok], c2[i][ok]))
    return {
        "shape": list(c.shape),
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "p99_abs_error": float(np.percentile(diff, 99)) if diff.size else 0.0,
        "max_rel_error": float(rel.max()) if rel.size else 0.0,
        "cosine_similarity": cosine(rf, cf),
        "min_sample_cosine": float(min(per_sample)) if per_sample else 1.0,
        "candidate_nan": int(np.isnan(c).sum()),
        "candidate_inf": int(np.isinf(c).sum()),
        "reference_nonfinite": int((~np.isfinite(r)).sum()),
        "elements": int(c.size),
    }


def is_classifier(ref: np.ndarray, cand: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[1] > 1 and cand.shape == ref.shape


def classification_metrics(ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """top-1 agreement; with labels, both accuracies and the drop (reference minus candidate)."""
    ref_top = np.argmax(np.nan_to_num(ref, nan=-np.inf), axis=1)
    cand_top = np.argmax(np.nan_to_num(cand, nan=-np.inf), axis=1)
    out: dict[str, Any] = {"top1_agreement": float((ref_top == cand_top).mean())}
    if labels is not None:
        out["reference_accuracy"] = float((ref_top == labels).mean())
        out["candidate_accuracy"] = float((cand_top == labels).mean())
        out["accuracy_drop"] = out["reference_accuracy"] - out["candidate_accuracy"]
    return out


def allclose_violations(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    bad = ~(np.abs(r - c) <= atol + rtol * np.abs(r))  # NaN counts as a violation
    count = int(bad.sum())
    out: dict[str, Any] = {"violations": count, "elements": int(r.size)}
    if count:
        excess = np.where(bad, np.nan_to_num(np.abs(r - c) - (atol + rtol * np.abs(r)), nan=np.inf), -np.inf)
        idx = np.unravel_index(int(np.argmax(excess)), r.shape)
        out["worst_index"] = [int(i) for i in idx]
        out["worst_reference"] = float(r[idx])
        out["worst_candidate"] = float(c[idx])
    return out


def agreement(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None = None) -> dict[str, float]:
    """Summary of a candidate's outputs against the reference's on the same inputs: the worst absolute
    error over float outputs and, when the first output is a classifier's scores, top-1 agreement
    and (with labels) both accuracies and the drop (``fp32_accuracy - accuracy``)."""
    result: dict[str, float] = {}
    worst = 0.0
    for r, g in zip(ref, got):
        r = np.asarray(r)
        g = np.asarray(g)
        if r.dtype.kind == "f" and r.size:
            g = g.reshape(r.shape) if g.size == r.size else g
            worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
    result["max_abs_error"] = worst
    first_ref, first_got = np.asarray(ref[0]), np.asarray(got[0])
    if first_ref.ndim >= 2 and first_ref.shape[-1] >= 2 and first_ref.dtype.kind == "f":
        pred_ref = first_ref.argmax(-1).reshape(-1)
        pred = first_got.reshape(first_ref.shape).argmax(-1).reshape(-1)
        result["top1_agreement"] = float(np.mean(pred_ref == pred))
        if labels is not None and labels.ndim == 1 and pred.shape == labels.shape:
            result["accuracy"] = float(np.mean(pred == labels))
            result["fp32_accuracy"] = float(np.mean(pred_ref == labels))
            result["accuracy_drop"] = result["fp32_accuracy"] - result["accuracy"]
    return result


# -- timing -----------------------------------------------------------------------------------


def latency_stats(ns: list[int], batch: int) -> dict[str, float]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    total_s = ms.sum() / 1e3
    return {
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
        "latency_ms_min": float(ms.min()),
        "latency_ms_max": float(ms.max()),
        "latency_ms_std": float(ms.std()),
        "throughput_items_per_s": float(batch * len(ms) / total_s) if total_s > 0 else float("inf"),
    }


#: Warm-up goes on until the median time of the last WARMUP_WINDOW runs is within WARMUP_TOLERANCE
#: of the median of the WARMUP_WINDOW runs before them, for at most WARMUP_MAX_S seconds beyond the
#: runs asked for.
WARMUP_WINDOW = 3
WARMUP_TOLERANCE = 0.10
WARMUP_MAX_S = 3.0


def warm_up(run: Callable[[], object], min_runs: int, *, window: int = WARMUP_WINDOW,
            tolerance: float = WARMUP_TOLERANCE, max_s: float = WARMUP_MAX_S) -> int:
    """Untimed calls of ``run`` until its time per call is stable: at least ``min_runs``, then more
    until the median of the last ``window`` calls is within ``tolerance`` of the median of the
    ``window`` calls before them, or ``max_s`` seconds have passed beyond the minimum. ``min_runs`` 0
    means no warm-up at all (cold figures). Returns how many calls were made."""
    if min_runs <= 0:
        return 0
    clock = time.perf_counter_ns
    times: list[int] = []
    deadline: int | None = None
    while True:
        start = clock()
        run()
        times.append(clock() - start)
        if len(times) < min_runs:
            continue
        if deadline is None:
            deadline = clock() + int(max_s * 1e9)
        if len(times) >= 2 * window:
            recent = statistics.median(times[-window:])
            before = statistics.median(times[-2 * window : -window])
            if abs(recent - before) <= tolerance * before:
                return len(times)
        if clock() >= deadline:
            return len(times)


def time_batch(runtime: Any, native: dict[str, np.ndarray], warmup: int, runs: int) -> list[int]:
    """Nanoseconds of ``runs`` timed ``runtime.run_native(native)`` calls (``time.perf_counter_ns``
    around the call alone; inputs prepared beforehand), after ``warm_up`` (at least ``warmup``
    untimed calls, more until stable). The garbage collector is paused while timing, as in timeit.

    Time one live model at a time (``time_models`` compares several that way). Another ONNX Runtime
    session that ran recently still has its intra-op worker spinning (about 25 ms of CPU after each
    run, ORT's default ``session.intra_op.allow_spinning``); the timed model's worker then wakes on
    its caller's core, and ORT's spin-waiting parallel sections crawl on one core until Linux's load
    balancer separates the two threads, some 0.2-0.9 s later: int8 models ran 3.5x slower."""
    warm_up(lambda: runtime.run_native(native), warmup)
    clock = time.perf_counter_ns
    times = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(runs):
            start = clock()
            runtime.run_native(native)
            times.append(clock() - start)
    finally:
        if collecting:
            gc.enable()
    return times


def time_models(load: Callable[[str], Any], names: Sequence[str], feeds: Mapping[str, np.ndarray], warmup: int,
                runs: int, rounds: int = 3) -> dict[str, list[int]]:
    """``runs`` timed runs of each named model, measured as ``time_batch`` measures one, so the
    figures equal what the benchmark step gives for each model alone. In each of ``rounds`` rounds
    every model in turn is loaded (``load(name)`` returns a Runtime with its thread count set),
    warmed up until stable, timed for its share of the runs and closed: only the model being timed
    is alive (no idle thread pool spins on the cores it needs), and drift in the machine's load
    over the measurement hits every model alike. ``feeds``: the logical inputs (``Runtime.prepare``)."""
    rounds = max(1, min(rounds, runs))
    shares = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    times: dict[str, list[int]] = {name: [] for name in names}
    for share in shares:
        for name in names:
            runtime = load(name)
            try:
                times[name] += time_batch(runtime, runtime.prepare(dict(feeds)), warmup, share)
            finally:
                runtime.close()
                del runtime
    return times


__all__ = [
    "agreement", "allclose_violations", "classification_metrics", "cosine", "is_classifier", "latency_stats",
    "output_metrics", "time_batch", "time_models", "warm_up",
]
