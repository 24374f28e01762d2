"""Step onnx_quantize: ONNX model -> int8 ONNX model with ONNX Runtime's quantization tools.

1. Load the source model (a .onnx file, a folder with model.onnx and its external data, or an
   MLflow onnx-flavor folder) and check the data artifacts against its inputs by name, rank,
   fixed dimensions and dtype, before any work: a mismatch names the input and expected shape.
2. ORT's quantization pre-processing (symbolic shape inference + basic graph optimization).
   Transformers (``optimize_transformer``; auto: a Softmax between activation MatMuls): a second
   working graph with attention fused into ORT's Attention op and LayerNorm/GELU fusions
   (``fusion``), checked against fp32's outputs, pre-processed the same way; dynamic quantization
   (and in search, the ``fused_`` configurations) quantizes it.
3. Quantize: dynamic (weights only, activations at run time) or static (QDQ or QOperator;
   ranges calibrated with MinMax, Entropy or Percentile on the calibration data). In search mode
   several configurations are built; calibration runs once and is shared through ORT's cache.
4. Measure each int8 model against fp32: top-1 agreement (and accuracy with labels), max abs
   error, and latency (median, or min, of timed runs after warm-up until stable, at the
   calibration data's shapes, batch size and thread count). Latency is timed as the benchmark
   step times a model (``measure.time_models``): one model loaded at a time, models taking turns
   in rounds so drift hits all alike.
5. Gates; search keeps the fastest configuration that passes. Every configuration tried is
   logged (JSON + Markdown table, ``search.<config>.*`` metrics), even when none passes.
6. Log the chosen model with MLflow's onnx flavor, plus size, ratio and quantized-node counts.

Modules: ``model`` (the ONNX graph and its files), ``calibration`` (data, batches, the calibration
reader), ``fusion`` (transformer fusions), ``quantize`` (configurations, pre-processing, exclusions, ORT's quantizers, node counts),
``search`` (measuring, gates, choosing, the search record); this one runs them in order.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_modelopt.container.artifacts import locate_onnx
from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.measure import agreement
from airflow_modelopt.container.steps.onnx_quantize import space_to_depth
from airflow_modelopt.container.steps.onnx_quantize.calibration import Dataset, fixed_batch, latency_feed, load_dataset
from airflow_modelopt.container.steps.onnx_quantize.fusion import has_attention_pattern, optimize_transformer
from airflow_modelopt.container.steps.onnx_quantize.layerwise import compose
from airflow_modelopt.container.steps.onnx_quantize.model import OnnxModel, first_line, inspect_model, is_quant_op
from airflow_modelopt.container.steps.onnx_quantize.quantize import (
    QuantConfig,
    configs_for,
    layerwise_parts,
    name_nodes,
    node_stats,
    preprocess,
    quantize,
    resolve_exclusions,
    settings_key,
)
from airflow_modelopt.container.steps.onnx_quantize.search import (
    Gates,
    Trial,
    choose,
    evaluate,
    latency_settings,
    log_search,
    outputs_of,
    resolve_gates,
    search_metrics,
    search_rounds,
    time_trials,
)
from airflow_modelopt.exceptions import ConversionFailed, GateFailed, InputError
from airflow_modelopt.specs.onnx_quantize import OnnxQuantizeSpec

TAG_CONFIG = "modelopt.onnx_quantize.config"
TAG_MODE = "modelopt.onnx_quantize.mode"
TAG_FUSION = "modelopt.onnx_quantize.transformer_fusion"
#: Batch size agreement with fp32 is measured in (unless the graph fixes one).
EVAL_BATCH = 32


@dataclass
class Inputs:
    """The checked source model and data, the fp32 reference and the gates, before any work."""

    source: OnnxModel
    calibration: Dataset | None
    eval_data: Dataset | None
    fixed_batch: int | None
    latency_batch: int
    reference: list[np.ndarray] | None = None
    gates: Gates = field(default_factory=Gates)

    @property
    def eval_batch(self) -> int:
        return self.fixed_batch or EVAL_BATCH


def check_inputs(spec: OnnxQuantizeSpec, ctx: StepContext) -> Inputs:
    """Everything that can be wrong with the inputs fails here, before pre-processing starts."""
    model_dir = ctx.input("model_uri")
    assert model_dir is not None
    source = inspect_model(locate_onnx(model_dir, spec.model_uri), "model_uri", spec.model_uri)
    already = sorted(op for op in source.op_histogram if is_quant_op(op))
    if already:
        raise InputError(f"model_uri: {spec.model_uri} is already quantized (it has {already} nodes); give the fp32 model")
    ctx.log.info("Source model %s: inputs %s, %d nodes, %d bytes", source.path.name,
                 [f"{i.name}{i.shape_text()}" for i in source.inputs], len(source.node_names), source.bytes)
    cal_path, eval_path = ctx.input("calibration_data_uri"), ctx.input("eval_data_uri")
    calibration = (load_dataset(cal_path, "calibration_data_uri", source.inputs, spec.calibration_samples)
                   if cal_path is not None else None)
    eval_data = load_dataset(eval_path, "eval_data_uri", source.inputs) if eval_path is not None else calibration
    fixed = fixed_batch(source.inputs)
    if fixed is not None and spec.latency_batch_size not in (1, fixed):
        raise InputError(f"latency_batch_size: the model fixes the batch dimension to {fixed}; "
                         f"got {spec.latency_batch_size}")
    inputs = Inputs(source, calibration, eval_data, fixed, fixed or spec.latency_batch_size)
    inputs.gates = Gates(spec.min_top1_agreement, spec.max_accuracy_drop, spec.max_abs_error)
    if eval_data is not None:
        if eval_path is None:
            ctx.log.warning("No eval_data_uri: agreement with fp32 is measured on the calibration data (optimistic)")
        try:
            inputs.reference = outputs_of(source.path, spec.intra_op_threads, spec.model_uri, eval_data,
                                          inputs.eval_batch, pad=fixed is not None)
        except Exception as exc:  # noqa: BLE001 - the fp32 model itself does not take this data
            raise InputError(f"{eval_data.field}: the fp32 model does not run on this data: {first_line(exc)}") from None
        inputs.gates = resolve_gates(spec, eval_data, inputs.reference)
    return inputs


def prepare_model(spec: OnnxQuantizeSpec, ctx: StepContext, source: OnnxModel) -> tuple[OnnxModel, dict[str, Any],
                                                                                         dict[str, str]]:
    """(model to quantize, pre-processing record, {node kept fp32: why})."""
    working, record = source, {"applied": False}
    if spec.preprocess:
        ctx.log.info("ORT quantization pre-processing (symbolic shape inference; optimization %s)",
                     spec.preprocess_optimize)
        path, record = preprocess(source.path, ctx.workdir / "preprocessed", spec.preprocess_optimize, ctx.log)
        working = inspect_model(path, "model_uri", spec.model_uri)
    if working.unnamed_nodes:
        ctx.log.info("Naming %d unnamed nodes (ORT excludes nodes by name)", working.unnamed_nodes)
        working = inspect_model(name_nodes(working, ctx.workdir / "named"), "model_uri", spec.model_uri)
    excluded = resolve_exclusions(spec, source, working)
    if excluded:
        ctx.log.info("Keeping %d node(s) in fp32: %s", len(excluded), sorted(excluded))
    return working, record, excluded


#: The fused graph's outputs may differ from the source's by float rounding only: at most this
#: much relative to the largest |output| (and every top-1 class the same).
FUSION_TOLERANCE = 1e-3


@dataclass
class Fused:
    """The transformer-fused working graph and what it applies to ("dynamic" or "all")."""

    model: OnnxModel
    applies_to: str
    excluded: dict[str, str]


def prepare_fused(spec: OnnxQuantizeSpec, ctx: StepContext, inputs: Inputs, excluded: dict[str, str]
                  ) -> tuple[Fused | None, dict[str, Any]]:
    """The transformer-fused working graph, or None and why not (the record goes on the run)."""
    import onnx

    if spec.optimize_transformer == "off":
        return None, {"applied": False, "reason": "optimize_transformer is 'off'"}
    source = inputs.source
    attention = has_attention_pattern(onnx.load(str(source.path), load_external_data=False))
    if spec.optimize_transformer == "auto":
        if not attention:
            return None, {"applied": False, "reason": "no attention in the graph (auto)"}
        if spec.mode == "static":
            return None, {"applied": False, "reason": "static quantization does not quantize the fused Attention op "
                          "(auto fuses for dynamic quantization; 'on' fuses anyway)"}
    applies_to = "all" if spec.optimize_transformer == "on" else "dynamic"
    data = inputs.calibration or inputs.eval_data
    # without data (dynamic mode needs none): one all-zero sample, free dimensions 1, to read the
    # head count off and to compare the fused graph with the source on
    probe = data or Dataset("a zero sample", {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1
                                                                 for d in i.shape], dtype=np.dtype(i.dtype))
                                               for i in source.inputs}, None)
    started = time.monotonic()
    try:
        path, record = optimize_transformer(source.path, ctx.workdir / "fused", probe.features, spec.num_heads,
                                            ctx.log)
        check_data, reference = inputs.eval_data, inputs.reference
        if check_data is None or reference is None:
            check_data = probe
            reference = outputs_of(source.path, spec.intra_op_threads, spec.model_uri, probe, 1, pad=False)
        got = outputs_of(path, spec.intra_op_threads, spec.model_uri, check_data, inputs.eval_batch,
                         pad=inputs.fixed_batch is not None)
        check = agreement(reference, got)
        scale = max([float(np.max(np.abs(r))) for r in reference if r.dtype.kind == "f" and r.size] + [1.0])
        record["check"] = {"on": check_data.field, "max_abs_error": check["max_abs_error"],
                           "tolerance": FUSION_TOLERANCE * scale,
                           **({"top1_agreement": check["top1_agreement"]} if "top1_agreement" in check else {})}
        if check["max_abs_error"] > FUSION_TOLERANCE * scale or check.get("top1_agreement", 1.0) < 1.0:
            raise ValueError(f"the fused graph's outputs differ from the source's: {record['check']}")
        working = inspect_model(path, "model_uri", spec.model_uri)
        if spec.preprocess:
            try:
                pre, info = preprocess(path, ctx.workdir / "fused_preprocessed", spec.preprocess_optimize, ctx.log)
                working = inspect_model(pre, "model_uri", spec.model_uri)
                record["preprocess"] = info
            except ConversionFailed as exc:
                record["preprocess"] = {"applied": False, "error": str(exc)}
        if working.unnamed_nodes:
            working = inspect_model(name_nodes(working, ctx.workdir / "fused_named"), "model_uri", spec.model_uri)
    except Exception as exc:  # noqa: BLE001 - auto falls back to the unfused graph; on fails the step
        if spec.optimize_transformer == "on":
            raise ConversionFailed(f"optimize_transformer: the transformer fusions failed: {first_line(exc)}") from None
        ctx.log.warning("Transformer fusions not used: %s", first_line(exc))
        return None, {"applied": False, "reason": f"failed: {first_line(exc)}"}
    record["seconds"] = round(time.monotonic() - started, 3)
    record["applies_to"] = applies_to
    present = set(working.node_names)
    kept = {n: why for n, why in excluded.items() if n in present}
    if spec.op_types_to_exclude:
        graph = onnx.load(str(working.path), load_external_data=False).graph
        kept.update({n.name: f"op_types_to_exclude ({n.op_type})" for n in graph.node
                     if n.op_type in spec.op_types_to_exclude})
    return Fused(working, applies_to, kept), record


def build_all(spec: OnnxQuantizeSpec, ctx: StepContext, working: OnnxModel, inputs: Inputs,
              excluded: dict[str, str], fused: Fused | None = None) -> list[Trial]:
    """Quantize every configuration; in search mode a failed one is recorded, not fatal."""
    trials = []
    cache_dir = ctx.workdir / "calibration"  # ORT's calibration cache: one calibration per method
    cache_dir.mkdir(exist_ok=True)
    built: dict[tuple[tuple[str, Any], ...], Path] = {}  # a layerwise configuration reuses what was built

    def build(config: QuantConfig) -> Path:
        key = settings_key(config)
        if key not in built:
            model, exclude = (fused.model, fused.excluded) if config.transformer_fusion and fused else (working,
                                                                                                       excluded)
            built[key] = quantize(config, model.path, ctx.workdir / "quantized" / config.name, inputs.calibration,
                                  inputs.fixed_batch or 1, sorted(exclude),
                                  cache_dir / ("fused" if config.transformer_fusion else "source"))
        return built[key]

    for config in configs_for(spec, fused.applies_to if fused else None):
        trial = Trial(config)
        started = time.monotonic()
        ctx.log.info("Quantizing: %s", config.as_dict())
        try:
            if config.layerwise:
                data = inputs.calibration or inputs.eval_data
                assert data is not None  # search mode requires calibration data
                parts = {variant: build(part) for variant, part in layerwise_parts(config).items()}
                feed = latency_feed(data, inputs.latency_batch)
                folder = ctx.workdir / "quantized" / config.name
                trial.path, record = compose(parts["symmetric"], parts["asymmetric"], folder / "composed", feed,
                                             spec.intra_op_threads, ctx.log)
                trial.path, stem = space_to_depth.rewrite(trial.path, folder / "space_to_depth", feed,
                                                          spec.intra_op_threads, ctx.log)
                trial.detail = {"layerwise": record, "space_to_depth": stem}
            else:
                trial.path = build(config)
            trial.bytes = inspect_model(trial.path, "model_uri", spec.model_uri).bytes
        except ConversionFailed as exc:
            if spec.mode != "search":
                raise
            trial.error = str(exc)
            ctx.log.warning("%s", exc)
        trial.quantize_s = time.monotonic() - started
        trials.append(trial)
    if not any(t.path is not None for t in trials):
        raise ConversionFailed("no search configuration could be quantized: " + "; ".join(t.error or "" for t in trials))
    return trials


def measure_all(spec: OnnxQuantizeSpec, ctx: StepContext, inputs: Inputs, trials: list[Trial]) -> dict[str, float] | None:
    """Agreement and gates per trial, then latency of fp32 and every trial; returns fp32's latency."""
    if inputs.eval_data is None or inputs.reference is None:
        ctx.log.warning("No calibration_data_uri or eval_data_uri: latency and agreement with fp32 are not measured")
        return None
    evaluate(spec, trials, inputs.eval_data, inputs.reference, inputs.gates, inputs.eval_batch,
             pad=inputs.fixed_batch is not None)
    feed = latency_feed(inputs.calibration or inputs.eval_data, inputs.latency_batch)
    ctx.log.info("Measuring latency of %d model(s), one loaded at a time: batch %d, %d thread(s), %d timed runs each "
                 "in %d round(s), each after at least %d warm-up runs", 1 + sum(t.runnable for t in trials),
                 inputs.latency_batch, spec.intra_op_threads, spec.timed_runs, search_rounds(spec.timed_runs),
                 spec.warmup_runs)
    fp32_latency = time_trials(spec, inputs.source.path, trials, feed, inputs.latency_batch)
    for t in trials:
        ctx.log.info("%-32s %s", t.config.name, t.error or (
            f"latency {t.latency.get('ms', float('nan')):.4g} ms, "
            + ", ".join(f"{k} {v:.4g}" for k, v in t.measured.items())
            + (f"; FAILS: {'; '.join(t.reasons)}" if t.reasons else "")))
    return fp32_latency


