"""Coverage matrix: every zoo model (``airflow_modelopt.container.examples.zoo``) x CPU targets.

For each model: train it here (seconds; deterministic), save its ExportedProgram (.pt2, dynamic batch
and the entry's dynamic axes) and its calibration / eval splits (.npz, inputs by name, labels under
``y``), then build every target with the real steps exactly as the pipeline chains them
(``airflow_modelopt.targets``: torch_to_onnx, then onnx_quantize / tflite_quantize / prune /
torch_quantize / openvino_convert / mnn_convert), in this process through the container's runner
(``container.runner.run_step``) against a throw-away SQLite MLflow store. Each built candidate is
downloaded, loaded through ``container.runtimes`` and measured with ``container.measure`` (the
functions the validate and benchmark steps use): top-1 agreement and accuracy drop against the
PyTorch model's own outputs on the eval split (pixel-wise for the segmenter), the worst cosine over
the outputs, bytes on disk against the ONNX fp32 export, and p50 latency at batch 1 (one thread)
against ONNX Runtime fp32 (``time_models``, models in turn, in rounds).

A cell is ✓ when the build succeeded and the candidate agrees (top-1 agreement >= 0.90 for the
first output, or cosine >= 0.99 where no output holds class scores: validate's default gates),
"⚠" when it built but misses that gate, ✗ with the step's error line when the build failed.

    .venv/bin/python scripts/coverage_matrix.py --out docs/coverage.md
    .venv/bin/python scripts/coverage_matrix.py --models gru --targets tflite_int8   # one cell
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from airflow_modelopt.container.examples.zoo import ZOO, ZooModel  # noqa: E402
from airflow_modelopt.targets import builds  # noqa: E402

#: target -> chain of (step, spec fields, artifact read by the next step / the candidate); "{pt2}",
#: "{cal}", "{eval}", "{train}" are filled per model. The first link of ONNX chains is the export.
EXPORT = ("torch_to_onnx", {}, "onnx_model")


def pipeline_fields(task_id: str) -> dict[str, Any]:
    """A build's own arguments from ``targets.py``, its data placeholders in this script's names."""
    names = {"{calibration}": "{cal}", "{eval}": "{eval}", "{train}": "{train}"}
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in builds()[task_id].kwargs.items()}

CHAINS: dict[str, tuple[tuple[str, dict[str, Any], str], ...]] = {
    "onnx_fp32": (EXPORT,),
    # the pipeline's int8 builds: onnx_quantize's measured search over static / dynamic configurations
    "onnx_int8_dynamic": (EXPORT, ("onnx_quantize", pipeline_fields("onnx_int8_dynamic"), "onnx_model")),
    "onnx_int8_static": (EXPORT, ("onnx_quantize", pipeline_fields("onnx_int8_static"), "onnx_model")),
    "tflite_fp16": (EXPORT, ("tflite_quantize", {"mode": "fp16"}, "tflite_model")),
    "tflite_int8": (EXPORT, ("tflite_quantize", {"mode": "int8", "calibration_data_uri": "{cal}"}, "tflite_model")),
    # the pipeline's own prune build (50% channels, its fine-tune schedule), on the zoo model's splits
    "pruned_onnx_int8": (("prune", dict(builds()["prune"].kwargs), "model_pt2"),
                         EXPORT, ("onnx_quantize", pipeline_fields("pruned_onnx_int8"), "onnx_model")),
    "torch_int8": (("torch_quantize", {"mode": "static", "calibration_data_uri": "{cal}", "export_onnx": False},
                    "model_pt2"),),
    "openvino_fp32": (EXPORT, ("openvino_convert", {"precision": "fp32", "throughput_seconds": 0}, "openvino_model")),
    "openvino_int8": (EXPORT, ("openvino_convert", {"precision": "int8", "calibration_data_uri": "{cal}",
                                                   "throughput_seconds": 0}, "openvino_model")),
    "mnn_fp32": (EXPORT, ("mnn_convert", {"precision": "fp32"}, "mnn_model")),
    "mnn_int8": (EXPORT, ("mnn_convert", {"precision": "int8", "calibration_data_uri": "{cal}"}, "mnn_model")),
}
FORMATS = {"onnx_model": "onnx", "tflite_model": "tflite", "model_pt2": "pt2", "openvino_model": "openvino",
           "mnn_model": "mnn"}
MIN_TOP1, MIN_COSINE = 0.90, 0.99


# -- building ---------------------------------------------------------------------------------


def prepare_model(entry: ZooModel, work: Path) -> dict[str, Any]:
    """Train the entry, save its .pt2 and data splits; returns paths and the torch outputs on eval."""
    import torch

    folder = work / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    data = entry.splits()
    model = entry.build()
    started = time.monotonic()
    entry.train(model, data["train"])
    train_s = time.monotonic() - started
    metrics = entry.evaluate(model, data["eval"])
    pt2 = entry.export(model, data["eval"], folder / "model.pt2")
    paths = {"pt2": str(pt2)}
    for split, key in (("train", "train"), ("calibration", "cal"), ("eval", "eval")):
        arrays = entry.inputs(data[split])
        if "y" in data[split]:
            arrays["y"] = data[split]["y"]
        np.savez(folder / f"{split}.npz", **arrays)
        paths[key] = str(folder / f"{split}.npz")
    with torch.no_grad():
        reference = entry.predict(model, data["eval"])
    return {"paths": paths, "reference": reference, "eval": data["eval"], "train_s": train_s, "metrics": metrics}


def short_error(exc: BaseException) -> str:
    """The step's error as one short line (type, then the first sentence or two of its message)."""
    text = " ".join(str(exc).split())
    if len(text) > 220:
        text = text[:217] + "..."
    return f"{type(exc).__name__}: {text}"


