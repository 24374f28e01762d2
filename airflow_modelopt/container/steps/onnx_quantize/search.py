"""Measuring and choosing: each int8 model's agreement with fp32 (``measure.agreement``) and its
latency (``measure.time_models``, the benchmark step's way of timing), the accuracy gates, the
choice, and the record of every configuration tried (JSON, Markdown table, ``search.*`` metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext
from airflow_modelopt.container.measure import agreement, latency_stats, time_models
from airflow_modelopt.container.runtimes import Runtime, load
from airflow_modelopt.container.steps.onnx_quantize.calibration import Dataset, iter_batches
from airflow_modelopt.container.steps.onnx_quantize.model import first_line
from airflow_modelopt.container.steps.onnx_quantize.quantize import QuantConfig
from airflow_modelopt.exceptions import ConversionFailed, InputError
from airflow_modelopt.specs.onnx_quantize import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_TOP1_AGREEMENT, OnnxQuantizeSpec

#: Name of the source model among the timed ones.
FP32 = "fp32"


def is_class_output(out: np.ndarray) -> bool:
    """Whether an output is class scores: the rule ``measure.agreement`` computes top-1 agreement by."""
    return out.ndim >= 2 and out.shape[-1] >= 2 and out.dtype.kind == "f"


def open_model(path: Path, threads: int, origin: str) -> Runtime:
    """An ONNX model loaded as the benchmark step loads it: the runtimes layer, ``threads`` intra-op threads."""
    return load(path, "onnx", threads=threads, field="model_uri", origin=origin)


def run_all(runtime: Runtime, data: Dataset, batch: int, pad: bool) -> list[np.ndarray]:
    """The model's outputs over a whole dataset, in batches of ``batch`` (the last one padded with ``pad``)."""
    chunks: list[list[np.ndarray]] = []
    for feed, valid in iter_batches(data.features, batch, pad):
        outs = runtime.run_native(feed)
        chunks.append([o[:valid] for o in outs])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def outputs_of(path: Path, threads: int, origin: str, data: Dataset, batch: int, pad: bool) -> list[np.ndarray]:
    """Load, run over ``data``, close: one model alive at a time."""
    with open_model(path, threads, origin) as runtime:
        return run_all(runtime, data, batch, pad)


# -- gates ------------------------------------------------------------------------------------


@dataclass
class Gates:
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_error: float | None = None

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def check(self, measured: dict[str, float]) -> list[str]:
        reasons = []
        if self.min_top1_agreement is not None and measured.get("top1_agreement", 0.0) < self.min_top1_agreement:
            reasons.append(f"top-1 agreement {measured.get('top1_agreement', 0.0):.4f} < min_top1_agreement "
                           f"{self.min_top1_agreement}")
        if self.max_accuracy_drop is not None and measured.get("accuracy_drop", 1.0) > self.max_accuracy_drop + 1e-12:
            reasons.append(f"accuracy drop {measured.get('accuracy_drop', 1.0):.4f} > max_accuracy_drop "
                           f"{self.max_accuracy_drop}")
        if self.max_abs_error is not None and measured.get("max_abs_error", float("inf")) > self.max_abs_error:
            reasons.append(f"max abs error {measured.get('max_abs_error', float('inf')):.4g} > max_abs_error "
                           f"{self.max_abs_error}")
        return reasons


def resolve_gates(spec: OnnxQuantizeSpec, eval_data: Dataset | None, ref: list[np.ndarray] | None) -> Gates:
    gates = Gates(spec.min_top1_agreement, spec.max_accuracy_drop, spec.max_abs_error)
    if eval_data is None or ref is None:
        return gates
    class_like = is_class_output(ref[0])
    has_labels = eval_data.labels is not None and eval_data.labels.ndim == 1
    if gates.min_top1_agreement is not None and not class_like:
        raise InputError(
            f"min_top1_agreement: the model's first output has shape {list(ref[0].shape)} ({ref[0].dtype}), not class "
            "scores, so top-1 agreement is undefined; gate on max_abs_error instead"
        )
    if gates.max_accuracy_drop is not None and not (has_labels and class_like):
        why = "has no 1-D labels 'y'" if not has_labels else "the model's first output is not class scores"
        raise InputError(f"max_accuracy_drop: needs labels to compute accuracy, but {eval_data.field} {why}")
    if spec.mode == "search" and not gates.active():
        if has_labels and class_like:
            gates.max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
        elif class_like:
            gates.min_top1_agreement = DEFAULT_MIN_TOP1_AGREEMENT
        else:
            raise InputError(
                f"max_abs_error: search mode needs an accuracy gate; the model's first output has shape "
                f"{list(ref[0].shape)}, not class scores, so set max_abs_error"
            )
    return gates


