#!/usr/bin/env python
"""Measure the prune step on the example digits CNN: what pruning really buys, side by side.

Trains the example model (the ``train_example`` step), then runs the ``prune`` step for each
variant below and exports every model (the source too) to ONNX with the ``torch_to_onnx`` step.
Everything goes through the real steps and an MLflow store (a throwaway SQLite one by default),
in this process. Prints a Markdown table: parameters, FLOPs (one sample, multiply-accumulates plus
bias/normalization ops), bytes and gzip bytes of the .pt2 and of the ONNX model, measured weight
sparsity, and eval accuracy before/after.

    .venv/bin/python scripts/bench_prune.py                  # about 2-4 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_prune.py --epochs 3 --sparsity 0.5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_common import download, sizes


def onnx_sizes(uri: str, dest: Path) -> tuple[int, int]:
    """(bytes, gzip bytes) of an ONNX model artifact: its graph plus external data."""
    return sizes(download(uri, dest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs of the '+ fine-tune' variants")
    parser.add_argument("--train-epochs", type=int, default=15, help="epochs of the example model's training")
    parser.add_argument("--tracking-uri", help="MLflow store (default: a temporary SQLite store)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    tmp = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", args.tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}")
    os.environ.setdefault("MODELOPT_ARTIFACT_ROOT", str(tmp / "artifacts"))
    from airflow_modelopt.container.runner import run_step

    ctx = {"experiment_name": "bench-prune", "force": True}
    started = time.monotonic()
    trained = run_step("train_example", {"epochs": args.train_epochs, "context": ctx})
    art = trained.artifacts
    print(f"example model: eval accuracy {trained.metrics['eval_accuracy']:.4f} "
          f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    data = {"train_data_uri": art["train_data"], "eval_data_uri": art["eval_data"]}
    variants = [
        ("unstructured", 0), ("unstructured", args.epochs), ("structured", 0), ("structured", args.epochs),
    ]
    source_onnx = run_step("torch_to_onnx", {"model_uri": art["model_pt2"], "data_uri": art["eval_data"], "context": ctx})
    src_onnx_bytes, src_onnx_gzip = onnx_sizes(source_onnx.artifacts["onnx_model"], tmp / "onnx-source")
    rows: list[dict[str, Any]] = []
    for method, epochs in variants:
        t0 = time.monotonic()
        res = run_step("prune", {"model_uri": art["model_pt2"], **data, "method": method, "sparsity": args.sparsity,
                                 "fine_tune_epochs": epochs, "context": ctx})
        onnx = run_step("torch_to_onnx", {"model_uri": res.artifacts["model_pt2"], "data_uri": art["eval_data"],
                                          "context": ctx})
        onnx_bytes, onnx_gzip = onnx_sizes(onnx.artifacts["onnx_model"], tmp / f"onnx-{method}-{epochs}")
        m = res.metrics
        rows.append({
            "variant": f"{method} {args.sparsity:.0%}" + (f" + fine-tune {epochs} ep" if epochs else ""),
            **{k: m[k] for k in ("params_before", "params_after", "flops_before", "flops_after", "bytes_before",
                                 "bytes_after", "gzip_bytes_before", "gzip_bytes_after", "sparsity",
                                 "accuracy_before", "accuracy_after")},
            "channel_sparsity": m.get("channel_sparsity"),
            "onnx_bytes_before": src_onnx_bytes, "onnx_bytes_after": onnx_bytes,
            "onnx_gzip_before": src_onnx_gzip, "onnx_gzip_after": onnx_gzip,
            "onnx_max_abs_error": onnx.metrics["max_abs_error"], "seconds": round(time.monotonic() - t0, 1),
        })
        print(f"{rows[-1]['variant']}: done in {rows[-1]['seconds']} s", file=sys.stderr)

    def pair(r: dict[str, Any], key: str, fmt: str = "{:,.0f}") -> str:
        before, after = r[f"{key}_before"], r[f"{key}_after"]
        return f"{fmt.format(before)} → {fmt.format(after)} ({after / before:.2f}x)"

    print(f"\nExample digits CNN (scikit-learn digits, 8x8), sparsity {args.sparsity}, eval split 400 samples\n")
    print("| variant | params | FLOPs | .pt2 bytes | .pt2 gzip bytes | ONNX bytes | ONNX gzip bytes "
          "| weight sparsity | accuracy | drop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['accuracy_before']:.4f} → {r['accuracy_after']:.4f}"
        drop = f"{(r['accuracy_before'] - r['accuracy_after']) * 100:+.2f} pt"
        print(f"| {r['variant']} | {pair(r, 'params')} | {pair(r, 'flops')} | {pair(r, 'bytes')} "
              f"| {pair(r, 'gzip_bytes')} | {pair(r, 'onnx_bytes')} | {pair(r, 'onnx_gzip')} "
              f"| {r['sparsity']:.3f} | {acc} | {drop} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"\n(total {time.monotonic() - started:.0f} s; MLflow store {os.environ['MLFLOW_TRACKING_URI']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
