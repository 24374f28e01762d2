"""The guide's deployment targets side by side on this CPU: ONNX Runtime fp32 / int8, OpenVINO IR
fp32 / int8 (NNCF), MNN fp32 / int8, on the same model, data and threads.

Every candidate is built by the real step (``airflow-modelopt run``: onnx_quantize static QDQ,
openvino_convert, mnn_convert) against a throw-away SQLite MLflow store, downloaded, then loaded
through ``container.runtimes`` and measured in this one process with ``container.measure``, the
functions the validate and benchmark steps use: top-1 accuracy on labelled eval data (drop against
ONNX Runtime fp32) and latency at batch 1 (``time_models``: every model in turn, in rounds, so drift
in the machine's load hits all alike; p50 of the timed runs).

Models:

* ``digits``: the example digits CNN, trained here as train_example trains it, 1x8x8.
* ``residual``: a small ResNet (``_bench_common.residual_cnn``) trained here for a few epochs on
  tinted scikit-learn digits upscaled to 3x32x32 (labels, so accuracy is real).
* ``resnet18``: a ResNet-18-shaped CNN at 3x224x224 with random weights (BatchNorm statistics
  re-estimated on the images); no meaningful labels, so top-1 agreement with fp32 stands in.

    .venv/bin/python scripts/bench_deploy_targets.py --models digits residual --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _bench_common import (
    StepError,
    download,
    reestimate_batchnorm,
    residual_cnn,
    resnet18,
    run_step,
    save_npz,
    sqlite_store,
    to_rgb,
)

from airflow_modelopt.container.measure import agreement, latency_stats, time_models
from airflow_modelopt.container.runtimes import load

#: candidate -> (step, spec fields, artifact); "onnx_fp32" is the source itself.
CANDIDATES: dict[str, tuple[str, dict[str, Any], str]] = {
    "onnx_int8": ("onnx_quantize", {"mode": "static"}, "onnx_model"),
    "openvino_fp32": ("openvino_convert", {"precision": "fp32", "throughput_seconds": 0}, "openvino_model"),
    "openvino_int8": ("openvino_convert", {"precision": "int8", "throughput_seconds": 0}, "openvino_model"),
    "mnn_fp32": ("mnn_convert", {"precision": "fp32"}, "mnn_model"),
    "mnn_int8": ("mnn_convert", {"precision": "int8"}, "mnn_model"),
}
CALIBRATED = {"onnx_int8", "openvino_int8", "mnn_int8"}


def export_onnx(model: torch.nn.Module, example: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), (torch.from_numpy(example[:2]),), str(folder / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    return folder


def build_digits(work: Path) -> tuple[str, str, str]:
    """The example digits CNN trained as train_example trains it (its default splits and recipe)."""
    from airflow_modelopt.container.examples.digits import DigitsCNN, load_splits, train

    torch.manual_seed(0)
    splits = load_splits(0, 200, 400)
    model = DigitsCNN()
    train(model, *splits["train"], epochs=15, lr=3e-3, batch_size=64, seed=0)
    folder = export_onnx(model, splits["calibration"][0], work / "digits")
    return (str(folder), str(save_npz(work / "digits_cal.npz", *splits["calibration"])),
            str(save_npz(work / "digits_eval.npz", *splits["eval"])))


def build_residual(work: Path, epochs: int) -> tuple[str, str, str]:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = to_rgb(digits.images.astype("float32")[:, None] / 16.0, 32, tint_seed=1)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    ev, cal, tr = order[:300], order[300:500], order[500:]
    model = residual_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
    folder = export_onnx(model, x[cal], work / "residual")
    return (str(folder), str(save_npz(work / "residual_cal.npz", x[cal], y[cal])),
            str(save_npz(work / "residual_eval.npz", x[ev], y[ev])))


def build_resnet18(work: Path) -> tuple[str, str, str]:
    from _bench_common import digit_images

    torch.manual_seed(0)
    model = resnet18()
    cal, ev = digit_images(64, 0), digit_images(64, 64)
    reestimate_batchnorm(model, cal)
    folder = export_onnx(model, cal, work / "resnet18")
    return str(folder), str(save_npz(work / "resnet_cal.npz", cal)), str(save_npz(work / "resnet_eval.npz", ev))


def local(uri: str, dest: Path) -> Path:
    return Path(uri) if Path(uri).exists() else download(uri, dest)


def measure(models: dict[str, Path], formats: dict[str, str], eval_npz: Path, threads: int, runs: int) -> dict[str, dict[str, float]]:
    data = np.load(eval_npz)
    feeds, labels = {"x": data["x"].astype(np.float32)}, data["y"] if "y" in data.files else None

    def open_model(name: str) -> Any:
        return load(models[name], formats[name], threads=threads, field=name)

    outputs = {}
    for name in models:
        with open_model(name) as runtime:
            outputs[name] = runtime.run(feeds, batch_size=64)
    rows = {name: agreement(outputs["onnx_fp32"], outputs[name], labels) for name in models}
    times = time_models(open_model, list(models), {"x": feeds["x"][:1]}, 10, runs)
    for name in models:
        rows[name].update(latency_stats(times[name], 1))
        with open_model(name) as runtime:
            rows[name]["model_bytes"] = float(runtime.model_bytes())
    return rows


def table(title: str, rows: dict[str, dict[str, float]], threads: int) -> str:
    base = rows["onnx_fp32"]["latency_ms_p50"]
    lines = [f"### {title} (batch 1, {threads} thread(s))", "",
             "| candidate | p50 ms | vs ORT fp32 | accuracy | drop | top-1 agreement | bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        drop = f"{r['accuracy_drop']:+.4f}" if "accuracy_drop" in r else "-"
        lines.append(f"| {name} | {r['latency_ms_p50']:.4f} | {base / r['latency_ms_p50']:.2f}x | {acc} | {drop} | "
                     f"{r.get('top1_agreement', float('nan')):.4f} | {int(r['model_bytes']):,} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["digits", "residual", "resnet18"], default=["digits", "residual"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timed-runs", type=int, default=200)
    parser.add_argument("--residual-epochs", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = sqlite_store(work)
        os.environ.update(env)  # this process downloads the steps' artifacts from the same store
        for name in args.models:
            if name == "digits":
                source, cal, ev = build_digits(work)
            elif name == "residual":
                source, cal, ev = build_residual(work, args.residual_epochs)
            else:
                source, cal, ev = build_resnet18(work)
            built = work / f"{name}-candidates"
            models = {"onnx_fp32": local(source, built / "onnx_fp32")}
            formats = {"onnx_fp32": "onnx"}
            for cand, (step, fields, artifact) in CANDIDATES.items():
                spec = {"model_uri": source, **fields, "context": {"experiment_name": "bench", "force": True}}
                if cand in CALIBRATED:
                    spec["calibration_data_uri"] = cal
                try:
                    result = run_step(step, spec, env)
                except StepError as exc:  # e.g. MNN's quantizer crashing on a residual network
                    print(f"{name}: {cand} not built: {exc}", flush=True)
                    continue
                models[cand] = download(result["artifacts"][artifact], built / cand)
                formats[cand] = artifact.split("_")[0]
            rows = measure(models, formats, local(ev, built / "eval"), args.threads, args.timed_runs)
            print(table(name, rows, args.threads), flush=True)
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
