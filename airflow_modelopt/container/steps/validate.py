"""Step validate: does the candidate compute what the reference computes?

1. Load both models through ``airflow_modelopt.container.runtimes`` (any two formats) and the evaluation
   data (.npz: inputs keyed by name in the reference's source layout, labels under ``y``).
   Layout (NCHW <-> NHWC) and int8/uint8 I/O are converted from each model's recorded signature.
2. Run both on the same samples. Per output: max and mean absolute error, max relative error
   (over reference elements that are not 0), cosine similarity (whole output, and the worst
   sample), non-finite values. For a classifier output (2-D, more than one column): top-1
   agreement; with labels, the accuracy of both and the drop.
3. Gates: atol/rtol (numpy.allclose), min_cosine, min_top1_agreement, max_accuracy_drop
   (default 0.02, with labels). NaN or inf in the candidate's outputs fails on its own. When no
   gate compared the models (no labels and none set), top-1 agreement >= 0.90 (classifiers) or
   cosine >= 0.99 (other outputs) applies: a verdict never rests on nothing measured. Labels
   outside the classes, NaN/inf data and a reference with non-finite outputs are bad input (exit 2).
4. Report: ``validation/report.json``, ``validation/report.md`` (tables), and
   ``validation/error_distribution.png``, logged to the step's MLflow run with every metric,
   whether the verdict passed or failed. A failed verdict then raises GateFailed naming each
   failed gate, its threshold and the measured value (exit 3, not retried).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.data import LABEL_KEY, load_npz, match_inputs
from airflow_modelopt.container.measure import (
    allclose_violations,
    classification_metrics,
    is_classifier,
    output_metrics,
)
from airflow_modelopt.container.tracking import TAG_VERDICT
from airflow_modelopt.exceptions import GateFailed, InputError
from airflow_modelopt.specs import Verdict
from airflow_modelopt.specs.validate import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1_AGREEMENT, ValidateEquivalenceSpec

REPORT_DIR = "validation"


# -- measurements -----------------------------------------------------------------------------


def evaluate(spec: ValidateEquivalenceSpec, ref_out: list[np.ndarray], cand_out: list[np.ndarray], names: list[str],
             labels: np.ndarray | None) -> dict[str, Any]:
    """Every measurement, every gate, and the verdict. min_top1_agreement on an output that holds
    no class scores is an InputError; max_accuracy_drop without labels is skipped (and says so).
    When no gate compared the models (no labels, nothing set), the default agreement gates apply
    (``specs/validate.py``); a verdict never rests on no measured gate."""
    gates: list[dict[str, Any]] = []
    reasons: list[str] = []

    def gate(name: str, threshold: float, value: float, passed: bool, detail: str, reason: str) -> None:
        gates.append({"gate": name, "threshold": threshold, "value": value, "passed": passed, "detail": detail})
        if not passed:
            reasons.append(reason)

    if len(ref_out) != len(cand_out):
        reasons.append(f"output count: the candidate has {len(cand_out)} outputs, the reference {len(ref_out)}")
        return {"outputs": {}, "classification": None, "gates": gates, "passed": False, "reasons": reasons}

    outputs: dict[str, Any] = {}
    comparable: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, r, c in zip(names, ref_out, cand_out):
        if r.shape != c.shape:
            reasons.append(f"output {name!r} shape: the candidate gives {list(c.shape)}, the reference {list(r.shape)}")
            outputs[name] = {"shape": list(c.shape), "reference_shape": list(r.shape)}
            continue
        m = output_metrics(r, c)
        outputs[name] = m
        comparable.append((name, r, c))
        nonfinite = m["candidate_nan"] + m["candidate_inf"]
        gate("finite_outputs", 0, nonfinite, nonfinite == 0, f"output {name!r}",
             f"gate finite_outputs: candidate output {name!r} has {m['candidate_nan']} NaN and {m['candidate_inf']} inf "
             f"values (of {m['elements']}); threshold 0")
        if m["reference_nonfinite"]:
            raise InputError(
                f"reference_uri: the reference model's output {name!r} has {m['reference_nonfinite']} NaN/inf values "
                "on finite evaluation data: the reference itself is broken (damaged weights?), nothing to compare against"
            )

    if spec.atol is not None:
        atol, rtol = spec.atol, spec.rtol or 0.0
        for name, r, c in comparable:
            v = allclose_violations(r, c, atol, rtol)
            m = outputs[name]
            where = ""
            if v["violations"]:
                where = (f"; worst at index {v['worst_index']}: reference {v['worst_reference']:.6g}, "
                         f"candidate {v['worst_candidate']:.6g}")
            nonfinite = m["candidate_nan"] + m["candidate_inf"]
            worst = m["max_abs_error"] if nonfinite == 0 else float("inf")
            gate("atol", atol, worst, v["violations"] == 0,
                 f"output {name!r}: {v['violations']} of {v['elements']} elements outside atol {atol:g} + rtol {rtol:g}*|ref|",
                 f"gate atol: output {name!r} max abs error {worst:.4g} exceeds atol {atol:g} "
                 f"(rtol {rtol:g}) at {v['violations']} of {v['elements']} elements{where}")
    if spec.min_cosine is not None:
        for name, _, _ in comparable:
            cos = outputs[name]["cosine_similarity"]
            gate("min_cosine", spec.min_cosine, cos, cos >= spec.min_cosine, f"output {name!r}",
                 f"gate min_cosine: output {name!r} cosine similarity {cos:.6f} is below the threshold {spec.min_cosine:g}")

    classification = None
    if spec.class_output >= len(names):
        raise InputError(f"class_output: {spec.class_output}, but the models have {len(names)} output(s) {names}")
    class_name = names[spec.class_output]
    pair = next(((r, c) for n, r, c in comparable if n == class_name), None)
    if pair is not None and is_classifier(*pair):
        if labels is not None and labels.shape[0] != pair[0].shape[0]:
            raise InputError(f"data_uri: labels {LABEL_KEY!r} hold {labels.shape[0]} values for {pair[0].shape[0]} samples")
        classes = pair[0].shape[1]
        if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise InputError(
                f"data_uri: labels {LABEL_KEY!r} range from {int(labels.min())} to {int(labels.max())}, but output "
                f"{class_name!r} scores {classes} classes (labels 0..{classes - 1}); accuracy would measure nothing"
            )
        classification = {"output": class_name, **classification_metrics(pair[0], pair[1], labels)}
    elif spec.min_top1_agreement is not None and pair is not None:
        raise InputError(
            f"min_top1_agreement needs class scores, but output {class_name!r} has shape {list(pair[0].shape)}; "
            "set class_output to the index of the (samples, classes) output"
        )

    if spec.min_top1_agreement is not None and classification is not None:
        v = classification["top1_agreement"]
        gate("min_top1_agreement", spec.min_top1_agreement, v, v >= spec.min_top1_agreement, f"output {class_name!r}",
             f"gate min_top1_agreement: top-1 agreement {v:.4f} is below the threshold {spec.min_top1_agreement:g}")
    if spec.max_accuracy_drop is not None:
        if classification is not None and "accuracy_drop" in classification:
            v = classification["accuracy_drop"]
            gate("max_accuracy_drop", spec.max_accuracy_drop, v, v <= spec.max_accuracy_drop + 1e-12,
                 f"reference {classification['reference_accuracy']:.4f}, candidate {classification['candidate_accuracy']:.4f}",
                 f"gate max_accuracy_drop: accuracy dropped by {v:.4f} (reference {classification['reference_accuracy']:.4f}, "
                 f"candidate {classification['candidate_accuracy']:.4f}), above the threshold {spec.max_accuracy_drop:g}")
        else:
            gates.append({"gate": "max_accuracy_drop", "threshold": spec.max_accuracy_drop, "value": None,
                          "passed": None, "detail": "not checked: " + ("no labels" if labels is None else "not a classifier")})
    if not any(g["passed"] is not None and g["gate"] != "finite_outputs" for g in gates):
        # Nothing compared the two models yet (no labels, no gate set): agreement decides.
        if classification is not None:
            v, limit = classification["top1_agreement"], DEFAULT_MIN_TOP1_AGREEMENT
            gate("min_top1_agreement", limit, v, v >= limit, f"output {class_name!r} (default: no labels decide)",
                 f"gate min_top1_agreement (default without labels): top-1 agreement {v:.4f} is below {limit:g}")
        else:
            for name, _, _ in comparable:
                cos, limit = outputs[name]["cosine_similarity"], DEFAULT_MIN_COSINE
                gate("min_cosine", limit, cos, cos >= limit, f"output {name!r} (default: no labels decide)",
                     f"gate min_cosine (default without labels): output {name!r} cosine similarity {cos:.6f} "
                     f"is below {limit:g}")
    if not any(g["passed"] is not None and g["gate"] != "finite_outputs" for g in gates) and not reasons:
        reasons.append("no gate compared the candidate with the reference (no comparable output); no verdict")
    passed = not reasons
    return {"outputs": outputs, "classification": classification, "gates": gates, "passed": passed, "reasons": reasons}


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: the worst value over outputs, per-output values when there are several."""
    outs = {k: v for k, v in evaluation["outputs"].items() if "max_abs_error" in v}
    metrics: dict[str, float] = {}
    keys = {"max_abs_error": max, "mean_abs_error": max, "p99_abs_error": max, "max_rel_error": max,
            "cosine_similarity": min, "min_sample_cosine": min}
    if outs:
        for key, pick in keys.items():
            metrics[key] = float(pick(v[key] for v in outs.values()))
        metrics["candidate_nonfinite"] = float(sum(v["candidate_nan"] + v["candidate_inf"] for v in outs.values()))
    if len(outs) > 1:
        for name, v in outs.items():
            safe = re.sub(r"[^\w\-. /]", "_", name)  # MLflow metric names: no ':' (TFLite tensor names)
            for key in keys:
                metrics[f"{safe}.{key}"] = float(v[key])
    for key, value in (evaluation.get("classification") or {}).items():
        if isinstance(value, float):
            metrics[key] = value
    metrics["passed"] = 1.0 if evaluation["passed"] else 0.0
    return metrics