def result_metrics(inputs: Inputs, chosen: Trial, stats: dict[str, Any], fp32_latency: dict[str, float] | None,
                   preprocess_info: dict[str, Any]) -> dict[str, float]:
    source = inputs.source
    metrics: dict[str, float] = {
        "source_bytes": float(source.bytes),
        "quantized_bytes": float(chosen.bytes),
        "size_ratio": chosen.bytes / source.bytes,
        "quantized_compute_nodes": float(stats["quantized_compute_nodes"]),
        "fp32_compute_nodes": float(len(stats["fp32_nodes"])),
        "quantize_time_s": chosen.quantize_s,
    }
    metrics.update({f"quantized_nodes.{op}": float(n) for op, n in stats["quantized_nodes"].items()})
    metrics.update({f"quantized_nodes.qdq.{op}": float(n) for op, n in stats["qdq_nodes"].items()})
    if fp32_latency and chosen.latency:
        metrics["fp32_latency_ms"] = fp32_latency["ms"]
        metrics["int8_latency_ms"] = chosen.latency["ms"]
        metrics["latency_ratio"] = chosen.latency["ms"] / fp32_latency["ms"]
        metrics["speedup"] = fp32_latency["ms"] / chosen.latency["ms"]
    for key in ("top1_agreement", "max_abs_error", "accuracy", "accuracy_drop", "fp32_accuracy"):
        if key in chosen.measured:
            metrics["int8_accuracy" if key == "accuracy" else key] = chosen.measured[key]
    if inputs.eval_data is not None:
        metrics["eval_samples"] = float(inputs.eval_data.samples)
    if preprocess_info.get("seconds") is not None:
        metrics["preprocess_time_s"] = preprocess_info["seconds"]
    return metrics


