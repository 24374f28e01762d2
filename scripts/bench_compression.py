#!/usr/bin/env python
"""Side-by-side compression benchmark (issue 3): every compressed variant of three CNNs, built by the
project's real steps and measured in this one process, on this CPU.

    .venv/bin/python scripts/bench_compression.py --json /tmp/bench_compression.json 2>/tmp/bench_compression.log
    .venv/bin/python scripts/bench_compression.py --quick --models digits residual

The full run takes about 15 minutes on 2 shared CPU cores (ResNet-18 about 10 of them); --quick on all
three models about 7 minutes (a smoke run: too few samples for figures to quote).

Models:

* ``digits``: the example digits CNN (1x8x8, 38 k parameters), trained by the ``train_example`` step.
* ``residual``: a small ResNet (``_bench_common.residual_cnn``: 3x3 stem, three BasicBlocks with skip
  connections, 0.3 M parameters) on 3x32x32 inputs, trained here for a few epochs (well under a minute)
  on scikit-learn's digits upscaled to 32x32 and tinted (random ink/paper colour per image, plus noise):
  data that ships with scikit-learn, no download. Same train / calibration / eval split as ``digits``.
* ``resnet18``: ResNet-18's shape at 3x224x224 with random weights (it measures speed); BatchNorm
  statistics re-estimated on the training images so activations have realistic ranges. Accuracy means
  nothing for it, so the table reports **top-1 agreement with the fp32 ONNX model** instead. Its pruned
  variant is fine-tuned by self-distillation: the prune step fine-tunes on the ``y`` of its train split,
  so its ``.npz`` files hold the fp32 model's own top-1 classes as ``y`` (the eval split's ``y`` only
  lets the prune step log agreement before and after its fine-tune; the table compares with fp32 ONNX).

Variants, each produced by a real step (``python -m airflow_modelopt run <step> --spec -``, local mode)
against a throw-away MLflow store (a local ``mlflow server`` on 127.0.0.1 with a SQLite file in the work
folder, because the litert venv's mlflow-skinny cannot open SQLite itself):

    fp32 ONNX                 torch_to_onnx on the .pt2
    ORT dynamic int8 x 2      onnx_quantize mode dynamic: dynamic_s8_per_channel (the step's default
                              weights) and dynamic_u8_per_tensor (the one its search tries)
    ORT static int8 x 3       onnx_quantize mode static: qdq_u8s8_per_channel, qoperator_u8s8_per_channel,
                              qdq_u8u8_per_tensor (the step's named configurations)
    ORT search                onnx_quantize mode search (its default configurations and accuracy gate; for
                              resnet18 a top-1 agreement gate, --resnet-min-agreement)
    TFLite fp16, full int8    tflite_quantize from the .pt2 with litert-torch (in .venv-litert), falling back
                              to the fp32 ONNX with onnx2tf when that fails (--tflite-path; the path is shown)
    pruned 50% structured     prune method structured, sparsity 0.5, fine-tune --fine-tune-epochs on the
                              train split, then torch_to_onnx

Measurement, identical for every variant of a model: loaded with ``airflow_modelopt.container.runtimes.load`` (ONNX
Runtime or the LiteRT interpreter) with --threads intra-op threads; latency at batch 1 on the same eval
sample with the benchmark step's ``time_batch``/``latency_stats``: --warmup-runs untimed runs, then
--timed-runs timed runs spread over --rounds interleaved rounds (every variant once per round, so a
burst of load from other jobs hits all variants alike). The figures that matter are ratios to fp32 ORT
measured side by side. Bytes are the model files on disk (ONNX graph + external data, or the .tflite).
Accuracy on the eval split (resnet18: agreement); drop = fp32 ONNX minus variant, in percentage points.

Output (stdout): the machine and command, a Markdown table per model, and an "against the guide"
summary per model (int8 ~4x smaller with 1-3% loss; pruning 2-5x smaller with 0.5-2% loss). Progress
goes to stderr. A variant that fails keeps its row with the reason; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import (
    LITERT_PYTHON,
    StepError,
    download,
    export_pt2,
    file_sizes,
    mlflow_server,
    onnx_weight_bytes,
    reestimate_batchnorm,
    residual_cnn,
    resnet18,
    run_step,
    save_npz,
    to_rgb,
)

from airflow_modelopt.specs.onnx_quantize import SEARCH_CONFIGS

MODELS = ("digits", "residual", "resnet18")
#: The static configurations the issue names, by the step's own names.
STATIC_CONFIGS = ("qdq_u8s8_per_channel", "qoperator_u8s8_per_channel", "qdq_u8u8_per_tensor")
#: Dynamic: the step's default (s8 per-channel weights) and the one its search tries (u8 per-tensor).
DYNAMIC_CONFIGS = ("dynamic_s8_per_channel", "dynamic_u8_per_tensor")
#: What the guide the operators come from expects.
GUIDE_INT8_SIZE_X = 4.0
GUIDE_INT8_DROP_PP = (1.0, 3.0)
GUIDE_PRUNED_SIZE_X = (2.0, 5.0)
GUIDE_PRUNED_DROP_PP = (0.5, 2.0)
EXPERIMENT = "bench-compression"
CONTEXT = {"experiment_name": EXPERIMENT, "force": True}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- what is compared -------------------------------------------------------------------------


@dataclass
class Source:
    """A trained (or random) model as a pipeline receives it: a .pt2 and the data artifacts."""

    key: str
    title: str
    pt2: str
    train: str
    calibration: str
    evaluation: str
    agreement: bool  # measure top-1 agreement with the fp32 ONNX model instead of accuracy on labels y
    search_gate: dict[str, float] = field(default_factory=dict)
    fp32_margins: np.ndarray | None = None  # per eval sample: top-1 minus top-2 logit of the fp32 ONNX model


@dataclass
class Variant:
    name: str
    kind: str  # fp32 | int8 | fp16 | pruned
    tool: str
    uri: str | None = None
    local: str | None = None  # where the measured copy was downloaded
    error: str | None = None
    note: str = ""
    build_s: float = 0.0
    bytes: int | None = None
    gzip_bytes: int | None = None
    weight_bytes: int | None = None  # ONNX initializers (weights, biases, scales, zero points)
    p50_ms: float | None = None
    latency: dict[str, float] | None = None
    accuracy: float | None = None  # or top-1 agreement with fp32 ONNX (Source.agreement)
    size_ratio: float | None = None
    latency_ratio: float | None = None
    drop_pp: float | None = None
    logit_error: float | None = None  # median over eval samples of the largest |logit - fp32 ONNX logit|
    step_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.uri is not None


# -- preparing the three models ---------------------------------------------------------------


def prepare_digits(args: argparse.Namespace, env: dict[str, str], work: Path) -> Source:
    trained = run_step("train_example", {"epochs": args.digits_epochs, "context": CONTEXT}, env,
                       log_file=work / "logs" / "digits-train_example.log")
    a = trained["artifacts"]
    progress(f"digits: trained, eval accuracy {trained['metrics']['eval_accuracy']:.4f}")
    return Source("digits", "Example digits CNN, 1x8x8 (trained by train_example)", a["model_pt2"], a["train_data"],
                  a["calibration_data"], a["eval_data"], agreement=False)


def digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits CNN's own train / calibration / eval split (train_example's defaults)."""
    from airflow_modelopt.container.examples.digits import load_splits

    return load_splits(0, 200, 400)


