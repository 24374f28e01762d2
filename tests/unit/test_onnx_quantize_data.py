"""onnx_quantize reads data as validate and benchmark do (issue 10, finding 7): integer arrays for a
float input are refused, not silently converted; float64 still feeds a float32 input."""

from __future__ import annotations

import numpy as np
import pytest

from airflow_modelopt.container.steps.onnx_quantize.calibration import _check_array
from airflow_modelopt.container.steps.onnx_quantize.model import TensorInfo
from airflow_modelopt.exceptions import InputError

FLOAT_INPUT = TensorInfo(name="x", shape=["N", 4], dtype="float32")


def test_integer_data_for_a_float_input_is_refused_naming_the_field():
    with pytest.raises(InputError, match=r"calibration_data_uri: .* has dtype int64, but the model's input is float32"):
        _check_array(np.ones((3, 4), np.int64), FLOAT_INPUT, "calibration_data_uri")


def test_float64_data_feeds_a_float32_input():
    out = _check_array(np.ones((3, 4), np.float64), FLOAT_INPUT, "calibration_data_uri")
    assert out.dtype == np.float32 and out.shape == (3, 4)


def test_integer_data_feeds_an_integer_input():
    out = _check_array(np.ones((2, 4), np.int32), TensorInfo(name="ids", shape=["N", 4], dtype="int64"), "c")
    assert out.dtype == np.int64