# -- trials -----------------------------------------------------------------------------------


@dataclass
class Trial:
    config: QuantConfig
    path: Path | None = None
    error: str | None = None
    bytes: int = 0
    quantize_s: float = 0.0
    measured: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)  # how it was built (a layerwise choice's per-node record)

    @property
    def passed(self) -> bool:
        return self.error is None and not self.reasons

    @property
    def runnable(self) -> bool:
        return self.path is not None and self.error is None

    def record(self) -> dict[str, Any]:
        return {
            "config": self.config.name, "settings": self.config.as_dict(), "passed": self.passed,
            "error": self.error, "gate_failures": self.reasons, "bytes": self.bytes,
            "quantize_s": round(self.quantize_s, 3), "latency_ms": self.latency.get("ms"),
            "latency": self.latency, **self.measured, **self.detail,
        }


def evaluate(spec: OnnxQuantizeSpec, trials: list[Trial], eval_data: Dataset, reference: list[np.ndarray],
             gates: Gates, batch: int, pad: bool) -> None:
    """Agreement with fp32 and the gates' verdict per trial; a model ORT cannot run fails its
    configuration in search mode and the step otherwise."""
    for trial in trials:
        if trial.path is None:
            continue
        try:
            got = outputs_of(trial.path, spec.intra_op_threads, spec.model_uri, eval_data, batch, pad)
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run is a failed configuration
            if spec.mode != "search":
                raise ConversionFailed(f"ONNX Runtime cannot run the quantized model {trial.config.name!r}: "
                                       f"{first_line(exc)}") from None
            trial.error = f"ONNX Runtime cannot run it: {first_line(exc)}"
            continue
        trial.measured = agreement(reference, got, eval_data.labels)
        trial.reasons = gates.check(trial.measured)


def latency_record(ns: list[int], batch: int, statistic: str) -> dict[str, float]:
    """The search's latency figures from ``measure.latency_stats``; ``ms`` is the one compared."""
    stats = latency_stats(ns, batch)
    record = {"p50_ms": stats["latency_ms_p50"],
              "p90_ms": float(np.percentile(np.asarray(ns, dtype=np.float64) / 1e6, 90)),
              "mean_ms": stats["latency_ms_mean"], "min_ms": stats["latency_ms_min"], "runs": float(len(ns))}
    record["ms"] = record["min_ms" if statistic == "min" else "p50_ms"]
    return record


