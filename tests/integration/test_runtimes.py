"""Every runtime on the example digits CNN in each format, against the trained ExportedProgram:
fp32 formats agree to float rounding, int8 ones on the top-1 class; the fresh-process memory probe."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from airflow_modelopt.container.runtimes import load

pytest_plugins = ("tests.integration._models",)  # fixtures: candidates, step_env (one build per session)

FP32 = ["torchscript", "onnx_fp32", "tflite_fp32", "keras", "savedmodel"]
INT8 = ["onnx_int8", "tflite_int8"]
FORMAT = {"torchscript": "torchscript", "onnx_fp32": "onnx", "tflite_fp32": "tflite", "keras": "keras",
          "savedmodel": "savedmodel", "onnx_int8": "onnx", "tflite_int8": "tflite"}


@pytest.fixture(scope="module")
def eval_data(candidates):
    with np.load(candidates.eval_npz) as npz:
        return npz["x"], npz["y"]


@pytest.fixture(scope="module")
def reference(candidates, eval_data):
    with load(candidates.pt2) as rt:
        assert rt.format == "pt2" and rt.inputs[0].shape[1:] == [1, 8, 8] and rt.fixed_batch is None
        return rt.run({"x": eval_data[0]})[0]


@pytest.mark.parametrize("name", FP32 + INT8)
def test_each_format_loads_and_computes_the_example_model(candidates, eval_data, reference, name):
    x, y = eval_data
    with load(candidates.path(name), threads=1) as rt:
        assert rt.format == FORMAT[name]
        assert rt.feed_names == ["x"]
        (out,) = rt.run({"x": x}, batch_size=64)
        assert rt.model_bytes() > 10_000
    assert out.shape == reference.shape == (len(x), 10) and out.dtype == np.float32
    if name in FP32:
        assert np.abs(out - reference).max() < 1e-4
    else:
        assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.95
        assert 0.01 < np.abs(out - reference).max() < 3.0  # quantized, but dequantized to the same scale
    assert (out.argmax(1) == y).mean() >= 0.9


def test_tflite_int8_io_and_layout_come_from_the_recorded_signature(candidates):
    with load(candidates.tflite_int8) as rt:
        (spec,) = rt.inputs
        assert (spec.dtype, spec.layout, spec.source_name, spec.shape) == ("int8", "NHWC", "x", [None, 8, 8, 1])
        assert spec.quantization is not None and spec.quantization.scale > 0
        assert rt.source_layout == "NCHW" and rt.outputs[0].dtype == "int8"
        native = rt.prepare({"x": np.zeros((3, 1, 8, 8), np.float32)})
        assert native[spec.name].shape == (3, 8, 8, 1) and native[spec.name].dtype == np.int8


def test_mlflow_pytorch_model_folder_loads(candidates, example_model, mlflow_server, tmp_path, eval_data, reference):
    from tests.integration._models import download

    folder = download(example_model["artifacts"]["pytorch_model"], mlflow_server.uri, tmp_path / "pytorch_model")
    with load(folder) as rt:
        assert rt.format == "pt2" and rt.path.suffix == ".pt2"
        (out,) = rt.run({"x": eval_data[0][:16]})
    assert np.abs(out - reference[:16]).max() < 1e-5


def test_probe_reports_the_peak_rss_of_a_fresh_process(candidates, tmp_path, eval_data):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=eval_data[0][:8])
    request = {"path": str(candidates.tflite_int8), "threads": 1, "batch_sizes": [1, 8], "runs": 2, "feeds": str(feeds)}
    proc = subprocess.run([sys.executable, "-m", "airflow_modelopt.container.runtimes.probe", json.dumps(request)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime"].startswith(("ai-edge-litert", "tf.lite"))
    assert 10e6 < result["baseline_rss_bytes"] < result["peak_rss_bytes"] < 1e9
    assert result["frameworks"] == ["ai_edge_litert"]  # no TensorFlow or torch inflating the number
