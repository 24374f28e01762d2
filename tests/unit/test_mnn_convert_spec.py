"""MNNConvertSpec: full int8 needs calibration data, calibration data is refused for the other
precisions, bad values name the field; the operator builds without MNN."""

from __future__ import annotations

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.mnn_convert import MNNConvertSpec

BASE = {"model_uri": "runs:/abc/onnx_model"}
CAL = {"calibration_data_uri": "runs:/abc/data/calibration.npz"}


def parse(**fields):
    return parse_spec("mnn_convert", {**BASE, **fields})


def test_defaults_and_registration():
    spec = parse()
    assert (spec.precision, spec.calibration_samples, spec.feature_quantize_method) == ("fp32", 200, "ADMM")
    assert MNNConvertSpec.image_family == "openvino"
    assert MNNConvertSpec.input_fields == ("model_uri", "calibration_data_uri", "eval_data_uri")


def test_int8_requires_calibration_data_but_int8_weights_does_not():
    with pytest.raises(SpecError, match=r"calibration_data_uri is required for precision 'int8'"):
        parse(precision="int8")
    assert parse(precision="int8_weights").calibration_data_uri is None
    assert parse(precision="int8", **CAL).calibration_data_uri == CAL["calibration_data_uri"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8_weights"])
def test_calibration_data_is_refused_where_unused(precision):
    with pytest.raises(SpecError, match=r"calibration_data_uri is only read for precision 'int8'"):
        parse(precision=precision, **CAL)


@pytest.mark.parametrize(("field", "value"), [("precision", "int4"), ("feature_quantize_method", "MINMAX"),
                                              ("weight_quantize_method", "KL"), ("calibration_samples", 0),
                                              ("threads", 0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SpecError, match=field):
        parse(**{field: value})


def test_operator_validates_at_construction():
    from airflow_modelopt.operators import MNNConvertOperator

    assert MNNConvertOperator(task_id="m", model_uri="runs:/abc/onnx_model", precision="fp16").precision == "fp16"
    with pytest.raises(Exception, match=r"calibration_data_uri is required"):
        MNNConvertOperator(task_id="m8", model_uri="runs:/abc/onnx_model", precision="int8")
