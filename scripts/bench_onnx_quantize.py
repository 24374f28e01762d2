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
  real images rather than noise for calibration).

    .venv/bin/python scripts/bench_onnx_quantize.py --threads 2 --models digits resnet18

Prints the Markdown table the step logs (``search/search_results.md``) for each model. With
``--benchmark``, the ``benchmark`` step then times the chosen model (the file the search logged) and
the fp32 source in fresh processes with the same threads, batch and runs, and the search's figures
are printed beside the benchmark's p50 (issue 12: they should agree within 15%):

    .venv/bin/python scripts/bench_onnx_quantize.py --models residual --threads 2 --batch 32 --benchmark
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _bench_common import (
    digit_images,
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


def build_resnet(out: Path, calibration: int, evaluation: int) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    model = resnet18()
    cal = digit_images(calibration, 0)
    ev = digit_images(evaluation, calibration)
    reestimate_batchnorm(model, cal)  # realistic activation ranges for calibration
    onnx_dir = out / "resnet18"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(cal[:2]),), str(onnx_dir / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    return onnx_dir, save_npz(out / "resnet_calibration.npz", cal), save_npz(out / "resnet_eval.npz", ev)


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


def benchmark_p50(model_uri: str, data: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    """The benchmark step's p50 for one model, with the search's threads, batch and runs."""
    result = run_step("benchmark", {"model_uri": model_uri, "data_uri": data, "batch_sizes": [args.batch],
                                    "threads": args.threads, "warmup_runs": args.warmup_runs,
                                    "timed_runs": args.timed_runs, "measure_memory": False,
                                    "context": {"experiment_name": "bench", "force": True}}, env)
    return result["metrics"]["latency_ms_p50"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "residual", "resnet18"],
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
    parser.add_argument("--resnet-min-agreement", type=float, default=0.8,
                        help="ResNet-18's top-1 agreement gate: its random 1000-class head has near-tied logits, so "
                             "int8 rounding flips more argmaxes than on a trained model (default 0.8)")
    parser.add_argument("--residual-min-agreement", type=float, default=0.5,
                        help="the residual CNN's top-1 agreement gate (random weights; default 0.5)")
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
            model_dir, cal, ev = build_resnet(work, args.resnet_calibration, args.resnet_eval)
            targets.append(("ResNet-18-shaped CNN (random weights), 3x224x224",
                            {"model_uri": str(model_dir), "calibration_data_uri": str(cal), "eval_data_uri": str(ev),
                             "min_top1_agreement": args.resnet_min_agreement}))
        for title, spec in targets:
            result = run_step("onnx_quantize", {**spec, **common}, env)
            import mlflow

            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            table = Path(mlflow.artifacts.download_artifacts(result["artifacts"]["search_table"], dst_path=str(work / "t")))
            print(f"\n## {title}\n")
            print(table.read_text())
            m = result["metrics"]
            print(f"chosen: {result['info']['chosen_config']} ({m['int8_latency_ms']:.3f} ms vs fp32 "
                  f"{m['fp32_latency_ms']:.3f} ms, size ratio {m['size_ratio']:.3f}, gate {result['info']['gates']})")
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