def prepare_residual(args: argparse.Namespace, work: Path) -> Source:
    import torch

    from airflow_modelopt.container.examples.digits import accuracy, train

    splits = digit_splits()
    data = {name: (to_rgb(x, 32, tint_seed=seed), y) for seed, (name, (x, y)) in enumerate(splits.items())}
    torch.manual_seed(0)
    model = residual_cnn()
    started = time.monotonic()
    train(model, *data["train"], epochs=args.residual_epochs, lr=3e-3, batch_size=64, seed=0)
    progress(f"residual: trained {args.residual_epochs} epochs in {time.monotonic() - started:.0f} s, "
             f"eval accuracy {accuracy(model, *data['eval']):.4f}")
    folder = work / "residual"
    paths = {name: str(save_npz(folder / f"{name}.npz", x, y)) for name, (x, y) in data.items()}
    pt2 = export_pt2(model, data["eval"][0], folder / "model.pt2")
    return Source("residual", "Residual CNN (3 BasicBlocks), 3x32x32 tinted digits (trained here)", str(pt2),
                  paths["train"], paths["calibration"], paths["eval"], agreement=False)


def prepare_resnet18(args: argparse.Namespace, work: Path) -> Source:
    import torch

    splits = digit_splits()
    x_train = to_rgb(splits["train"][0][: args.resnet_train], 224)
    x_cal = to_rgb(splits["calibration"][0][: args.resnet_calibration], 224)
    x_eval = to_rgb(splits["eval"][0][: args.resnet_eval], 224)
    torch.manual_seed(0)
    model = resnet18()
    reestimate_batchnorm(model, x_train)

    def fp32_top1(x: np.ndarray) -> np.ndarray:  # self-distillation labels
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(x[i : i + 16])).argmax(1).numpy() for i in range(0, len(x), 16)])

    folder = work / "resnet18"
    y_train = fp32_top1(x_train)
    train_npz = save_npz(folder / "train.npz", x_train, y_train)
    eval_npz = save_npz(folder / "eval.npz", x_eval, fp32_top1(x_eval))
    pt2 = export_pt2(model, x_cal, folder / "model.pt2")
    progress(f"resnet18: random weights, BatchNorm statistics from {len(x_train)} images; "
             f"{len(set(y_train.tolist()))} distinct fp32 classes among them")
    return Source("resnet18", "ResNet-18-shaped CNN (random weights), 3x224x224", str(pt2), str(train_npz),
                  str(save_npz(folder / "calibration.npz", x_cal)), str(eval_npz), agreement=True,
                  search_gate={"min_top1_agreement": args.resnet_min_agreement})