def build(target: str, entry: ZooModel, paths: dict[str, str], cache: dict[tuple, str], log: Any) -> tuple[str, str]:
    """Run the target's chain (reusing links already built for this model); returns (uri, format)."""
    from airflow_modelopt.container.runner import run_step

    source, artifact = paths["pt2"], "model_pt2"
    chain_key: tuple = ()
    for step, fields, out in CHAINS[target]:
        spec = {k: (v.format(**paths) if isinstance(v, str) else v) for k, v in fields.items()}
        spec["model_uri"] = source
        if step == "tflite_quantize":  # as targets.py wires it: the PyTorch model first, the ONNX export as fallback
            spec["model_uri"], spec["fallback_model_uri"] = paths["pt2"], source
        if step == "torch_to_onnx":
            spec.update({"data_uri": paths["eval"], "output_names": list(entry.output_names)})
            if entry.dynamic_axes:
                spec["dynamic_axes"] = {k: {str(a): n for a, n in v.items()} for k, v in entry.dynamic_axes.items()}
        spec["context"] = {"experiment_name": f"coverage-{entry.name}", "task_id": f"{target}.{step}"}
        chain_key = (*chain_key, step, json.dumps(fields, sort_keys=True))
        if chain_key in cache:
            source = cache[chain_key]
        else:
            started = time.monotonic()
            result = run_step(step, spec)
            log(f"    {step}: {time.monotonic() - started:.1f} s")
            source = result.artifacts[out]
            cache[chain_key] = source
        artifact = out
    return source, FORMATS[artifact]


# -- measuring --------------------------------------------------------------------------------


def worst_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    from airflow_modelopt.container.measure import cosine

    return min(cosine(np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()) for r, g in zip(ref, got))


