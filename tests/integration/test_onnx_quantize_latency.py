"""Issue 12 item 1: the latency the ONNX quantization search reports for its chosen model is the
figure the benchmark step gives for that model file, with the same threads and batch.

A small residual CNN (``scripts/_bench_common.residual_cnn``: 3x3 stem and three BasicBlocks, 3x32x32
inputs, BatchNorm statistics from the data) at batch 32 takes about 3 ms in fp32 and 2 ms in int8 on
2 threads: long enough to time. ``onnx_quantize`` mode search tries its default configurations (six
models to time, fp32 included), then ``benchmark`` times the chosen model, as the search logged it,
in a fresh process. Before the fix the search kept every configuration's ONNX Runtime session alive
and timed them in turns of ten runs: the session timed just before kept spinning its intra-op worker
(about 25 ms of CPU), the timed session's worker woke on its caller's core, and with both threads on
one core its runs took 3.5x as long until the scheduler separated them. This test then failed with
search figures of 3.6 and 6.6 ms against benchmark p50s of 2.3 ms.

Noise on a shared 2-core machine: both figures are medians of 40 timed runs after warm-up until
stable; when the first pair disagrees, two more searches run, each followed by a benchmark of its
chosen file, and the medians of the three are compared (a real disagreement persists, a burst of
load on either side does not: once in CI the search timed its pick at 1.00 ms against three
benchmark p50s of 1.31 ms, where standalone runs give 1.35 against 1.32-1.36).
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, run_step

THREADS = 2
BATCH = 32
TOLERANCE = 0.15
EXPERIMENT = "tests-onnx-quantize-latency"


def _bench_common() -> Any:
    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "scripts" / "_bench_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def residual(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The residual CNN as an ONNX folder (model.onnx + external data), calibration and eval .npz."""
    import torch
    from sklearn.datasets import load_digits

    common = _bench_common()
    root = tmp_path_factory.mktemp("residual-cnn")
    images = load_digits().images.astype(np.float32)[:, None] / 16.0
    x = common.to_rgb(images[:192], 32, tint_seed=1)
    torch.manual_seed(0)
    model = common.residual_cnn()
    common.reestimate_batchnorm(model, x[:128])
    folder = root / "onnx"
    folder.mkdir()
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(folder / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=True, external_data=True)
    return {"model": folder, "calibration": common.save_npz(root / "calibration.npz", x[:128]),
            "eval": common.save_npz(root / "eval.npz", x[128:])}


def _benchmark_p50(model_uri: str, data: Path, env: dict[str, str]) -> float:
    run = run_step("benchmark", {"model_uri": model_uri, "data_uri": str(data), "batch_sizes": [BATCH],
                                 "threads": THREADS, "warmup_runs": 5, "timed_runs": 40, "measure_memory": False,
                                 "context": {"experiment_name": EXPERIMENT, "force": True}}, env)
    assert run.returncode == 0, run.output[-3000:]
    return run.result["metrics"]["latency_ms_p50"]


def _search(residual: dict[str, Path], env: dict[str, str]) -> dict[str, Any]:
    run = run_step("onnx_quantize", {
        "model_uri": str(residual["model"]), "calibration_data_uri": str(residual["calibration"]),
        "eval_data_uri": str(residual["eval"]), "mode": "search", "min_top1_agreement": 0.5,
        "intra_op_threads": THREADS, "latency_batch_size": BATCH, "warmup_runs": 5, "timed_runs": 40,
        "context": {"experiment_name": EXPERIMENT, "force": True}}, env)
    assert run.returncode == 0, run.output[-3000:]
    return run.result


def test_search_latency_of_the_chosen_model_agrees_with_the_benchmark_step(residual, mlflow_server):
    env = mlflow_server.env()
    searches = [_search(residual, env)]
    metrics, info = searches[0]["metrics"], searches[0]["info"]
    chosen = info["chosen_config"]
    assert info["latency_settings"] == {"intra_op_threads": THREADS, "batch_size": BATCH, "warmup_runs": 5,
                                        "timed_runs": 40, "statistic": "median"}
    assert metrics["int8_latency_ms"] == metrics[f"search.{chosen}.latency_ms"]

    def searched(result: dict[str, Any]) -> float:
        return result["metrics"]["int8_latency_ms"]

    p50s = [_benchmark_p50(searches[0]["artifacts"]["onnx_model"], residual["calibration"], env)]
    if abs(searched(searches[0]) - p50s[0]) > TOLERANCE * p50s[0]:
        # Two more pairs, each search's chosen file benchmarked: either side can catch a burst of load.
        for _ in range(2):
            searches.append(_search(residual, env))
            p50s.append(_benchmark_p50(searches[-1]["artifacts"]["onnx_model"], residual["calibration"], env))
    search_ms, benchmarked = statistics.median(map(searched, searches)), statistics.median(p50s)
    figures = (f"search: {[(r['info']['chosen_config'], round(searched(r), 3)) for r in searches]} ms "
               f"(fp32 {[round(r['metrics']['fp32_latency_ms'], 3) for r in searches]} ms); benchmark p50 "
               f"{[round(p, 3) for p in p50s]} ms, {THREADS} threads, batch {BATCH}")
    print(figures)  # shown with -rP: the figures behind a pass
    assert abs(search_ms - benchmarked) <= TOLERANCE * benchmarked, figures