# -- building the variants --------------------------------------------------------------------


class Builder:
    """Runs the steps that make one model's variants; each failure is kept on its variant."""

    def __init__(self, source: Source, args: argparse.Namespace, env: dict[str, str], work: Path) -> None:
        self.source, self.args, self.env, self.logs = source, args, env, work / "logs"
        self.variants: list[Variant] = []

    def step(self, name: str, spec: dict[str, Any], label: str, python: Path | None = None) -> dict[str, Any]:
        log = self.logs / f"{self.source.key}-{label.replace(' ', '_').replace('/', '-')}.log"
        return run_step(name, {**spec, "context": CONTEXT}, self.env, python=python, log_file=log)

    def attempt(self, variant: Variant, build: Callable[[Variant], None]) -> Variant:
        progress(f"{self.source.key}: {variant.name}: building ({variant.tool})")
        started = time.monotonic()
        try:
            build(variant)
        except Exception as exc:  # noqa: BLE001 - a failed variant keeps its reason; the run goes on
            variant.error = first_line(exc, 400)
        variant.build_s = round(time.monotonic() - started, 1)
        state = f"FAILED: {variant.error}" if variant.error else "done"
        progress(f"{self.source.key}: {variant.name}: {state} ({variant.build_s:.0f} s)")
        self.variants.append(variant)
        return variant

    def build_all(self) -> list[Variant]:
        fp32 = self.attempt(Variant("fp32 ONNX", "fp32", "torch_to_onnx"), self.export_onnx(self.source.pt2))
        for config in (*DYNAMIC_CONFIGS, *STATIC_CONFIGS):
            method = SEARCH_CONFIGS[config]["method"]
            fields = {k: v for k, v in SEARCH_CONFIGS[config].items() if k != "method"}
            self.onnx_quantize(fp32, Variant(f"ORT {method} {config.removeprefix('dynamic_')}", "int8",
                                             f"onnx_quantize {method} {config}"), {"mode": method, **fields})
        gate = self.source.search_gate
        self.onnx_quantize(fp32, Variant("ORT search", "int8", "onnx_quantize search"),
                           {"mode": "search", "intra_op_threads": self.args.threads, **gate,
                            "warmup_runs": self.args.warmup_runs, "timed_runs": self.args.timed_runs})
        for mode in ("fp16", "int8"):
            name = "TFLite fp16" if mode == "fp16" else "TFLite full int8"
            self.attempt(Variant(name, mode, f"tflite_quantize {mode}"), self.tflite(mode, fp32))
        self.attempt(Variant("pruned 50% structured + fine-tune", "pruned",
                             f"prune structured 0.5 + {self.args.fine_tune_epochs} ep → torch_to_onnx"), self.prune)
        return self.variants

    def export_onnx(self, pt2: str) -> Callable[[Variant], None]:
        def build(v: Variant) -> None:
            result = self.step("torch_to_onnx", {"model_uri": pt2, "data_uri": self.source.calibration}, v.name)
            v.uri = result["artifacts"]["onnx_model"]
            if "max_abs_error" in result["metrics"]:  # ONNX Runtime vs torch on the same inputs
                v.step_metrics["onnx_max_abs_error"] = result["metrics"]["max_abs_error"]
        return build

    def onnx_quantize(self, fp32: Variant, variant: Variant, fields: dict[str, Any]) -> Variant:
        def build(v: Variant) -> None:
            if not fp32.ok:
                raise ValueError("no fp32 ONNX model to quantize")
            spec = {"model_uri": fp32.uri, "eval_data_uri": self.source.evaluation, **fields}
            if fields["mode"] != "dynamic":
                spec["calibration_data_uri"] = self.source.calibration
            if fields["mode"] != "search":  # the step's own latency figure is not used: keep it short
                spec.update({"warmup_runs": 0, "timed_runs": 3})
            result = self.step("onnx_quantize", spec, v.name)
            v.uri = result["artifacts"]["onnx_model"]
            chosen = result["info"]["chosen_config"]
            v.tool = f"onnx_quantize {fields['mode']} {chosen}"
            if fields["mode"] == "search":
                tried = [f"{t['config']}{'' if t.get('passed') else ' (failed gate)'}" for t in result["info"]["search"]]
                v.note = f"chose {chosen} of {', '.join(tried)}; gate {result['info']['gates']}"
        return self.attempt(variant, build)

    def tflite_attempts(self, mode: str, fp32: Variant) -> list[tuple[str, str | None, Path | None, dict[str, Any]]]:
        """(label, source model, interpreter, extra spec fields) to try in order for a TFLite mode.

        Full int8 keeps int8 inputs/outputs (the step's default io_type) where the converter manages it; the
        litert-torch path with float32 I/O (integer ops inside, a quantize/dequantize op at each edge) comes
        second, before switching converter, so the row stays on the same converter as TFLite fp16."""
        litert = ("litert-torch from .pt2", self.source.pt2, LITERT_PYTHON)
        onnx2tf = ("onnx2tf from fp32 ONNX", fp32.uri, None)
        converters = {"auto": [litert, onnx2tf] if LITERT_PYTHON.exists() else [onnx2tf], "pytorch": [litert],
                      "onnx": [onnx2tf]}[self.args.tflite_path]
        attempts = [(label, uri, python, {}) for label, uri, python in converters]
        if mode == "int8" and converters[0] is litert:
            attempts.insert(1, (f"{litert[0]}, float32 I/O", litert[1], litert[2], {"io_type": "float32"}))
        return attempts

    def tflite(self, mode: str, fp32: Variant) -> Callable[[Variant], None]:
        def build(v: Variant) -> None:
            failures = []
            for label, model_uri, python, extra in self.tflite_attempts(mode, fp32):
                if model_uri is None:
                    failures.append(f"{label}: no source model")
                    continue
                spec = {"model_uri": model_uri, "mode": mode, "calibration_data_uri": self.source.calibration, **extra}
                try:
                    result = self.step("tflite_quantize", spec, f"{v.name} {label}", python=python)
                except StepError as exc:
                    failures.append(f"{label}: {exc}")
                    progress(f"{self.source.key}: {v.name}: {label} failed: {exc}")
                    continue
                v.uri, v.tool = result["artifacts"]["tflite_model"], f"tflite_quantize {mode}, {label}"
                v.step_metrics = {k: result["metrics"][k] for k in ("top1_agreement", "float_op_count")
                                  if k in result["metrics"]}
                v.note = "; ".join(f"{f} (fell back)" for f in failures)
                return
            raise StepError(" / ".join(failures))
        return build

    def prune(self, v: Variant) -> None:
        src = self.source
        spec = {"model_uri": src.pt2, "method": "structured", "sparsity": 0.5,
                "fine_tune_epochs": self.args.fine_tune_epochs, "train_data_uri": src.train,
                "eval_data_uri": src.evaluation}
        result = self.step("prune", spec, v.name)
        m = result["metrics"]
        v.step_metrics = {k: m[k] for k in ("params_ratio", "flops_ratio", "channel_sparsity", "accuracy_before",
                                            "accuracy_pruned_before_fine_tune", "accuracy_after") if k in m}
        v.note = (f"params x{m['params_ratio']:.2f}, FLOPs x{m['flops_ratio']:.2f}"
                  + (f"; before fine-tune {m['accuracy_pruned_before_fine_tune']:.4f}"
                     if "accuracy_pruned_before_fine_tune" in m else ""))
        self.export_onnx(result["artifacts"]["model_pt2"])(v)


