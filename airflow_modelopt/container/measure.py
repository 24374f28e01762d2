"""The one measuring module of the container side: how two models' outputs are compared and how a
model's latency is timed. Validate, benchmark, the ONNX quantization search and the TFLite checks
all measure through these functions, so a figure means the same thing wherever it is logged.
"""

from __future__ import annotations

import time
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


def time_batch(runtime: Any, native: dict[str, np.ndarray], warmup: int, runs: int) -> list[int]:
    for _ in range(warmup):
        runtime.run_native(native)
    times = []
    clock = time.perf_counter_ns
    for _ in range(runs):
        start = clock()
        runtime.run_native(native)
        times.append(clock() - start)
    return times


__all__ = [
    "agreement", "allclose_violations", "classification_metrics", "cosine", "is_classifier", "latency_stats",
    "output_metrics", "time_batch",
]
