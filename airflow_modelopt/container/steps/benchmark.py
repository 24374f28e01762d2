"""Step benchmark: what a model costs to serve on this machine.

1. Load the model through ``airflow_modelopt.container.runtimes`` with the given thread count. Inputs come
   from the data artifact (first samples, repeated to fill a batch) or, without one, random
   normal values shaped by the model's inputs.
2. Per batch size: at least ``warmup_runs`` untimed runs (more until the time per run is stable),
   then ``timed_runs`` timed ones (``time.perf_counter_ns`` around the runtime call alone; inputs are
   converted to the model's layout and dtype beforehand): ``measure.time_batch``, the one way every
   step times a model (the ONNX quantization search too). Latency mean, p50, p95, p99, min, max;
   throughput in items/s.
3. Peak memory: a fresh process (``python -m airflow_modelopt.container.runtimes.probe``, same
   interpreter) loads the model and runs every batch size; its RSS high-water mark is the number.
4. Bytes on disk of the model's files; runtime name, thread count and a hardware fingerprint
   (CPU model, cores, memory) are tags of the run.
5. Flags against the guide's targets: p95 latency at the smallest batch < ``max_latency_ms``
   (100), throughput at the smallest batch > ``min_throughput`` (30 items/s), peak memory <
   ``max_peak_memory_mb`` (500 MB). Flags only, unless ``enforce_targets`` makes them a gate.
6. Report: ``benchmark/report.json`` and ``benchmark/report.md``.

``comparison_plot(rows)`` draws latency vs size vs accuracy across a DAG run's candidates with the
Pareto front marked; the promote step logs it on the parent run (``log_comparison_plot``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import as_model_dtype, load_npz, match_inputs, take_batch
from airflow_modelopt.container.measure import latency_stats, time_batch
from airflow_modelopt.container.runtimes.probe import hardware_fingerprint
from airflow_modelopt.exceptions import GateFailed, InputError, StepFailed
from airflow_modelopt.specs import Verdict
from airflow_modelopt.specs.benchmark import BenchmarkSpec

REPORT_DIR = "benchmark"
MB = 1_000_000

# -- measurement ------------------------------------------------------------------------------


def sample_feeds(runtime: Any, data_path: Path | None, batch: int) -> dict[str, np.ndarray]:
    """Logical feeds of ``batch`` samples: from the data artifact, else random normal."""
    if data_path is not None:
        arrays = load_npz(data_path, field="data_uri")
        feeds = {k: as_model_dtype(v) for k, v in match_inputs(arrays, runtime.feed_names, field="data_uri").items()}
        return take_batch(feeds, batch)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runtime.inputs:
        shape = runtime.logical_shape(spec)
        key = spec.source_name or spec.name
        dynamic = [i for i, d in enumerate(shape[1:], 1) if d is None or isinstance(d, str) or int(d) < 1]
        if spec.name in runtime.unknown_shapes or not shape or dynamic:
            raise InputError(
                f"data_uri: input {key!r} of the {runtime.format} model has no fixed shape "
                f"({'unknown' if not shape else shape}); give sample inputs with data_uri"
            )
        dims = (batch, *[int(d) for d in shape[1:]])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f" or spec.quantization is not None:
            feeds[key] = rng.standard_normal(dims).astype(np.float32 if dtype.kind != "f" else dtype)
        elif dtype.kind in "iu":
            feeds[key] = rng.integers(0, 2, dims).astype(dtype)
        else:
            feeds[key] = np.zeros(dims, dtype=dtype)
    return feeds


def peak_memory(spec: BenchmarkSpec, model_path: Path, feeds_path: Path, ctx: StepContext,
                batch_sizes: list[int] | None = None) -> dict[str, Any]:
    """Run the probe in a fresh interpreter; its RSS high-water mark after load and runs at
    ``batch_sizes`` (default: the spec's)."""
    request = {"path": str(model_path), "format": spec.model_format, "threads": spec.threads, "device": spec.device,
               "batch_sizes": batch_sizes or spec.batch_sizes, "runs": 3, "feeds": str(feeds_path)}
    cmd = [sys.executable, "-m", "airflow_modelopt.container.runtimes.probe", json.dumps(request)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ctx.log.info("Measuring peak memory in a fresh process")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=spec.memory_timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"memory_timeout_s: the peak-memory process ran longer than {spec.memory_timeout_s:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise StepFailed(f"the peak-memory process failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def targets(spec: BenchmarkSpec, per_batch: dict[int, dict[str, float]], peak_mb: float | None) -> list[dict[str, Any]]:
    smallest = min(per_batch)
    stats = per_batch[smallest]
    flags = [
        {"target": "latency", "measure": f"p95 latency at batch {smallest} (ms)", "threshold": spec.max_latency_ms,
         "value": stats["latency_ms_p95"], "met": stats["latency_ms_p95"] < spec.max_latency_ms, "rule": "<"},
        {"target": "throughput", "measure": f"items/s at batch {smallest}", "threshold": spec.min_throughput,
         "value": stats["throughput_items_per_s"], "met": stats["throughput_items_per_s"] > spec.min_throughput,
         "rule": ">"},
    ]
    flags.append({"target": "peak_memory", "measure": "peak RSS of a fresh process (MB)",
                  "threshold": spec.max_peak_memory_mb, "value": peak_mb,
                  "met": None if peak_mb is None else peak_mb < spec.max_peak_memory_mb, "rule": "<"})
    return flags


# -- report -----------------------------------------------------------------------------------


def markdown_report(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [f"# Benchmark: {report['name']}", "",
             f"`{report['model_uri']}`: {report['format']} on {report['runtime']}, {report['threads']} thread(s); "
             f"{report['model_bytes']:,} bytes on disk.",
             f"Hardware: {hw.get('cpu_model')} ({hw.get('physical_cores')} cores, {hw.get('usable_cpus')} usable CPUs, "
             f"{hw.get('memory_gib')} GiB){', GPU ' + hw['gpu'] if hw.get('gpu') else ''}.",
             f"{report['warmup_runs']} warm-up and {report['timed_runs']} timed runs per batch size.", "",
             "| batch | mean ms | p50 ms | p95 ms | p99 ms | items/s |", "| --- | --- | --- | --- | --- | --- |"]
    for batch, s in report["batches"].items():
        lines.append(f"| {batch} | {s['latency_ms_mean']:.3f} | {s['latency_ms_p50']:.3f} | {s['latency_ms_p95']:.3f} | "
                     f"{s['latency_ms_p99']:.3f} | {s['throughput_items_per_s']:,.1f} |")
    for batch, why in (report.get("skipped_batch_sizes") or {}).items():
        lines.append(f"| {batch} | not run: {why} | | | | |")
    mem = report.get("memory")
    if mem:
        lines += ["", f"Peak RSS of a fresh process that loads and runs the model: {mem['peak_rss_bytes'] / MB:.1f} MB "
                  f"(interpreter before loading: {(mem.get('baseline_rss_bytes') or 0) / MB:.1f} MB; "
                  f"load {mem['load_time_s']:.2f} s)."]
    lines += ["", "| target | measure | threshold | measured | met |", "| --- | --- | --- | --- | --- |"]
    for f in report["targets"]:
        value = "-" if f["value"] is None else (f"{f['value']:,.1f}" if f["target"] == "throughput" else f"{f['value']:.3f}")
        met = "not measured" if f["met"] is None else ("yes" if f["met"] else "**no**")
        lines.append(f"| {f['target']} | {f['measure']} | {f['rule']} {f['threshold']:g} | {value} | {met} |")
    return "\n".join(lines) + "\n"


# -- the step ---------------------------------------------------------------------------------


def run(spec: BenchmarkSpec, ctx: StepContext) -> StepOutput:
    from airflow_modelopt.container.runtimes import load

    model_path = ctx.input("model_uri")
    assert model_path is not None
    data_path = ctx.input("data_uri")
    runtime = load(model_path, spec.model_format, threads=spec.threads, device=spec.device, field="model_uri",
                   origin=spec.model_uri)
    largest = max(spec.batch_sizes)
    try:
        feeds = sample_feeds(runtime, data_path, largest)
        runtime.prepare(take_batch(feeds, 1), field="data_uri")  # a wrong shape or dtype fails here, named
        per_batch: dict[int, dict[str, float]] = {}
        skipped: dict[str, str] = {}
        for batch in spec.batch_sizes:
            native = runtime.prepare(take_batch(feeds, batch), field="data_uri")
            try:
                runtime.run_native(native)
            except Exception as exc:  # noqa: BLE001 - e.g. a fixed-batch model fed another batch
                text = str(exc).strip().splitlines()[0][:800] if str(exc).strip() else type(exc).__name__
                if not per_batch:
                    raise InputError(f"batch_sizes: the {runtime.format} model does not run at batch size {batch}: "
                                     f"{text}") from None
                # A model with a fixed batch (litert-torch's TFLite, a TensorRT profile) is measured at the
                # sizes it runs; the others are named in the report, the run's tag and the log.
                skipped[str(batch)] = text
                ctx.log.warning("batch %d skipped: the %s model does not run at it (%s)", batch, runtime.format, text)
                continue
            ns = time_batch(runtime, native, spec.warmup_runs, spec.timed_runs)
            per_batch[batch] = latency_stats(ns, batch)
            ctx.log.info("batch %d: mean %.3f ms, p95 %.3f ms, %.1f items/s", batch, per_batch[batch]["latency_ms_mean"],
                         per_batch[batch]["latency_ms_p95"], per_batch[batch]["throughput_items_per_s"])
        model_bytes = runtime.model_bytes()
        model_file = runtime.path
        description = runtime.describe()
        runtime_name, fmt = runtime.runtime_name, runtime.format
    finally:
        runtime.close()

    memory = None
    if spec.measure_memory:
        feeds_path = ctx.workdir / "benchmark_inputs.npz"
        np.savez(feeds_path, **take_batch(feeds, max(per_batch)))  # the largest batch the model ran
        memory = peak_memory(spec, model_file, feeds_path, ctx, sorted(per_batch))  # the sizes the model ran
        ctx.log.info("Peak RSS %.1f MB", memory["peak_rss_bytes"] / MB)
    peak_mb = memory["peak_rss_bytes"] / MB if memory else None
    flags = targets(spec, per_batch, peak_mb)

    hw = hardware_fingerprint()
    tags = {f"modelopt.hw.{k}": v for k, v in hw.items()}
    tags.update({"modelopt.runtime": runtime_name, "modelopt.runtime_threads": str(spec.threads),
                 "modelopt.model_format": fmt})
    if skipped:
        tags["modelopt.benchmark.skipped_batch_sizes"] = ", ".join(skipped)
    for key, value in tags.items():
        ctx.client.set_tag(ctx.run_id, key, str(value)[:5000])

    metrics: dict[str, float] = {"model_bytes": float(model_bytes), "threads": float(spec.threads)}
    for batch, stats in per_batch.items():
        metrics.update({f"{k}_b{batch}": v for k, v in stats.items()})
    smallest = per_batch[min(per_batch)]
    metrics.update({"latency_ms_p50": smallest["latency_ms_p50"], "latency_ms_p95": smallest["latency_ms_p95"],
                    "latency_ms_mean": smallest["latency_ms_mean"],
                    "throughput_items_per_s": smallest["throughput_items_per_s"],
                    "best_throughput_items_per_s": max(s["throughput_items_per_s"] for s in per_batch.values())})
    if memory:
        metrics["peak_rss_mb"] = peak_mb
        metrics["load_time_s"] = float(memory["load_time_s"])
    for f in flags:
        if f["met"] is not None:
            metrics[f"target_{f['target']}_met"] = 1.0 if f["met"] else 0.0

    name = spec.candidate_name or Path(spec.model_uri.rstrip("/")).name or fmt
    report = {
        "name": name, "model_uri": spec.model_uri, "format": fmt, "runtime": runtime_name, "threads": spec.threads,
        "model_bytes": model_bytes, "warmup_runs": spec.warmup_runs, "timed_runs": spec.timed_runs,
        "batches": {str(b): s for b, s in per_batch.items()}, "memory": memory, "targets": flags, "hardware": hw,
        "signature": description, "skipped_batch_sizes": skipped,
    }
    folder = ctx.workdir / REPORT_DIR
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(markdown_report(report))
    ctx.log_artifact(folder, REPORT_DIR)
    artifacts = {"report": ctx.artifact_uri(f"{REPORT_DIR}/report.json"),
                 "report_md": ctx.artifact_uri(f"{REPORT_DIR}/report.md")}
    missed = [f for f in flags if f["met"] is False]
    reasons = [f"target {f['target']}: {f['measure']} is {f['value']:.3f}, needs {f['rule']} {f['threshold']:g}" for f in missed]
    for reason in reasons:
        ctx.log.warning("%s", reason)
    if missed and spec.enforce_targets:
        ctx.log_metrics(metrics)
        raise GateFailed(f"benchmark of {spec.model_uri} missed its targets: " + "; ".join(reasons))
    return StepOutput(
        artifacts=artifacts,
        metrics=metrics,
        info={"name": name, "format": fmt, "runtime": runtime_name, "threads": spec.threads, "hardware": hw,
              "targets": flags, "skipped_batch_sizes": skipped},
        verdict=Verdict(passed=not missed, reasons=reasons) if spec.enforce_targets else None,
    )


# -- comparison across candidates -------------------------------------------------------------


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the rows no other row dominates: lower latency, smaller size and (when given)
    higher accuracy, at least as good in all and better in one."""

    def key(row: dict[str, Any]) -> tuple[float, ...]:
        acc = row.get("accuracy")
        return (float(row["latency_ms"]), float(row["size_bytes"]), -float(acc) if acc is not None else 0.0)

    keys = [key(r) for r in rows]
    front = []
    for i, a in enumerate(keys):
        dominated = any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)) for j, b in enumerate(keys) if j != i)
        if not dominated:
            front.append(i)
    return front


def human_size(n: float) -> str:
    """Bytes for a person: ``812 B``, ``46.2 kB``, ``3.41 MB``."""
    for unit, size in (("GB", 1e9), ("MB", MB), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def comparison_plot(rows: list[dict[str, Any]], path: Path | str | None = None, title: str = "Candidates") -> Path:
    """Latency vs accuracy (marker area ~ size on disk) of a DAG run's candidates, Pareto front
    marked; without accuracies, or when every candidate has the same accuracy (then only latency
    and size tell them apart, and the title says so), latency vs size. Each row: ``name``,
    ``latency_ms``, ``size_bytes``, optional ``accuracy``. Returns the PNG's path."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise InputError("comparison_plot: no candidates to plot")
    for i, row in enumerate(rows):
        missing = [k for k in ("name", "latency_ms", "size_bytes") if row.get(k) is None]
        if missing:
            raise InputError(f"comparison_plot: row {i} ({row.get('name', '?')}) lacks {missing}")
    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="modelopt-plot-")) / "comparison.png"
    front = set(pareto_front(rows))
    accuracies = [r.get("accuracy") for r in rows]
    has_acc = all(a is not None for a in accuracies)
    same_acc = has_acc and max(accuracies) - min(accuracies) < 1e-9
    with_acc = has_acc and not same_acc
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sizes = np.array([float(r["size_bytes"]) for r in rows])
    area = 60 + 540 * (sizes / sizes.max() if sizes.max() > 0 else sizes)
    x = np.array([float(r["latency_ms"]) for r in rows])
    # Sizes in kB below a megabyte: a 48 kB model reads "48", not "0.05".
    size_unit, size_scale = ("MB", MB) if sizes.max() >= MB else ("kB", 1e3)
    y = np.array([float(a) for a in accuracies]) if with_acc else sizes / size_scale
    colors = ["#dc2626" if i in front else "#64748b" for i in range(len(rows))]
    # Not clipped: a candidate at accuracy 1.0 sits on the axis' top edge, whole.
    ax.scatter(x, y, s=area, c=colors, alpha=0.7, edgecolors="black", linewidths=0.6, clip_on=False)
    log_x = bool(x.min() > 0 and x.max() / x.min() > 20)
    if log_x:
        ax.set_xscale("log")
    # Labels of points in the right part of the plot go to their left, so none runs out of the frame.
    pos = np.log(x) if log_x else x
    span = float(pos.max() - pos.min()) or 1.0
    for i, row in enumerate(rows):
        label = f"{row['name']}\n{human_size(sizes[i])}" if with_acc else str(row["name"])
        right = (pos[i] - pos.min()) / span > 0.6
        ax.annotate(label, (x[i], y[i]), textcoords="offset points", xytext=(-10 if right else 10, 6),
                    ha="right" if right else "left", fontsize=8)
    order = sorted(front, key=lambda i: x[i])
    if len(order) > 1:
        ax.plot(x[order], y[order], color="#dc2626", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter([], [], c="#dc2626", label="on the Pareto front")
    ax.scatter([], [], c="#64748b", label="dominated")
    ax.margins(x=0.2, y=0.2)
    ax.set_xlabel("latency p50 (ms)")
    if with_acc:
        # Accuracy is a share: the axis never goes past 1.0 (nor below 0), however the margins fall.
        low, high = ax.get_ylim()
        ax.set_ylim(max(0.0, low), min(1.0, high))
        ax.set_ylabel("top-1 accuracy")
    else:
        ax.set_ylabel(f"size on disk ({size_unit})")
        ax.set_ylim(bottom=0)
    note = " (marker area ~ size on disk)" if with_acc else ""
    if same_acc:
        note = f"\nall candidates have the same accuracy ({accuracies[0]:.4g}): latency and size decide"
    ax.set_title(title + note, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_comparison_plot(client: Any, parent_run_id: str, rows: list[dict[str, Any]],
                        artifact_path: str = "comparison") -> str:
    """Draw the comparison and log it (PNG plus the rows as JSON) on the DAG run's parent run."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="modelopt-compare-") as tmp:
        png = comparison_plot(rows, Path(tmp) / "candidates.png")
        front = pareto_front(rows)
        data = [{**r, "pareto": i in front} for i, r in enumerate(rows)]
        (Path(tmp) / "candidates.json").write_text(json.dumps(data, indent=2, default=str))
        client.log_artifacts(parent_run_id, tmp, artifact_path)
    return f"runs:/{parent_run_id}/{artifact_path}/{png.name}"


__all__ = ["comparison_plot", "human_size", "log_comparison_plot", "pareto_front", "run"]