def first_output_agreement(entry: ZooModel, ref: np.ndarray, got: np.ndarray, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 agreement of the first output with the torch model's (per pixel for the segmenter) and
    the accuracy drop against the labels."""
    got = np.asarray(got).reshape(ref.shape)
    pred_ref, pred = ref.argmax(1), got.argmax(1)
    labels = data["y_mask"] if entry.data == "segment" else data["y"]
    return {"top1_agreement": float((pred_ref == pred).mean()),
            "accuracy_drop": float((pred_ref == labels).mean() - (pred == labels).mean())}


def measure(entry: ZooModel, prepared: dict[str, Any], models: dict[str, tuple[Path, str]], runs: int) -> dict[str, dict]:
    from airflow_modelopt.container.measure import latency_stats, time_models
    from airflow_modelopt.container.runtimes import load

    def open_model(name: str) -> Any:
        path, fmt = models[name]
        return load(path, fmt, threads=1, field=name)

    feeds = entry.inputs(prepared["eval"])
    rows: dict[str, dict] = {}
    for name in models:
        try:
            with open_model(name) as runtime:
                outs = runtime.run(dict(feeds), batch_size=64)
                size = float(runtime.model_bytes())
        except Exception as exc:  # noqa: BLE001 - a candidate the runtime cannot run is a finding
            rows[name] = {"error": "runs: " + short_error(exc)}
            continue
        try:
            row = first_output_agreement(entry, prepared["reference"][0], outs[0], prepared["eval"])
            row["cosine"] = worst_cosine(prepared["reference"], outs)
        except Exception as exc:  # noqa: BLE001 - e.g. outputs of another shape than PyTorch's
            rows[name] = {"error": "outputs: " + short_error(exc)}
            continue
        row["bytes"] = size
        rows[name] = row
    timeable = [n for n in models if "error" not in rows[n]]
    try:
        times = time_models(open_model, timeable, {k: v[:1] for k, v in feeds.items()}, 5, runs)
        for name in timeable:
            rows[name]["p50_ms"] = latency_stats(times[name], 1)["latency_ms_p50"]
    except Exception as exc:  # noqa: BLE001
        for name in timeable:
            rows[name]["timing_error"] = short_error(exc)
    return rows


# -- the table --------------------------------------------------------------------------------


def cell(row: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return "✗ " + row["error"].replace("|", "\\|")
    gate_ok = row["top1_agreement"] >= MIN_TOP1 or row["cosine"] >= MIN_COSINE
    parts = [("✓" if gate_ok else "⚠"), f"agree {row['top1_agreement']:.3f}", f"drop {row['accuracy_drop']:+.3f}",
             f"cos {row['cosine']:.4f}"]
    # A cell kept from an earlier run (--merge) carries that run's fp32 figures: ratios stay side by side.
    ref_bytes = row.get("ref_bytes", (base or {}).get("bytes"))
    ref_p50 = row.get("ref_p50_ms", (base or {}).get("p50_ms"))
    if ref_bytes:
        parts.append(f"size {row['bytes'] / ref_bytes:.2f}x")
    if ref_p50 and "p50_ms" in row:
        parts.append(f"p50 {row['p50_ms'] / ref_p50:.2f}x")
    return " · ".join(parts)


def render(results: dict[str, dict[str, dict]], info: dict[str, dict], targets: list[str], command: str,
           not_run: list[str]) -> str:
    lines = ["# Coverage matrix: zoo models x CPU targets", "",
             "Generated by `scripts/coverage_matrix.py` (do not edit by hand):", "", f"    {command}", "",
             "Each cell: ✓ builds and agrees with the PyTorch model (top-1 agreement >= 0.90 on the first output, "
             "or cosine >= 0.99: validate's default gates), ⚠ builds but misses them, ✗ the build failed "
             "(the step's error). `agree`: top-1 agreement with PyTorch on the eval split (per pixel for unet); "
             "`drop`: accuracy drop against the labels (PyTorch minus candidate); `cos`: worst cosine over the "
             "outputs; `size`: bytes on disk vs the ONNX fp32 export; `p50`: batch-1 p50 latency (1 thread) vs "
             "ONNX Runtime fp32 (below 1 is faster). Machine: 2 shared CPU cores, so latency ratios are noisy.", ""]
    lines += ["| model | what | train s | eval accuracy | fp32 params |", "| --- | --- | --- | --- | --- |"]
    for name, i in info.items():
        acc = ", ".join(f"{k} {v:.3f}" for k, v in i["metrics"].items())
        lines.append(f"| {name} | {ZOO[name].description} | {i['train_s']:.1f} | {acc} | {i['params']:,} |")
    lines += ["", "| model | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for name, rows in results.items():
        base = rows.get("onnx_fp32")
        lines.append(f"| {name} | " + " | ".join(cell(rows.get(t), base) for t in targets) + " |")
    if not_run:
        lines += ["", "Not run in this table: " + "; ".join(not_run) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO))
    parser.add_argument("--targets", nargs="+", choices=list(CHAINS), default=list(CHAINS))
    parser.add_argument("--timed-runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print only)")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw figures as JSON")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--budget-min", type=float, default=None,
                        help="Start no further model after this many minutes (the rest are listed as not run)")
    parser.add_argument("--merge", type=Path, default=None,
                        help="A --json file of an earlier run: its cells are kept, the targets run now replace theirs")
    parser.add_argument("--note", action="append", default=[], help="A 'not run' note for the table (repeatable)")
    args = parser.parse_args()
    command = ".venv/bin/python scripts/coverage_matrix.py " + shlex.join(sys.argv[1:])

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Built now (onnx_fp32 always: it is every row's reference); with --merge, the earlier run's
    # cells of other targets stay as they were.
    run_targets = ["onnx_fp32", *[t for t in args.targets if t != "onnx_fp32"]]
    results: dict[str, dict[str, dict]] = {}
    info: dict[str, dict] = {}
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        results, info = earlier["results"], earlier["info"]
        for row in results.values():  # pin each earlier cell to the fp32 figures of its own run
            base = row.get("onnx_fp32") or {}
            for target, c in row.items():
                if target != "onnx_fp32" and "error" not in c:
                    c.setdefault("ref_bytes", base.get("bytes"))
                    c.setdefault("ref_p50_ms", base.get("p50_ms"))
    shown = set(run_targets) | {t for row in results.values() for t in row}
    targets = [t for t in CHAINS if t in shown]
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        litert = REPO / ".venv-litert" / "bin" / "python"  # scripts/make-litert-venv.sh: litert-torch first
        if litert.exists():
            os.environ.setdefault("MODELOPT_LITERT_PYTHON", str(litert))
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                           "MODELOPT_ARTIFACT_ROOT": str(work / "art"), "MODELOPT_LOG_LEVEL": "WARNING"})
        import mlflow

        started_all = time.monotonic()
        for name in args.models:
            if args.budget_min is not None and time.monotonic() - started_all > 60 * args.budget_min:
                args.note.append(f"{name} (the {args.budget_min:g}-minute budget was spent)")
                continue
            entry = ZOO[name]
            log(f"{name}: training")
            prepared = prepare_model(entry, work)
            info[name] = {"train_s": prepared["train_s"], "metrics": prepared["metrics"],
                          "params": sum(p.numel() for p in entry.build().parameters())}
            log(f"{name}: trained in {prepared['train_s']:.1f} s, {prepared['metrics']}")
            cache: dict[tuple, str] = {}
            models: dict[str, tuple[Path, str]] = {}
            rows: dict[str, dict] = {}
            for target in run_targets:
                log(f"  {target}")
                try:
                    uri, fmt = build(target, entry, prepared["paths"], cache, log)
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(work / name / target)))
                    models[target] = (local, fmt)
                except Exception as exc:  # noqa: BLE001 - the matrix records every failure
                    rows[target] = {"error": short_error(exc)}
                    log(f"    ✗ {rows[target]['error']}")
                    if os.environ.get("COVERAGE_TRACEBACK"):
                        traceback.print_exc()
            rows.update(measure(entry, prepared, models, args.timed_runs))
            results[name] = {**results.get(name, {}), **{t: rows[t] for t in run_targets if t in rows}}
            for t in run_targets:
                log(f"  {t}: {cell(rows.get(t), rows.get('onnx_fp32'))}")
            if args.out:  # the table so far: a long run stopped midway still leaves its findings
                args.out.write_text(render(results, info, targets, command, args.note))
    order = [n for n in ZOO if n in results]
    results, info = {n: results[n] for n in order}, {n: info[n] for n in order}
    text = render(results, info, targets, command, args.note)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