def search_rounds(runs: int) -> int:
    """Rounds the timed runs are spread over: up to 3, at least 10 runs per model and round."""
    return max(1, min(3, runs // 10))


def time_trials(spec: OnnxQuantizeSpec, source: Path, trials: list[Trial], feed: dict[str, np.ndarray],
                batch: int) -> dict[str, float]:
    """Latency of fp32 and every runnable trial, one model alive at a time (``measure.time_models``);
    sets each trial's ``latency`` and returns fp32's."""
    paths = {FP32: source, **{t.config.name: t.path for t in trials if t.runnable and t.path is not None}}
    ns = time_models(lambda name: open_model(paths[name], spec.intra_op_threads, spec.model_uri), list(paths), feed,
                     spec.warmup_runs, spec.timed_runs, search_rounds(spec.timed_runs))
    latencies = {name: latency_record(times, batch, spec.latency_statistic) for name, times in ns.items()}
    for trial in trials:
        trial.latency = latencies.get(trial.config.name, {})
    return latencies[FP32]


def choose(spec: OnnxQuantizeSpec, trials: list[Trial]) -> Trial | None:
    passing = [t for t in trials if t.passed and t.path is not None]
    if spec.mode == "search":
        return min(passing, key=lambda t: t.latency.get("ms", float("inf"))) if passing else None
    return passing[0] if passing else None


# -- the record -------------------------------------------------------------------------------


def latency_settings(spec: OnnxQuantizeSpec, batch: int) -> dict[str, Any]:
    return {"intra_op_threads": spec.intra_op_threads, "batch_size": batch, "warmup_runs": spec.warmup_runs,
            "timed_runs": spec.timed_runs, "statistic": spec.latency_statistic}


def search_table(trials: list[Trial], fp32_latency: dict[str, float] | None, chosen: str | None,
                 source_bytes: int, threads: int, batch: int, statistic: str) -> str:
    lines = [
        f"Latency of timed runs after warm-up, ONNX Runtime CPU, {threads} intra-op thread(s), batch {batch}, one "
        f"model loaded at a time (as the benchmark step measures); configurations are compared by their {statistic} "
        "latency.", "",
        f"| configuration | chosen | passed | p50 ms | min ms | vs fp32 ({statistic}) | top-1 agreement | accuracy drop "
        "| max abs error | bytes | ratio | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    base = fp32_latency.get("ms") if fp32_latency else None
    if fp32_latency:
        lines.append(f"| fp32 (source) | | | {num(fp32_latency.get('p50_ms'), '.4g')} | "
                     f"{num(fp32_latency.get('min_ms'), '.4g')} | 1.00x | 1.0000 | 0 | 0 | {source_bytes} | 1.00 | |")
    for t in trials:
        used = t.latency.get("ms")
        vs = f"{used / base:.2f}x" if used and base else ""
        note = t.error or "; ".join(t.reasons)
        lines.append(
            f"| {t.config.name} | {'yes' if t.config.name == chosen else ''} | {'yes' if t.passed else 'no'} | "
            f"{num(t.latency.get('p50_ms'), '.4g')} | {num(t.latency.get('min_ms'), '.4g')} | {vs} | "
            f"{num(t.measured.get('top1_agreement'), '.4f')} | "
            f"{num(t.measured.get('accuracy_drop'), '.4f')} | {num(t.measured.get('max_abs_error'), '.4g')} | "
            f"{t.bytes or ''} | {num(t.bytes / source_bytes if t.bytes else None, '.2f')} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def search_metrics(trials: list[Trial]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for t in trials:
        prefix = f"search.{t.config.name}"
        metrics[f"{prefix}.passed"] = 1.0 if t.passed else 0.0
        if t.error:
            continue
        metrics[f"{prefix}.bytes"] = float(t.bytes)
        if "ms" in t.latency:
            metrics[f"{prefix}.latency_ms"] = t.latency["ms"]
        for key in ("top1_agreement", "max_abs_error", "accuracy", "accuracy_drop"):
            if key in t.measured:
                metrics[f"{prefix}.{key}"] = t.measured[key]
    return metrics


def log_search(spec: OnnxQuantizeSpec, ctx: StepContext, trials: list[Trial], fp32_latency: dict[str, float] | None,
               chosen: Trial | None, *, source_bytes: int, gates: Gates, batch: int,
               evaluated_on: str | None) -> dict[str, str]:
    """search/search_results.json and search/search_results.md on the step's run; their URIs."""
    record = {
        "fp32": {"latency": fp32_latency, "bytes": source_bytes}, "gates": gates.active(),
        "chosen": chosen.config.name if chosen else None,
        "latency_settings": latency_settings(spec, batch),
        "evaluated_on": evaluated_on,
        "configurations": [t.record() for t in trials],
    }
    artifacts = {"search_results": ctx.log_dict(record, "search/search_results.json")}
    table = ctx.workdir / "search_results.md"
    table.write_text(search_table(trials, fp32_latency, record["chosen"], source_bytes, spec.intra_op_threads,
                                  batch, spec.latency_statistic))
    artifacts["search_table"] = ctx.log_artifact(table, "search")
    return artifacts
