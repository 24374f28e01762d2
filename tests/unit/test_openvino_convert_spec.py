"""OpenVINOConvertSpec: int8 needs calibration data, int8-only fields are refused elsewhere, the
accuracy-aware mode needs eval data; errors name the field. The operator builds without OpenVINO."""

from __future__ import annotations

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.formats import FORMAT_IMAGE_FAMILY, SUFFIX_FORMATS, pick_family
from airflow_modelopt.specs.openvino_convert import OpenVINOConvertSpec

BASE = {"model_uri": "runs:/abc/onnx_model"}
CAL = {"calibration_data_uri": "runs:/abc/data/calibration.npz"}
EVAL = {"eval_data_uri": "runs:/abc/data/eval.npz"}


def parse(**fields):
    return parse_spec("openvino_convert", {**BASE, **fields})


def test_defaults_and_registration():
    spec = parse()
    assert (spec.precision, spec.threads, spec.throughput_seconds, spec.preset) == ("fp32", 1, 2.0, "performance")
    assert OpenVINOConvertSpec.image_family == "openvino"
    assert OpenVINOConvertSpec.input_fields == ("model_uri", "calibration_data_uri", "eval_data_uri")


def test_formats_know_openvino_and_mnn():
    assert SUFFIX_FORMATS[".xml"] == "openvino" and SUFFIX_FORMATS[".mnn"] == "mnn"
    assert FORMAT_IMAGE_FAMILY["openvino"] == FORMAT_IMAGE_FAMILY["mnn"] == "openvino"
    # an IR candidate validated against a .pt2 reference runs where both load
    assert pick_family({"openvino", "torch"}, "base") == "openvino"


def test_int8_requires_calibration_data():
    with pytest.raises(SpecError, match=r"calibration_data_uri is required for precision 'int8'"):
        parse(precision="int8")
    assert parse(precision="int8", **CAL).calibration_data_uri == CAL["calibration_data_uri"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_int8_only_fields_are_refused_for_float_precisions(precision):
    with pytest.raises(SpecError, match=r"calibration_data_uri: only used for precision 'int8'"):
        parse(precision=precision, **CAL)
    with pytest.raises(SpecError, match=r"max_accuracy_drop: only used for precision 'int8'"):
        parse(precision=precision, max_accuracy_drop=0.01, **EVAL)


def test_accuracy_control_needs_eval_data():
    with pytest.raises(SpecError, match=r"max_accuracy_drop needs eval_data_uri"):
        parse(precision="int8", max_accuracy_drop=0.01, **CAL)
    assert parse(precision="int8", max_accuracy_drop=0.01, **CAL, **EVAL).max_accuracy_drop == 0.01


@pytest.mark.parametrize(("field", "value"), [("precision", "int4"), ("max_accuracy_drop", 0), ("threads", 0),
                                              ("throughput_seconds", -1), ("preset", "fast")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SpecError, match=field):
        parse(**{field: value})


def test_operator_validates_at_construction():
    from airflow_modelopt.operators import OpenVINOConvertOperator

    op = OpenVINOConvertOperator(task_id="ov", model_uri="runs:/abc/onnx_model", precision="fp16")
    assert op.precision == "fp16"
    with pytest.raises(Exception, match=r"calibration_data_uri is required"):
        OpenVINOConvertOperator(task_id="ov8", model_uri="runs:/abc/onnx_model", precision="int8")
