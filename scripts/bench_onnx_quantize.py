"""Run onnx_quantize's search mode on this CPU and print every configuration's latency.

Two models, each through the real step (``airflow-modelopt run onnx_quantize``) against a
throw-away local MLflow store:

* ``digits``: the example digits CNN (train_example -> torch_to_onnx -> onnx_quantize).
* ``resnet18``: a ResNet-18-shaped CNN (BasicBlock x [2, 2, 2, 2], 1000 classes) at 3x224x224
  with random weights, defined here (torchvision is not a dependency). It measures speed, so
  random weights are fine; its BatchNorm statistics are re-estimated on the benchmark images so
  activations have realistic ranges, and agreement with fp32 stands in for accuracy. Its images
  are scikit-learn's digits upscaled to 224x224 (shipped with scikit-learn: no download, and
  real images rather than noise for calibration).

    .venv/bin/python scripts/bench_onnx_quantize.py --threads 2 --models digits resnet18

Prints the Markdown table the step logs (``search/search_results.md``) for each model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ALL_CONFIGS = [
    "qdq_u8s8_per_channel", "qdq_u8u8_per_tensor", "qdq_u8s8_per_tensor", "qdq_s8s8_per_channel_symmetric",
    "qoperator_u8s8_per_channel", "qoperator_u8u8_per_tensor", "dynamic_u8_per_tensor", "dynamic_s8_per_channel",
]


def step(name: str, spec: dict, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "airflow_modelopt", "run", name, "--spec", "-"],
                          input=json.dumps(spec), capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"step {name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- a ResNet-18-shaped network ---------------------------------------------------------------


def resnet18(classes: int = 1000):
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    return ResNet18()


def digit_images(n: int, offset: int, size: int = 224) -> np.ndarray:
    """scikit-learn's 8x8 digits, upscaled to size x size, 3 channels, ImageNet-style normalized."""
    from sklearn.datasets import load_digits

    images = load_digits().images[offset : offset + n].astype(np.float32) / 16.0
    up = np.kron(images, np.ones((size // 8, size // 8), dtype=np.float32))
    x = np.repeat(up[:, None], 3, axis=1)
    return ((x - 0.45) / 0.225).astype(np.float32)


def build_resnet(out: Path, calibration: int, evaluation: int) -> tuple[Path, Path, Path]:
    import torch

    torch.manual_seed(0)
    model = resnet18()
    cal = digit_images(calibration, 0)
    ev = digit_images(evaluation, calibration)
    # BatchNorm statistics from the benchmark images (no gradient step): realistic activation ranges.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(cal), 16):
            model(torch.from_numpy(cal[i : i + 16]))
    model.eval()
    onnx_dir = out / "resnet18"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(cal[:2]),), str(onnx_dir / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    np.savez(out / "resnet_calibration.npz", x=cal)
    np.savez(out / "resnet_eval.npz", x=ev)
    return onnx_dir, out / "resnet_calibration.npz", out / "resnet_eval.npz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "resnet18"], default=["digits", "resnet18"])
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
    parser.add_argument("--workdir", type=Path, default=None, help="keep the MLflow store here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-onnx-quantize-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MODELOPT_ARTIFACT_ROOT": str(work / "art"),
               "MODELOPT_LOG_LEVEL": "WARNING"}
        common = {"mode": "search", "search_configs": args.configs, "intra_op_threads": args.threads,
                  "latency_batch_size": args.batch, "timed_runs": args.timed_runs, "warmup_runs": args.warmup_runs,
                  "latency_statistic": args.statistic,
                  "calibration_method": args.calibration_method, "context": {"experiment_name": "bench", "force": True}}
        targets = []
        if "digits" in args.models:
            trained = step("train_example", {"context": {"experiment_name": "bench"}}, env)
            exported = step("torch_to_onnx", {"model_uri": trained["artifacts"]["model_pt2"],
                                              "data_uri": trained["artifacts"]["eval_data"],
                                              "context": {"experiment_name": "bench"}}, env)
            targets.append(("digits CNN, 1x8x8", {"model_uri": exported["artifacts"]["onnx_model"],
                                                  "calibration_data_uri": trained["artifacts"]["calibration_data"],
                                                  "eval_data_uri": trained["artifacts"]["eval_data"]}))
        if "resnet18" in args.models:
            model_dir, cal, ev = build_resnet(work, args.resnet_calibration, args.resnet_eval)
            targets.append(("ResNet-18-shaped CNN (random weights), 3x224x224",
                            {"model_uri": str(model_dir), "calibration_data_uri": str(cal), "eval_data_uri": str(ev),
                             "min_top1_agreement": args.resnet_min_agreement}))
        for title, spec in targets:
            result = step("onnx_quantize", {**spec, **common}, env)
            import mlflow

            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            table = Path(mlflow.artifacts.download_artifacts(result["artifacts"]["search_table"], dst_path=str(work / "t")))
            print(f"\n## {title}\n")
            print(table.read_text())
            m = result["metrics"]
            print(f"chosen: {result['info']['chosen_config']} ({m['int8_latency_ms']:.3f} ms vs fp32 "
                  f"{m['fp32_latency_ms']:.3f} ms, size ratio {m['size_ratio']:.3f}, gate {result['info']['gates']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