# -- report -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def markdown_report(report: dict[str, Any]) -> str:
    ref, cand, ev = report["reference"], report["candidate"], report["evaluation"]
    lines = [f"# Validation: {report['candidate_name']}", ""]
    lines += ["| | reference | candidate |", "| --- | --- | --- |",
              f"| model | `{ref['uri']}` | `{cand['uri']}` |",
              f"| format | {ref['format']} | {cand['format']} |",
              f"| runtime | {ref['runtime']} | {cand['runtime']} |",
              f"| inference time (s) | {_fmt(ref['seconds'])} | {_fmt(cand['seconds'])} |"]
    cls = ev.get("classification") or {}
    if "reference_accuracy" in cls:
        lines.append(f"| top-1 accuracy | {_fmt(cls['reference_accuracy'])} | {_fmt(cls['candidate_accuracy'])} |")
    lines += ["", f"Samples: {report['samples']} from `{report['data_uri']}`.", "", "## Outputs", "",
              "| output | shape | max abs | mean abs | p99 abs | max rel | cosine | worst sample cosine | NaN | inf |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in ev["outputs"].items():
        if "max_abs_error" not in m:
            lines.append(f"| {name} | {m['shape']} vs {m['reference_shape']} | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {m['shape']} | {_fmt(m['max_abs_error'])} | {_fmt(m['mean_abs_error'])} | "
            f"{_fmt(m['p99_abs_error'])} | {_fmt(m['max_rel_error'])} | {m['cosine_similarity']:.6f} | "
            f"{m['min_sample_cosine']:.6f} | {m['candidate_nan']} | {m['candidate_inf']} |"
        )
    if cls:
        lines += ["", f"## Classification (output `{cls['output']}`)", "", "| measure | value |", "| --- | --- |",
                  f"| top-1 agreement | {_fmt(cls['top1_agreement'])} |"]
        if "accuracy_drop" in cls:
            lines += [f"| reference accuracy | {_fmt(cls['reference_accuracy'])} |",
                      f"| candidate accuracy | {_fmt(cls['candidate_accuracy'])} |",
                      f"| accuracy drop | {_fmt(cls['accuracy_drop'])} |"]
    lines += ["", "## Gates", "", "| gate | threshold | measured | result | detail |", "| --- | --- | --- | --- | --- |"]
    for g in ev["gates"]:
        result = "skipped" if g["passed"] is None else ("pass" if g["passed"] else "**FAIL**")
        lines.append(f"| {g['gate']} | {_fmt(g['threshold'])} | {_fmt(g['value'])} | {result} | {g['detail']} |")
    lines += ["", f"**Verdict: {'PASSED' if ev['passed'] else 'FAILED'}**"]
    lines += [f"- {r}" for r in ev["reasons"]]
    return "\n".join(lines) + "\n"


def error_plot(ref_out: list[np.ndarray], cand_out: list[np.ndarray], names: list[str], path: Path, title: str) -> Path:
    """Per output: histogram of absolute errors (log scale) and candidate vs reference values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(n, r, c) for n, r, c in zip(names, ref_out, cand_out) if r.shape == c.shape]
    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.8 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for row, (name, r, c) in enumerate(pairs):
        r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        ok = np.isfinite(r64) & np.isfinite(c64)
        diff = np.abs(r64[ok] - c64[ok])
        ax = axes[row][0]
        positive = diff[diff > 0]
        if positive.size:
            lo, hi = np.log10(positive.min()), np.log10(positive.max())
            bins = np.logspace(lo, hi if hi > lo else lo + 1, 50)
            ax.hist(positive, bins=bins, color="#2563eb")
            ax.set_xscale("log")
        zeros = int((diff == 0).sum())
        ax.set_title(f"{name}: |candidate - reference| ({zeros} exact, {int((~ok).sum())} non-finite)")
        ax.set_xlabel("absolute error")
        ax.set_ylabel("elements")
        ax = axes[row][1]
        idx = np.flatnonzero(ok)
        if idx.size > 5000:
            idx = rng.choice(idx, 5000, replace=False)
        ax.scatter(r64[idx], c64[idx], s=3, alpha=0.4, color="#16a34a")
        if idx.size:
            lo, hi = float(min(r64[idx].min(), c64[idx].min())), float(max(r64[idx].max(), c64[idx].max()))
            ax.plot([lo, hi], [lo, hi], color="#dc2626", linewidth=1)
        ax.set_xlabel("reference")
        ax.set_ylabel("candidate")
        ax.set_title(f"{name}: values")
    if not pairs:
        axes[0][0].text(0.5, 0.5, "no output with matching shapes", ha="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- the step ---------------------------------------------------------------------------------


def class_labels(y: np.ndarray | None) -> tuple[np.ndarray | None, str | None]:
    """Integer class labels from ``y``, or (None, why not): 1-D, integers (or integral floats)."""
    if y is None:
        return None, None
    if y.ndim == 1 and y.dtype.kind in "iu":
        return y.astype(np.int64), None
    if y.ndim == 1 and y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64), None
    return None, (f"labels {LABEL_KEY!r} ({y.dtype.name} {list(y.shape)}) are not 1-D class indices; "
                  "accuracy is not measured")


def _run(rt: Any, feeds: dict[str, np.ndarray], batch: int, role: str) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    try:
        outs = rt.run(feeds, batch_size=batch, field="data_uri")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a runtime refusing the data: name the model
        text = str(exc).strip().splitlines()[0][:800] if str(exc).strip() else ""
        raise InputError(f"{role}: the {rt.format} model failed on the evaluation data: {type(exc).__name__}: {text}") from None
    return outs, time.perf_counter() - started


def run(spec: ValidateEquivalenceSpec, ctx: StepContext) -> StepOutput:
    from airflow_modelopt.container.runtimes import load

    data_path = ctx.input("data_uri")
    assert data_path is not None
    arrays = load_npz(data_path, field="data_uri")
    labels, label_note = class_labels(arrays.get(LABEL_KEY))
    if label_note:
        ctx.log.warning("data_uri: %s", label_note)

    ref_rt = load(ctx.input("reference_uri"), spec.reference_format, threads=spec.threads, device=spec.device,
                  field="reference_uri", origin=spec.reference_uri)
    cand_rt = load(ctx.input("candidate_uri"), spec.candidate_format, threads=spec.threads, device=spec.device,
                   field="candidate_uri", origin=spec.candidate_uri)
    try:
        feeds = match_inputs(arrays, ref_rt.feed_names, field="data_uri")
        if spec.max_samples is not None:
            feeds = {k: v[: spec.max_samples] for k, v in feeds.items()}
            labels = labels[: spec.max_samples] if labels is not None else None
        samples = next(iter(feeds.values())).shape[0]
        cand_feeds = {k: v[:samples] for k, v in match_inputs(arrays, cand_rt.feed_names, field="data_uri").items()}
        ctx.log.info("Running the reference (%s) on %d samples", ref_rt.runtime_name, samples)
        ref_out, ref_s = _run(ref_rt, feeds, spec.batch_size, "reference_uri")
        ctx.log.info("Running the candidate (%s)", cand_rt.runtime_name)
        cand_out, cand_s = _run(cand_rt, cand_feeds, spec.batch_size, "candidate_uri")
        names = ref_rt.output_names
        evaluation = evaluate(spec, ref_out, cand_out, names, labels)
        name = spec.candidate_name or f"{cand_rt.format} vs {ref_rt.format}"
        report = {
            "candidate_name": name,
            "data_uri": spec.data_uri,
            "samples": int(samples),
            "labels": labels is not None,
            "labels_note": label_note,
            "reference": {"uri": spec.reference_uri, "format": ref_rt.format, "runtime": ref_rt.runtime_name,
                          "seconds": ref_s, "signature": ref_rt.describe()},
            "candidate": {"uri": spec.candidate_uri, "format": cand_rt.format, "runtime": cand_rt.runtime_name,
                          "seconds": cand_s, "signature": cand_rt.describe()},
            "thresholds": {k: getattr(spec, k) for k in ("atol", "rtol", "min_cosine", "min_top1_agreement",
                                                         "max_accuracy_drop")},
            "evaluation": evaluation,
        }
        metrics = flat_metrics(evaluation)
        metrics.update({"samples": float(samples), "reference_seconds": ref_s, "candidate_seconds": cand_s})
        artifacts = log_report(ctx, report, ref_out, cand_out, names)
    finally:
        ref_rt.close()
        cand_rt.close()

    verdict = Verdict(passed=evaluation["passed"], reasons=evaluation["reasons"])
    ctx.client.set_tag(ctx.run_id, TAG_VERDICT, "passed" if verdict.passed else "failed")
    ctx.log.info("Verdict for %s: %s", name, "PASSED" if verdict.passed else "FAILED: " + "; ".join(verdict.reasons))
    if not verdict.passed:
        ctx.log_metrics(metrics)  # the runner logs metrics only for a step that returns
        raise GateFailed(f"validation of {spec.candidate_uri} against {spec.reference_uri} failed: "
                         + "; ".join(verdict.reasons) + f" (report: {artifacts['report_md']})")
    return StepOutput(
        artifacts=artifacts,
        metrics=metrics,
        info={"candidate_name": name, "reference_format": ref_rt.format, "candidate_format": cand_rt.format,
              "classification": evaluation["classification"], "gates": evaluation["gates"]},
        verdict=verdict,
    )


def log_report(ctx: StepContext, report: dict[str, Any], ref_out: list[np.ndarray], cand_out: list[np.ndarray],
               names: list[str]) -> dict[str, str]:
    folder = ctx.workdir / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(markdown_report(report))
    artifacts = {"report": ctx.artifact_uri(f"{REPORT_DIR}/report.json"),
                 "report_md": ctx.artifact_uri(f"{REPORT_DIR}/report.md")}
    try:
        error_plot(ref_out, cand_out, names, folder / "error_distribution.png", report["candidate_name"])
        artifacts["error_plot"] = ctx.artifact_uri(f"{REPORT_DIR}/error_distribution.png")
    except ImportError as exc:  # an image without matplotlib still validates; the plot is what is lost
        ctx.log.warning("No error-distribution plot: matplotlib is not installed (%s)", exc)
    ctx.log_artifact(folder, REPORT_DIR)
    return artifacts


__all__ = ["classification_metrics", "evaluate", "markdown_report", "output_metrics", "run"]