def check_speed(spec: OnnxQuantizeSpec, ctx: StepContext, inputs: Inputs, chosen: Trial,
                fp32_latency: dict[str, float] | None) -> None:
    """Warn when the chosen int8 model is not faster than fp32; fail with require_speedup."""
    if not (fp32_latency and chosen.latency) or chosen.latency["ms"] < fp32_latency["ms"]:
        return
    ctx.log.warning("The int8 model (%s) is not faster than fp32 on this CPU: %.4g ms vs %.4g ms%s",
                    chosen.config.name, chosen.latency["ms"], fp32_latency["ms"],
                    "" if spec.mode == "search" else "; mode 'search' tries other configurations")
    if spec.require_speedup:
        raise GateFailed(
            f"require_speedup: the chosen int8 model {chosen.config.name!r} takes {chosen.latency['ms']:.4g} ms, "
            f"fp32 {fp32_latency['ms']:.4g} ms ({spec.intra_op_threads} thread(s), batch {inputs.latency_batch})"
        )


def fusion_tag(record: dict[str, Any]) -> str:
    """The run tag: what fused and whether the chosen model uses it, or why nothing was fused."""
    if not record.get("applied"):
        return f"not applied: {record.get('reason', '')}"[:500]
    fused = ", ".join(f"{op} {n}" for op, n in record["new_fused_nodes"].items()) or "nothing fused"
    return f"{fused}; chosen model {'uses' if record.get('chosen_config_fused') else 'does not use'} it"[:500]