# -- measuring --------------------------------------------------------------------------------


def load_eval(path: str, work: Path) -> tuple[np.ndarray, np.ndarray | None]:
    local = Path(path) if Path(path).exists() else download(path, work / "eval-data")
    with np.load(local if local.is_file() else next(local.rglob("*.npz"))) as npz:
        return npz["x"].astype(np.float32), (npz["y"] if "y" in npz.files else None)


def measure(source: Source, variants: list[Variant], args: argparse.Namespace, work: Path) -> None:
    """Bytes, accuracy (or agreement with fp32) and batch-1 latency of every built variant, side by side."""
    from airflow_modelopt.container.measure import latency_stats, time_models
    from airflow_modelopt.container.runtimes import load

    x, y = load_eval(source.evaluation, work)
    loaded: dict[str, Path] = {}
    logits: dict[str, np.ndarray] = {}
    for v in (v for v in variants if v.ok):
        try:
            folder = download(v.uri, work / "models" / source.key / v.name.replace(" ", "_").replace("%", "pct"))
            v.local = str(folder)
            rt = load(folder, threads=args.threads)
            try:
                v.bytes, v.gzip_bytes = file_sizes(rt.model_files())
                if any(folder.rglob("*.onnx")):
                    v.weight_bytes = onnx_weight_bytes(folder)
                logits[v.name] = rt.run({"x": x}, batch_size=16)[0]
            finally:
                rt.close()
            loaded[v.name] = folder
        except Exception as exc:  # noqa: BLE001 - one unloadable variant must not end the run
            v.error = f"measuring: {type(exc).__name__}: {first_line(exc)}"
            progress(f"{source.key}: {v.name}: {v.error}")
    reference = logits.get("fp32 ONNX")
    truth = reference.argmax(axis=1) if source.agreement and reference is not None else y
    progress(f"{source.key}: timing {len(loaded)} variants at batch 1, {args.threads} thread(s), "
             f"{args.warmup_runs} warm-up + {args.timed_runs} timed runs in {args.rounds} rounds")
    times = time_models(lambda name: load(loaded[name], threads=args.threads), list(loaded), {"x": x[:1]},
                        args.warmup_runs, args.timed_runs, args.rounds)
    stats = {name: latency_stats(ns, 1) for name, ns in times.items()}
    for v in variants:
        if v.name in logits and truth is not None:
            v.accuracy = float((logits[v.name].argmax(axis=1) == truth).mean())
        if v.name in logits and reference is not None:
            v.logit_error = float(np.median(np.abs(logits[v.name] - reference).max(axis=1)))
        if v.name in stats:
            v.latency, v.p50_ms = stats[v.name], stats[v.name]["latency_ms_p50"]
    if reference is not None:
        top2 = np.sort(reference, axis=1)[:, -2:]
        source.fp32_margins = top2[:, 1] - top2[:, 0]
    fp32 = next((v for v in variants if v.name == "fp32 ONNX" and v.bytes), None)
    if fp32 is not None:
        for v in variants:
            v.size_ratio = v.bytes / fp32.bytes if v.bytes else None
            v.latency_ratio = v.p50_ms / fp32.p50_ms if v.p50_ms and fp32.p50_ms else None
            v.drop_pp = (fp32.accuracy - v.accuracy) * 100 if None not in (v.accuracy, fp32.accuracy) else None


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


