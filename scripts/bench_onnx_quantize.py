"""Run onnx_quantize's search mode on this CPU and print every configuration's latency.

Three models, each through the real step (``airflow-modelopt run onnx_quantize``) against a
throw-away local MLflow store:

* ``digits``: the example digits CNN (train_example -> torch_to_onnx -> onnx_quantize).
* ``residual``: a small ResNet (``_bench_common.residual_cnn``: 3x3 stem, three BasicBlocks) at
  3x32x32 with random weights, BatchNorm statistics estimated on tinted scikit-learn digits
  upscaled to 32x32; timed at ``--batch`` (use 32: about 3 ms in fp32, 2 ms in int8 on 2 threads).
* ``resnet18``: a ResNet-18-shaped CNN (BasicBlock x [2, 2, 2, 2], 1000 classes) at 3x224x224
  with random weights, defined in ``_bench_common`` (torchvision is not a dependency). It measures speed, so
  random weights are fine; its BatchNorm statistics are re-estimated on the benchmark images so
  activations have realistic ranges, and agreement with fp32 stands in for accuracy. Its images
  are scikit-learn's digits upscaled to 224x224 (shipped with scikit-learn: no download, and
  real images rather than noise for calibration). With ``--resnet-train-steps N`` it is first trained
  for N SGD steps on other digits (labels 0-9), so its head has real margins and top-1 agreement
  with fp32 (gate 0.99) means what it does on a trained model; the weights are kept in ``--workdir``.
  The ``layerwise`` configuration's per-layer kernel choice is printed as a table, and its
  space-to-depth stem (``onnx_quantize.space_to_depth``) as a line: profiled with and without.

* ``bert``: the zoo's BERT-tiny-shaped encoder at BERT-tiny's width (d 128, 2 heads, 2 layers,
  sequence 128), trained for ``--bert-epochs`` on the digits as 128 tokens (pixel intensities by
  rows, then by columns), exported with the dynamo exporter. Searched over the static default and
  dynamic int8; with ``optimize_transformer`` at its default (auto) every dynamic configuration is
  also tried on the transformer-fused graph (``fused_*``: Attention, SkipLayerNormalization, BiasGelu),
  gated on at most 1 point of accuracy drop (issue 11).

    .venv/bin/python scripts/bench_onnx_quantize.py --threads 2 --models digits resnet18
    .venv/bin/python scripts/bench_onnx_quantize.py --models resnet18 bert --threads 2 --batch 1 --profile
    .venv/bin/python scripts/bench_onnx_quantize.py --models resnet18 --threads 2 --batch 1 --resnet-train-steps 150 \
        --resnet-eval 256 --configs qoperator_u8s8_per_channel qoperator_u8s8_per_channel_asymmetric \
        qoperator_u8s8_per_channel_layerwise --profile --workdir /tmp/r18   # issue 12's int8 row

``--profile`` prints ONNX Runtime's per-op profile (``SessionOptions.enable_profiling``) of fp32 and
the chosen int8 model side by side: where the time goes (issue 12 item 2).

Prints the Markdown table the step logs (``search/search_results.md``) for each model. With
``--benchmark``, the ``benchmark`` step then times the chosen model (the file the search logged) and
the fp32 source in fresh processes with the same threads, batch and runs, and the search's figures
are printed beside the benchmark's p50 (issue 12: they should agree within 15%):

    .venv/bin/python scripts/bench_onnx_quantize.py --models residual --threads 2 --batch 32 --benchmark
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _bench_common import (
    digit_images,
    download,
    reestimate_batchnorm,
    residual_cnn,
    resnet18,
    run_step,
    save_npz,
    sqlite_store,
    to_rgb,
)

from airflow_modelopt.specs.onnx_quantize import SEARCH_CONFIGS

ALL_CONFIGS = list(SEARCH_CONFIGS)
#: BERT's search: the static default, and dynamic int8 (tried on the transformer-fused graph too).
BERT_CONFIGS = ["qdq_u8s8_per_channel", "dynamic_u8_per_tensor", "dynamic_s8_per_channel"]


def train_resnet(model: torch.nn.Module, offset: int, steps: int, batch: int = 16) -> float:
    """``steps`` SGD steps on the digits after the calibration and eval images (224x224, labels 0-9 of
    the 1000-class head): a head with real margins, so int8's agreement means what it does on a trained
    model (a random head's near-tied logits flip on any rounding). Returns the last loss."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(0)
    pool = np.arange(offset, len(labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        idx = rng.choice(pool, batch, replace=False)
        x = torch.from_numpy(np.concatenate([digit_images(1, int(i)) for i in idx]))
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels[idx]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"ResNet-18 training step {step + 1}/{steps}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    return float(loss.item())


def build_resnet(out: Path, calibration: int, evaluation: int, train_steps: int = 0
                 ) -> tuple[Path, Path, Path]:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = resnet18()
    cal = digit_images(calibration, 0)
    ev = digit_images(evaluation, calibration)
    if train_steps:
        # trained weights are kept in the work folder: re-running with --workdir skips the training
        weights = out / f"resnet18_trained_{train_steps}_cosine_after_{calibration + evaluation}.pt"
        if weights.is_file():
            model.load_state_dict(torch.load(weights))
            model.eval()
        else:
            train_resnet(model, calibration + evaluation, train_steps)
            torch.save(model.state_dict(), weights)
    else:
        reestimate_batchnorm(model, cal)  # realistic activation ranges for calibration
    labels = load_digits().target[calibration:calibration + evaluation] if train_steps else None
    onnx_dir = out / "resnet18"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(cal[:2]),), str(onnx_dir / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    return onnx_dir, save_npz(out / "resnet_calibration.npz", cal), save_npz(out / "resnet_eval.npz", ev, labels)


def build_residual(out: Path, calibration: int, evaluation: int) -> tuple[Path, Path, Path]:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images = load_digits().images.astype("float32")[:, None] / 16.0
    x = to_rgb(images[: calibration + evaluation], 32, tint_seed=1)
    model = residual_cnn()
    reestimate_batchnorm(model, x[:calibration])
    onnx_dir = out / "residual"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(onnx_dir / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    return (onnx_dir, save_npz(out / "residual_calibration.npz", x[:calibration]),
            save_npz(out / "residual_eval.npz", x[calibration:]))


def bert_tokens(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) digits in [0, 1] -> (N, 128) token ids 0..16: the pixel intensities row by row, then
    column by column (the zoo's ``tokens`` data, long enough for a sequence of 128)."""
    rows = np.rint(images * 16).astype(np.int64)
    return np.concatenate([rows.reshape(len(rows), 64), rows.transpose(0, 2, 1).reshape(len(rows), 64)], axis=1)


def build_bert(out: Path, epochs: int) -> tuple[Path, Path, Path]:
    """The zoo's BERT-tiny-shaped encoder at BERT-tiny's width (d 128, 2 heads, 2 layers, sequence 128),
    trained on scikit-learn's digits as tokens (so accuracy means something), exported with the
    torch.onnx dynamo exporter as the torch_to_onnx step exports."""
    from airflow_modelopt.container.examples.zoo import ZOO, BertTiny, splits

    entry = ZOO["bert_tiny"]
    parts = {k: {"x": bert_tokens(v["x"].reshape(-1, 8, 8)), "y": v["y"]} for k, v in splits("image").items()}
    onnx_dir = out / "bert"
    if (onnx_dir / "model.onnx").is_file():  # built before in this --workdir
        return onnx_dir, out / "bert_calibration.npz", out / "bert_eval.npz"
    torch.manual_seed(0)
    model = BertTiny(seq=128, d=128, heads=2, layers=2)
    trainer = dataclasses.replace(entry, factory=lambda: model, epochs=epochs)
    trainer.train(model, parts["train"])
    onnx_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), (torch.from_numpy(parts["calibration"]["x"][:2]),), str(onnx_dir / "model.onnx"),
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=True,
                      external_data=True)
    return (onnx_dir, save_npz(out / "bert_calibration.npz", parts["calibration"]["x"][:64]),
            save_npz(out / "bert_eval.npz", parts["eval"]["x"], parts["eval"]["y"]))


def op_profile(model: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> tuple[dict[str, tuple[float, int]], float]:
    """ONNX Runtime's own per-op profile (``onnx_quantize.layerwise.kernel_events``: the step's
    profiler) of ``runs`` runs after 10 untimed ones: {op type: (ms per run, nodes)}, and the summed
    kernel time per run. Profiling adds overhead to every kernel: read the shares."""
    from airflow_modelopt.container.steps.onnx_quantize.layerwise import kernel_events

    total: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for e in kernel_events(model, feed, threads, 10, runs):
        total[e["op"]] = total.get(e["op"], 0.0) + e["us"]
        nodes.setdefault(e["op"], set()).add(e["node"])
    per_run = {op: (us / runs / 1000, len(nodes[op])) for op, us in sorted(total.items(), key=lambda kv: -kv[1])}
    return per_run, sum(ms for ms, _ in per_run.values())


def local_copy(uri: str, dest: Path) -> Path:
    """A path as it is, an artifact URI downloaded under ``dest``."""
    return Path(uri) if Path(uri).exists() else download(uri, dest)


def layerwise_table(record: dict) -> str:
    """The layerwise configuration's per-QLinearConv record as a Markdown table."""
    lines = ["| node | symmetric µs | asymmetric µs | asymmetric / symmetric | chosen |", "| --- | ---: | ---: | ---: | --- |"]
    for e in record["per_node"]:
        sym, asym = e["symmetric_us"], e["asymmetric_us"]
        ratio = f"{asym / sym:.2f}" if sym and asym else ""
        lines.append(f"| {e['node']} | {sym or ''} | {asym or ''} | {ratio} | {e['chosen']} {e.get('why', '')} |")
    lines.append(f"| **total** | **{record['symmetric_us']}** | **{record['asymmetric_us']}** | | "
                 f"**composed {record['composed_us']}** ({record['asymmetric']} of {record['nodes']} asymmetric) |")
    return "\n".join(lines) + "\n"


def profile_table(profiles: dict[str, tuple[dict[str, tuple[float, int]], float]], top: int = 12) -> str:
    """Markdown: the top ops by time of each model side by side (ms per run, share, node count)."""
    names = list(profiles)
    ops: list[str] = []
    for name in names:
        ops += [op for op in list(profiles[name][0])[:top] if op not in ops]
    lines = ["| op type | " + " | ".join(f"{n} ms (share, nodes)" for n in names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for op in ops:
        cells = []
        for name in names:
            per_op, total = profiles[name]
            ms, count = per_op.get(op, (0.0, 0))
            cells.append(f"{ms:.3f} ({ms / total:.0%}, {count})" if count else "")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **kernel total** | " + " | ".join(f"**{profiles[n][1]:.3f}**" for n in names) + " |")
    return "\n".join(lines)


def benchmark_p50(model_uri: str, data: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    """The benchmark step's p50 for one model, with the search's threads, batch and runs."""
    result = run_step("benchmark", {"model_uri": model_uri, "data_uri": data, "batch_sizes": [args.batch],
                                    "threads": args.threads, "warmup_runs": args.warmup_runs,
                                    "timed_runs": args.timed_runs, "measure_memory": False,
                                    "context": {"experiment_name": "bench", "force": True}}, env)
    return result["metrics"]["latency_ms_p50"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "residual", "resnet18", "bert"],
                        default=["digits", "resnet18"])
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="latency batch size (default 1)")
    parser.add_argument("--timed-runs", type=int, default=60)
    parser.add_argument("--statistic", choices=["median", "min"], default="median",
                        help="latency statistic the search compares (min on a machine shared with other jobs)")
    parser.add_argument("--warmup-runs", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS)
    parser.add_argument("--calibration-method", default="MinMax", choices=["MinMax", "Entropy", "Percentile"])
    parser.add_argument("--resnet-calibration", type=int, default=64, help="calibration images for ResNet-18")
    parser.add_argument("--resnet-eval", type=int, default=64, help="evaluation images for ResNet-18")
    parser.add_argument("--resnet-min-agreement", type=float, default=None,
                        help="ResNet-18's top-1 agreement gate (default 0.99 trained, 0.8 with --resnet-train-steps 0: "
                             "a random 1000-class head has near-tied logits, so int8 rounding flips more argmaxes)")
    parser.add_argument("--resnet-train-steps", type=int, default=0,
                        help="SGD steps (batch 16) on digits at 224x224 before export, so the head has real margins "
                             "(60 take a few minutes on 2 cores; 0: random weights)")
    parser.add_argument("--residual-min-agreement", type=float, default=0.5,
                        help="the residual CNN's top-1 agreement gate (random weights; default 0.5)")
    parser.add_argument("--bert-epochs", type=int, default=6, help="training epochs of the BERT-tiny encoder")
    parser.add_argument("--bert-configs", nargs="+", default=BERT_CONFIGS, choices=ALL_CONFIGS,
                        help="BERT's search configurations (each dynamic one is also tried on the fused graph)")
    parser.add_argument("--bert-max-accuracy-drop", type=float, default=0.01,
                        help="BERT's gate: accuracy drop on the labelled eval split (default 1 point)")
    parser.add_argument("--profile", action="store_true",
                        help="print ONNX Runtime's per-op profile of fp32 and the chosen int8 model")
    parser.add_argument("--profile-runs", type=int, default=30)
    parser.add_argument("--benchmark", action="store_true",
                        help="time the chosen model and fp32 with the benchmark step too, and compare")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the MLflow store here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-onnx-quantize-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = sqlite_store(work)
        common = {"mode": "search", "search_configs": args.configs, "intra_op_threads": args.threads,
                  "latency_batch_size": args.batch, "timed_runs": args.timed_runs, "warmup_runs": args.warmup_runs,
                  "latency_statistic": args.statistic,
                  "calibration_method": args.calibration_method, "context": {"experiment_name": "bench", "force": True}}
        targets = []
        if "digits" in args.models:
            trained = run_step("train_example", {"context": {"experiment_name": "bench"}}, env)
            exported = run_step("torch_to_onnx", {"model_uri": trained["artifacts"]["model_pt2"],
                                                  "data_uri": trained["artifacts"]["eval_data"],
                                                  "context": {"experiment_name": "bench"}}, env)
            targets.append(("digits CNN, 1x8x8", {"model_uri": exported["artifacts"]["onnx_model"],
                                                  "calibration_data_uri": trained["artifacts"]["calibration_data"],
                                                  "eval_data_uri": trained["artifacts"]["eval_data"]}))
        if "residual" in args.models:
            model_dir, cal, ev = build_residual(work, 128, 64)
            targets.append(("residual CNN (random weights), 3x32x32",
                            {"model_uri": str(model_dir), "calibration_data_uri": str(cal), "eval_data_uri": str(ev),
                             "min_top1_agreement": args.residual_min_agreement}))
        if "resnet18" in args.models:
            model_dir, cal, ev = build_resnet(work, args.resnet_calibration, args.resnet_eval, args.resnet_train_steps)
            gate = args.resnet_min_agreement or (0.99 if args.resnet_train_steps else 0.8)
            weights = f"trained {args.resnet_train_steps} steps on digits" if args.resnet_train_steps else "random weights"
            targets.append((f"ResNet-18-shaped CNN ({weights}), 3x224x224",
                            {"model_uri": str(model_dir), "calibration_data_uri": str(cal), "eval_data_uri": str(ev),
                             "min_top1_agreement": gate}))
        if "bert" in args.models:
            model_dir, cal, ev = build_bert(work, args.bert_epochs)
            targets.append(("BERT-tiny-shaped encoder (d 128, 2 heads, 2 layers, sequence 128; trained on digits as "
                            "tokens)", {"model_uri": str(model_dir), "calibration_data_uri": str(cal),
                                        "eval_data_uri": str(ev), "search_configs": args.bert_configs,
                                        "max_accuracy_drop": args.bert_max_accuracy_drop}))
        for title, spec in targets:
            result = run_step("onnx_quantize", {**common, **spec}, env)
            import mlflow

            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            table = Path(mlflow.artifacts.download_artifacts(result["artifacts"]["search_table"], dst_path=str(work / "t")))
            print(f"\n## {title}\n")
            print(table.read_text())
            m = result["metrics"]
            print(f"chosen: {result['info']['chosen_config']} ({m['int8_latency_ms']:.3f} ms vs fp32 "
                  f"{m['fp32_latency_ms']:.3f} ms, size ratio {m['size_ratio']:.3f}, gate {result['info']['gates']})")
            print(f"transformer fusion: {result['info']['transformer_fusion']}")
            record = json.loads(Path(mlflow.artifacts.download_artifacts(
                result["artifacts"]["search_results"], dst_path=str(work / "r"))).read_text())
            for config in record["configurations"]:
                if "layerwise" in config:
                    print(f"\n{config['config']}: per-layer kernel choice (ORT's profiler, conv kernel µs per run)\n")
                    print(layerwise_table(config["layerwise"]))
                stem = config.get("space_to_depth") or {}
                if stem.get("nodes"):
                    print(f"{config['config']}: space-to-depth on {', '.join(stem['nodes'])}: summed kernel time "
                          f"{stem['before_us']} us per run without, {stem['after_us']} us with "
                          f"({stem['after_us'] / stem['before_us']:.2f}x): {'kept' if stem['kept'] else 'not kept'}\n")
            if args.profile:
                chosen = download(result["artifacts"]["onnx_model"], work / "chosen" / title[:8]) / "model.onnx"
                source = local_copy(spec["model_uri"], work / "source" / title[:8]) / "model.onnx"
                feed = {"x": np.load(local_copy(spec["calibration_data_uri"], work / "data" / title[:8]))["x"][: args.batch]}
                profiles = {"fp32": op_profile(source, feed, args.threads, args.profile_runs),
                            result["info"]["chosen_config"]: op_profile(chosen, feed, args.threads, args.profile_runs)}
                print(f"\nONNX Runtime per-op profile (enable_profiling; {args.profile_runs} runs after 10, batch "
                      f"{args.batch}, {args.threads} threads; kernel time per run):\n")
                print(profile_table(profiles))
            if args.benchmark:
                data = spec["calibration_data_uri"]
                int8 = benchmark_p50(result["artifacts"]["onnx_model"], data, args, env)
                fp32 = benchmark_p50(spec["model_uri"], data, args, env)
                print(f"benchmark step, same threads/batch/runs: int8 p50 {int8:.3f} ms (search "
                      f"{m['int8_latency_ms']:.3f} ms, {m['int8_latency_ms'] / int8 - 1:+.0%}), fp32 p50 {fp32:.3f} ms "
                      f"(search {m['fp32_latency_ms']:.3f} ms, {m['fp32_latency_ms'] / fp32 - 1:+.0%}); ratio "
                      f"int8/fp32 {int8 / fp32:.2f} (search {m['latency_ratio']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
