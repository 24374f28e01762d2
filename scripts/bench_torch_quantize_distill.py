#!/usr/bin/env python
"""PyTorch-native int8 (torch_quantize) and knowledge distillation (distill), side by side (issue 14).

    .venv/bin/python scripts/bench_torch_quantize_distill.py 2>/tmp/bench_tqd.log
    .venv/bin/python scripts/bench_torch_quantize_distill.py --models digits --compile --json /tmp/tqd.json

Models: the example digits CNN (``train_example`` step) and the residual CNN of bench_compression.py
(3 BasicBlocks, 3x32x32 tinted digits, trained here). Every model is built by the real steps, in this
process, against a throw-away SQLite MLflow store:

    torch fp32          the source .pt2
    torch int8 (PT2E)   torch_quantize mode static (X86InductorQuantizer, per-channel weights)
    ORT fp32            torch_to_onnx of the source
    ORT int8 (ORT)      onnx_quantize mode static on that ONNX model (ONNX Runtime's own quantizer)
    ORT int8 (PT2E)     torch_quantize's ONNX QDQ export of the same int8 program

Measured here, identically for every variant: accuracy on the eval split through
``container.runtimes.load``; latency at --batch on one eval batch with ``measure.time_models``
(--threads intra-op threads, interleaved rounds, one live model at a time). "torch" rows run eager
PyTorch (what validate/benchmark run); with --compile the two .pt2 are also timed after
``torch.compile`` (inductor, needs a C++ compiler; minutes of compile time on a small machine).

Distillation (per model): the teacher, the teacher narrowed to --width of its channels and distilled
(alpha 0.9, T 4), and the same narrowed student trained on the hard labels only (alpha 0) for the same
--distill-epochs: parameters and eval accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import download


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Compiled:
    """A torch.compile'd ExportedProgram (inductor, ``freezing`` on: weights folded as constants, as
    PyTorch's PT2E x86 recipe compiles int8 programs) behind what ``measure.time_models`` calls. The
    runtimes layer has no compile option (validate and benchmark run eager PyTorch), so the bench
    compiles here. Compiled once and kept across timing rounds (``close`` keeps it): recompiling per
    round would cost minutes, and an idle compiled module runs no threads."""

    def __init__(self, pt2: Path, threads: int) -> None:
        import torch
        import torch._inductor.config

        from airflow_modelopt.container.runtimes import detect
        from airflow_modelopt.container.runtimes.torch_backend import load_exported_program

        torch.set_num_threads(threads)
        torch._inductor.config.freezing = True
        _, pt2_file, _ = detect(pt2)  # a downloaded artifact is a folder holding the .pt2
        self.fn = torch.compile(load_exported_program(pt2_file).module(), backend="inductor")
        self.no_grad = torch.no_grad

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v) for k, v in feeds.items()}

    def run_native(self, feeds: dict[str, np.ndarray]) -> Any:
        import torch

        with self.no_grad():
            return self.fn(torch.from_numpy(feeds["x"]))

    def close(self) -> None:
        pass


def sources(models: list[str], work: Path, residual_epochs: int, args: argparse.Namespace) -> dict[str, dict[str, str]]:
    from airflow_modelopt.container.runner import run_step

    out: dict[str, dict[str, str]] = {}
    if "digits" in models:
        art = run_step("train_example", {"context": {"experiment_name": "bench-tqd"}}).artifacts
        out["digits"] = {k: str(download(art[a], work / "digits")) for k, a in
                         (("pt2", "model_pt2"), ("train", "train_data"), ("calibration", "calibration_data"),
                          ("eval", "eval_data"))}
    if "residual" in models and args.source_dir is not None:  # a residual folder an earlier run prepared
        folder = args.source_dir
        out["residual"] = {"pt2": str(folder / "model.pt2"), "train": str(folder / "train.npz"),
                           "calibration": str(folder / "calibration.npz"), "eval": str(folder / "eval.npz")}
    elif "residual" in models:
        from bench_compression import prepare_residual

        src = prepare_residual(argparse.Namespace(residual_epochs=residual_epochs), work)
        out["residual"] = {"pt2": src.pt2, "train": src.train, "calibration": src.calibration, "eval": src.evaluation}
    return out


def quantization_rows(name: str, src: dict[str, str], work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from airflow_modelopt.container import measure
    from airflow_modelopt.container.runner import run_step
    from airflow_modelopt.container.runtimes import load

    ctx = {"experiment_name": "bench-tqd"}
    t0 = time.monotonic()
    tq = run_step("torch_quantize", {"model_uri": src["pt2"], "calibration_data_uri": src["calibration"],
                                     "eval_data_uri": src["eval"], "context": ctx})
    progress(f"{name}: torch_quantize in {time.monotonic() - t0:.0f} s: {tq.metrics}")
    fp32_onnx = run_step("torch_to_onnx", {"model_uri": src["pt2"], "data_uri": src["eval"], "context": ctx})
    ort_int8 = run_step("onnx_quantize", {"model_uri": fp32_onnx.artifacts["onnx_model"], "mode": "static",
                                          "calibration_data_uri": src["calibration"], "context": ctx})
    paths = {
        "torch fp32 (eager)": Path(src["pt2"]),
        "torch int8 PT2E (eager)": download(tq.artifacts["model_pt2"], work / name / "int8"),
        "ORT fp32": download(fp32_onnx.artifacts["onnx_model"], work / name / "onnx_fp32"),
        "ORT int8 (onnx_quantize static)": download(ort_int8.artifacts["onnx_model"], work / name / "onnx_int8"),
    }
    if "onnx_model" in tq.artifacts:
        paths["ORT int8 (PT2E QDQ export)"] = download(tq.artifacts["onnx_model"], work / name / "pt2e_qdq")
    data = np.load(src["eval"])
    x, y = data["x"], data["y"]
    batch = {"x": np.ascontiguousarray(x[: args.batch])}
    rows = []
    eager_top1: dict[str, np.ndarray] = {}
    for label, path in paths.items():
        with load(path, threads=args.threads) as rt:
            out = rt.run({"x": x})[0]
        eager_top1[label] = out.argmax(1)
        rows.append({"model": name, "variant": label, "accuracy": float((out.argmax(1) == y).mean()),
                     "bytes": sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*"))
                                  if p.is_file() and p.name != "MLmodel")})
    compiled: dict[str, Compiled] = {}
    if args.compile:
        for label in ("torch fp32 (eager)", "torch int8 PT2E (eager)"):
            clabel = label.replace("eager", "torch.compile inductor")
            t0 = time.monotonic()
            try:
                compiled[clabel] = Compiled(paths[label], args.threads)
                out = compiled[clabel].run_native(batch)  # the compile happens on the first call
            except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
                error = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
                compiled.pop(clabel, None)
                progress(f"{name}: torch.compile of {label} FAILED after {time.monotonic() - t0:.0f} s: {error}")
                rows.append({"model": name, "variant": clabel, "accuracy": None, "bytes": None, "error": error})
                continue
            agree = float((out.numpy().argmax(1) == np.asarray(eager_top1[label][:1])).mean())
            progress(f"{name}: compiled {label} in {time.monotonic() - t0:.0f} s (top-1 as eager: {agree:.0f})")
            rows.append({"model": name, "variant": clabel, "accuracy": None, "bytes": None,
                         "compile_s": time.monotonic() - t0})

    def runtime(label: str) -> Any:
        return compiled[label] if label in compiled else load(paths[label], threads=args.threads)

    times = measure.time_models(runtime, [*paths, *compiled], batch, args.warmup, args.runs, rounds=args.rounds)
    fp32_ms = measure.latency_stats(times["torch fp32 (eager)"], args.batch)["latency_ms_p50"]
    for row in rows:
        if row["variant"] not in times:  # a failed compile
            row.update({"p50_ms": None, "p95_ms": None, "vs_torch_fp32": None})
            continue
        stats = measure.latency_stats(times[row["variant"]], args.batch)
        row.update({"p50_ms": stats["latency_ms_p50"], "p95_ms": stats["latency_ms_p95"],
                    "vs_torch_fp32": stats["latency_ms_p50"] / fp32_ms})
    base = rows[0]["accuracy"]
    for row in rows:
        row["drop_pt"] = None if row["accuracy"] is None else (base - row["accuracy"]) * 100
    return rows


def distill_rows(name: str, src: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    from airflow_modelopt.container.runner import run_step

    common = {"model_uri": src["pt2"], "train_data_uri": src["train"], "eval_data_uri": src["eval"],
              "width_factor": args.width, "epochs": args.distill_epochs, "early_stop_patience": None,
              "context": {"experiment_name": "bench-tqd"}}
    rows = [{"model": name, "variant": "teacher", "params": None, "accuracy": None, "seed": None}]
    variants = [] if args.skip_logits_only else [("distilled", {"alpha": 0.9})]
    for weight in args.feature_weights:
        variants.append((f"distilled + features {args.feature_layers} w{weight:g}",
                         {"alpha": 0.9, "feature_layers": args.feature_layers, "feature_weight": weight}))
    if not args.skip_hard_labels:
        variants.append(("hard labels only", {"alpha": 0.0}))
    if args.augment:
        # mixup + noise batches, BatchNorm statistics updated: the teacher labels each augmented
        # batch (KD); the hard-label twin mixes each sample's label with its partner's (mixup).
        extra = {"augment": True, "batchnorm": "update"}
        variants += [("distilled, augmented", {"alpha": 0.9, **extra}),
                     ("hard labels only, augmented", {"alpha": 0.0, **extra})]
    for seed in args.seeds:
        for label, fields in variants:
            t0 = time.monotonic()
            m = run_step("distill", {**common, **fields, "seed": seed}).metrics
            rows[0].update(params=m["teacher_params"], accuracy=m["teacher_accuracy"])
            rows.append({"model": name, "variant": f"student x{args.width} {label}", "params": m["student_params"],
                         "accuracy": m["student_accuracy"], "seed": seed, "train_time_s": m["train_time_s"]})
            progress(f"{name}: {rows[-1]['variant']} seed {seed}: accuracy {m['student_accuracy']:.4f} "
                     f"({time.monotonic() - t0:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "residual"], choices=["digits", "residual"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of both .pt2")
    parser.add_argument("--residual-epochs", type=int, default=6)
    parser.add_argument("--distill-epochs", type=int, default=6)
    parser.add_argument("--width", type=float, default=0.45, help="narrowed student's width factor")
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-quantize", action="store_true", help="distillation rows only")
    parser.add_argument("--skip-hard-labels", action="store_true", help="no hard-label-only student")
    parser.add_argument("--skip-logits-only", action="store_true", help="no logits-only distilled student")
    parser.add_argument("--source-dir", type=Path,
                        help="the residual CNN's folder from an earlier run (bench-tqd-*/residual: model.pt2, "
                        "train/calibration/eval.npz) instead of training it again")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="distill seeds (batch order)")
    parser.add_argument("--feature-layers", default="auto",
                        help="distill feature_layers of the feature-matching variants ('auto' or 'a,b')")
    parser.add_argument("--feature-weights", type=float, nargs="*", default=[],
                        help="also distil with feature matching at each of these feature_weight values")
    parser.add_argument("--augment", action="store_true",
                        help="also distil and hard-label-train on mixup + noise batches with BatchNorm updated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-tqd-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("MODELOPT_ARTIFACT_ROOT", str(work / "artifacts"))
    os.environ.setdefault("MODELOPT_LOG_LEVEL", "WARNING")
    started = time.monotonic()
    srcs = sources(args.models, work, args.residual_epochs, args)
    quant: list[dict[str, Any]] = []
    dist: list[dict[str, Any]] = []
    failures: list[str] = []
    for name, src in srcs.items():
        try:
            quant += [] if args.skip_quantize else quantization_rows(name, src, work, args)
        except Exception as exc:  # noqa: BLE001 - a failed build keeps its reason; the run goes on
            failures.append(f"{name} int8: {type(exc).__name__}: {str(exc)[:500]}")
            progress(failures[-1])
        try:
            dist += [] if args.skip_distill else distill_rows(name, src, args)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name} distill: {type(exc).__name__}: {str(exc)[:500]}")
            progress(failures[-1])
        progress(f"{name}: done at {time.monotonic() - started:.0f} s")

    print("\ncommand: " + " ".join([".venv/bin/python", *sys.argv]))
    print(f"\nint8: batch {args.batch}, {args.threads} thread(s), {args.runs} timed runs; drop vs torch fp32\n")
    print("| model | variant | accuracy | drop | bytes | p50 ms | p95 ms | vs torch fp32 eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in quant:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        drop = "" if r["drop_pt"] is None else f"{r['drop_pt']:+.2f} pt"
        size = "" if r["bytes"] is None else f"{r['bytes']:,}"
        if r.get("error"):
            print(f"| {r['model']} | {r['variant']} | FAILED: {r['error']} | | | | | |")
            continue
        note = f" (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
        print(f"| {r['model']} | {r['variant']}{note} | {acc} | {drop} | {size} | {r['p50_ms']:.3f} | "
              f"{r['p95_ms']:.3f} | {r['vs_torch_fp32']:.2f}x |")
    if dist:
        print(f"\ndistillation: {args.distill_epochs} epochs, cosine LR, the same narrowed student every way, "
              f"seeds {args.seeds} (batch order)\n")
        print("| model | variant | params | eval accuracy per seed | mean |")
        print("|---|---|---|---|---|")
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in dist:
            groups.setdefault((r["model"], r["variant"]), []).append(r)
        for (model, variant), rs in groups.items():
            accs = [r["accuracy"] for r in rs]
            print(f"| {model} | {variant} | {rs[0]['params']:,.0f} | {' / '.join(f'{a:.4f}' for a in accs)} "
                  f"| {np.mean(accs):.4f} |")
    for failure in failures:
        print(f"\nFAILED {failure}")
    if args.json:
        args.json.write_text(json.dumps({"quantization": quant, "distillation": dist, "failures": failures}, indent=2))
    progress(f"total {time.monotonic() - started:.0f} s; store {os.environ['MLFLOW_TRACKING_URI']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