def run(spec: OnnxQuantizeSpec, ctx: StepContext) -> StepOutput:
    import mlflow
    import onnx

    inputs = check_inputs(spec, ctx)
    working, preprocess_info, excluded = prepare_model(spec, ctx, inputs.source)
    fused, fusion_info = prepare_fused(spec, ctx, inputs, excluded)
    trials = build_all(spec, ctx, working, inputs, excluded, fused)
    fp32_latency = measure_all(spec, ctx, inputs, trials)
    chosen = choose(spec, trials)

    search_artifacts = {}
    if spec.mode == "search":
        search_artifacts = log_search(spec, ctx, trials, fp32_latency, chosen, source_bytes=inputs.source.bytes,
                                      gates=inputs.gates, batch=inputs.latency_batch,
                                      evaluated_on=inputs.eval_data.field if inputs.eval_data else None)
    if chosen is None:
        if spec.mode == "search":  # the record of every configuration stays on the failed run
            ctx.log_metrics(search_metrics(trials))
            failures = "; ".join(f"{t.config.name}: {t.error or '; '.join(t.reasons)}" for t in trials)
            raise GateFailed(f"no search configuration passed the accuracy gate {inputs.gates.active()}: {failures} "
                             f"(table: {search_artifacts['search_table']})")
        raise GateFailed(f"configuration {trials[0].config.name!r} failed its gate: {'; '.join(trials[0].reasons)}")
    assert chosen.path is not None
    check_speed(spec, ctx, inputs, chosen, fp32_latency)

    stats = node_stats(chosen.path)
    metrics = result_metrics(inputs, chosen, stats, fp32_latency, preprocess_info)
    fusion_info["chosen_config_fused"] = bool(chosen.config.transformer_fusion)
    metrics["transformer_fusion"] = 1.0 if chosen.config.transformer_fusion else 0.0
    if fusion_info.get("applied"):
        metrics.update({f"fused_nodes.{op}": float(n) for op, n in fusion_info["fused_nodes"].items()})
    if spec.mode == "search":
        metrics.update(search_metrics(trials))
    quantized = inspect_model(chosen.path, "model_uri", spec.model_uri)
    signature = {"inputs": [asdict(i) for i in quantized.inputs], "outputs": [asdict(o) for o in quantized.outputs]}
    calibration = None
    if inputs.calibration is not None and chosen.config.method == "static":
        calibration = {"method": spec.calibration_method, "samples": inputs.calibration.samples,
                       "batch_size": inputs.fixed_batch or 1}
    info: dict[str, Any] = {
        "mode": spec.mode, "chosen_config": chosen.config.name, "config": chosen.config.as_dict(),
        "quantized_nodes": stats["quantized_nodes"], "qdq_nodes": stats["qdq_nodes"],
        "fp32_nodes": stats["fp32_nodes"], "excluded_nodes": excluded, "preprocess": preprocess_info,
        "gates": inputs.gates.active(), "signature": signature, "source_model_uri": spec.model_uri,
        "calibration": calibration,
        "evaluated_on": inputs.eval_data.field if inputs.eval_data is not None else None,
        "latency_settings": latency_settings(spec, inputs.latency_batch),
        "transformer_fusion": fusion_info,
    }
    if spec.mode == "search":
        info["search"] = [{"config": t.config.name, "passed": t.passed, "latency_ms": t.latency.get("ms"),
                           **{k: t.measured[k] for k in ("top1_agreement", "accuracy_drop") if k in t.measured},
                           **({"error": t.error} if t.error else {})} for t in trials]
    report = {**info, "source": {"bytes": inputs.source.bytes, "files": inputs.source.files,
                                 "op_histogram": inputs.source.op_histogram},
              "quantized": {"bytes": chosen.bytes, "files": quantized.files, "op_histogram": quantized.op_histogram,
                            "node_count": stats["node_count"]},
              "metrics": metrics}
    report_uri = ctx.log_dict(report, "onnx_quantize_report.json")
    ctx.client.set_tag(ctx.run_id, TAG_CONFIG, chosen.config.name)
    ctx.client.set_tag(ctx.run_id, TAG_MODE, spec.mode)
    ctx.client.set_tag(ctx.run_id, TAG_FUSION, fusion_tag(fusion_info))
    proto = onnx.load(str(chosen.path))  # with its external data, for the flavor to save as a folder
    from airflow_modelopt.container.pyfunc import onnx_signature_and_example

    examples = inputs.eval_data or inputs.calibration
    signature, input_example = onnx_signature_and_example(proto, examples.features if examples is not None else None)
    model_info = mlflow.onnx.log_model(
        proto, name="onnx_model", save_as_external_data=True, onnx_execution_providers=["CPUExecutionProvider"],
        signature=signature, input_example=input_example,
        metadata={"modelopt_quantization": {"mode": spec.mode, **chosen.config.as_dict()},
                  "modelopt_source_model_uri": spec.model_uri},
    )
    ctx.log.info("Logged %s (%d bytes, %.2fx the source) as %s", chosen.config.name, chosen.bytes,
                 chosen.bytes / inputs.source.bytes, model_info.model_uri)
    return StepOutput(
        artifacts={"onnx_model": model_info.model_uri, "report": report_uri, **search_artifacts},
        metrics=metrics, info=info,
    )


__all__ = ["TAG_CONFIG", "TAG_FUSION", "TAG_MODE", "check_inputs", "run"]