# -- reporting --------------------------------------------------------------------------------


def table(source: Source, variants: list[Variant]) -> str:
    metric = "top-1 agreement with fp32" if source.agreement else "accuracy"
    lines = [f"| variant | path/tool | bytes | size ratio to fp32 | p50 ms | latency ratio to fp32 ORT | {metric} "
             "| drop (pp) | notes |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        size = "—" if v.size_ratio is None else f"{v.size_ratio:.3f} ({1 / v.size_ratio:.2f}x smaller)"
        note = f"**FAILED**: {v.error}" if v.error else v.note
        lines.append(f"| {v.name} | {v.tool} | {num(v.bytes, ',')} | {size} | {num(v.p50_ms, '.3f')} "
                     f"| {num(v.latency_ratio, '.2f')} | {num(v.accuracy, '.4f')} | {num(v.drop_pp, '+.2f')} "
                     f"| {note.replace('|', '/')} |")
    return "\n".join(lines)


def num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def verdict(value: float, low: float, high: float) -> str:
    return "within" if low <= value <= high else ("below" if value < low else "above")


def span(values: list[float], fmt: str) -> str:
    return format(values[0], fmt) if len(values) == 1 or min(values) == max(values) else \
        f"{format(min(values), fmt)}–{format(max(values), fmt)}"


def against_guide(source: Source, variants: list[Variant]) -> list[str]:
    """A few sentences computed from the numbers: where this model lands against the guide and why."""
    by = {v.name: v for v in variants}
    fp32 = by.get("fp32 ONNX")
    lines = []
    if fp32 is None or fp32.bytes is None:
        return ["fp32 ONNX model missing: nothing to compare against."]
    loss = "agreement loss (vs fp32, not accuracy)" if source.agreement else "accuracy loss"
    int8 = [v for v in variants if v.kind == "int8" and v.size_ratio is not None]
    if int8:
        factors = [1 / v.size_ratio for v in int8]
        drops = [v.drop_pp for v in int8 if v.drop_pp is not None]
        lines.append(f"- int8 (ORT x{len([v for v in int8 if v.name.startswith('ORT')])}, TFLite x"
                     f"{len([v for v in int8 if v.name.startswith('TFLite')])}): {span(factors, '.2f')}x smaller "
                     f"(guide ~{GUIDE_INT8_SIZE_X:.0f}x); {loss} {span(drops, '+.2f')} pp "
                     f"(guide {GUIDE_INT8_DROP_PP[0]:g}–{GUIDE_INT8_DROP_PP[1]:g} pp: "
                     f"{', '.join(sorted({verdict(d, *GUIDE_INT8_DROP_PP) for d in drops}))}).")
    onnx_int8 = [v for v in int8 if v.weight_bytes is not None]
    if fp32.weight_bytes is not None and onnx_int8:
        best = min(onnx_int8, key=lambda v: v.bytes or 0)
        rest, best_rest = fp32.bytes - fp32.weight_bytes, best.bytes - best.weight_bytes
        lines.append(f"- bytes as weights + the rest (graph, names, metadata): fp32 {fp32.weight_bytes:,} + {rest:,} "
                     f"(weights {fp32.weight_bytes / fp32.bytes:.1%}); smallest int8 ONNX ({best.name}) "
                     f"{best.weight_bytes:,} + {best_rest:,}: the weights shrink "
                     f"{fp32.weight_bytes / best.weight_bytes:.2f}x (int32 biases, scales and zero points stay), "
                     f"the rest {rest / best_rest:.2f}x.")
    margins = source.fp32_margins
    compressed = [v for v in variants if v.kind in ("int8", "fp16") and v.logit_error is not None]
    if margins is not None and compressed:
        at_risk = ", ".join(f"{v.name} {v.logit_error:.3g} ({(margins < v.logit_error).mean():.1%})" for v in compressed)
        lines.append(f"- why predictions flip: fp32 top-1 minus top-2 logit, median {np.median(margins):.3g}; quantized "
                     "models' median largest logit error per sample (share of eval samples whose margin is smaller, "
                     f"i.e. that can flip): {at_risk}.")
    pc, pt = by.get("ORT static qdq_u8s8_per_channel"), by.get("ORT static qdq_u8u8_per_tensor")
    if pc and pt and pc.drop_pp is not None and pt.drop_pp is not None:
        lines.append(f"- per-channel s8 weights vs per-tensor u8: {pc.drop_pp:+.2f} vs {pt.drop_pp:+.2f} pp; "
                     f"{pc.bytes:,} vs {pt.bytes:,} bytes.")
    qop, qdq = by.get("ORT static qoperator_u8s8_per_channel"), pc
    if qop and qdq and qop.latency_ratio and qdq.latency_ratio:
        lines.append(f"- latency vs fp32 ORT: QDQ {qdq.latency_ratio:.2f}, QOperator {qop.latency_ratio:.2f}, "
                     + ", ".join(f"{v.name} {v.latency_ratio:.2f}" for v in variants
                                 if v.latency_ratio and v.name.startswith(("TFLite", "ORT dynamic")))
                     + ".")
    pruned = by.get("pruned 50% structured + fine-tune")
    if pruned and pruned.size_ratio:
        drop = pruned.drop_pp
        lines.append(f"- pruned: {1 / pruned.size_ratio:.2f}x smaller (guide {GUIDE_PRUNED_SIZE_X[0]:g}–"
                     f"{GUIDE_PRUNED_SIZE_X[1]:g}x: {verdict(1 / pruned.size_ratio, *GUIDE_PRUNED_SIZE_X)}); "
                     + (f"{loss} {drop:+.2f} pp (guide {GUIDE_PRUNED_DROP_PP[0]:g}–{GUIDE_PRUNED_DROP_PP[1]:g} pp: "
                        f"{verdict(drop, *GUIDE_PRUNED_DROP_PP)}); " if drop is not None else "")
                     + f"latency ratio {pruned.latency_ratio:.2f}" + (f" ({pruned.note})" if pruned.note else "") + ".")
    failed = [v.name for v in variants if v.error]
    if failed:
        lines.append(f"- failed: {', '.join(failed)} (reasons in the table).")
    return lines


def machine_line(threads: int) -> str:
    from airflow_modelopt.container.runtimes.probe import hardware_fingerprint

    hw = hardware_fingerprint()
    return (f"Machine: {hw['cpu_model']}, {hw['physical_cores']} physical cores, {hw['usable_cpus']} usable CPUs, "
            f"{hw['memory_gib']} GiB; {threads} intra-op thread(s) for every runtime; batch 1.")


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--quick", action="store_true", help="small counts everywhere: a smoke run, not figures to quote")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every runtime (default 1: the machine is shared, one thread gives "
                        "the steadier ratios)")
    p.add_argument("--warmup-runs", type=int, help="untimed runs per variant (default 10; --quick 3)")
    p.add_argument("--timed-runs", type=int, help="timed runs per variant (default 100; --quick 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed runs are spread over")
    p.add_argument("--fine-tune-epochs", type=int, help="fine-tune epochs after pruning (default 10; --quick 1)")
    p.add_argument("--digits-epochs", type=int, default=15, help="train_example epochs (default 15)")
    p.add_argument("--residual-epochs", type=int, help="training epochs of the residual CNN (default 8; --quick 3)")
    p.add_argument("--resnet-train", type=int, help="ResNet-18 train images (BatchNorm statistics, self-distillation "
                                                    "fine-tune; default 256; --quick 32)")
    p.add_argument("--resnet-calibration", type=int, help="ResNet-18 calibration images (default 64; --quick 16)")
    p.add_argument("--resnet-eval", type=int, help="ResNet-18 eval images (default 128; --quick 16)")
    p.add_argument("--resnet-min-agreement", type=float, default=0.8,
                   help="search's top-1 agreement gate for ResNet-18: its random 1000-class head has near-tied "
                        "logits, so int8 rounding flips more argmaxes than on a trained model (default 0.8)")
    p.add_argument("--tflite-path", choices=["auto", "pytorch", "onnx"], default="auto",
                   help="TFLite source: litert-torch from the .pt2, onnx2tf from the fp32 ONNX, or auto "
                        "(litert-torch, then onnx2tf if it fails)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--workdir", type=Path, help="keep the MLflow store, models and step logs here (default: temp)")
    args = p.parse_args(argv)
    defaults = {"warmup_runs": (10, 3), "timed_runs": (100, 20), "fine_tune_epochs": (10, 1), "residual_epochs": (8, 3),
                "resnet_train": (256, 32), "resnet_calibration": (64, 16), "resnet_eval": (128, 16)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    print(f"# Compression benchmark\n\nCommand: `{command}`\n\n{machine_line(args.threads)}\n"
          f"Latency: {args.warmup_runs} warm-up + {args.timed_runs} timed runs per variant in {args.rounds} "
          "interleaved rounds, p50; every ratio is measured side by side in this run.", flush=True)
    report: dict[str, Any] = {"command": command, "machine": machine_line(args.threads), "settings": vars(args) | {
        "json": str(args.json) if args.json else None, "workdir": str(args.workdir) if args.workdir else None},
        "models": {}}

    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        progress(f"starting a local MLflow server (SQLite) under {work}")
        with mlflow_server(work / "mlflow") as server_env:
            env = {**server_env, "MODELOPT_LOG_LEVEL": "INFO"}  # the steps' logs go to files under work/logs
            import mlflow

            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            for key in args.models:
                model_started = time.monotonic()
                progress(f"{key}: preparing")
                if key == "digits":
                    source = prepare_digits(args, env, work)
                elif key == "residual":
                    source = prepare_residual(args, work)
                else:
                    source = prepare_resnet18(args, work)
                variants = Builder(source, args, env, work).build_all()
                measure(source, variants, args, work)
                guide = against_guide(source, variants)
                seconds = time.monotonic() - model_started
                print(f"\n## {source.title}\n\n{table(source, variants)}\n\nAgainst the guide:\n" + "\n".join(guide)
                      + f"\n\n({seconds:.0f} s for this model)", flush=True)
                report["models"][key] = {"title": source.title, "metric": "top1_agreement_with_fp32" if
                                         source.agreement else "accuracy", "seconds": seconds,
                                         "fp32_margin_median": None if source.fp32_margins is None else
                                         float(np.median(source.fp32_margins)),
                                         "variants": [asdict(v) for v in variants], "against_guide": guide}
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nWall time: {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
