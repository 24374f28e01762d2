"""ONNX Runtime's quantization pre-processing leaves nothing in the worker's working directory.

Its symbolic shape inference saves a model it cannot finish as ``sym_shape_infer_temp.onnx`` (plus
an external-data file) in the current directory: on a worker that is wherever Airflow started the
task, and in a container on a read-only root it is not writable at all."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from airflow_modelopt.container.steps.onnx_quantize.quantize import preprocess  # noqa: E402
from airflow_modelopt.exceptions import ModelOptError  # noqa: E402


def test_incomplete_symbolic_shape_inference_writes_nothing_to_the_working_directory(tmp_path, monkeypatch):
    # An op from a domain the inference does not know leaves its output shape unknown: "incomplete".
    graph = helper.make_graph(
        [helper.make_node("Opaque", ["x"], ["h"], domain="example.custom"),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src))
    cwd = tmp_path / "worker-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    try:
        preprocess(src, tmp_path / "work" / "pre", optimize=False, log=logging.getLogger("test"))
    except ModelOptError:
        pass  # without symbolic inference it may fail too: what matters here is where files went
    assert os.listdir(cwd) == []
