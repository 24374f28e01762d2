"""TorchQuantizeSpec: static needs calibration data, every mode needs data to measure on, TorchScript
is refused, options are bounded; the operator refuses literal bad arguments at DAG parse time; the
torch_int8 pipeline target builds the quantized .pt2 from the pipeline's model."""

from __future__ import annotations

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.torch_quantize import TorchQuantizeSpec

PT2 = "runs:/abc/model/model.pt2"
CAL = "runs:/abc/data/calibration.npz"
EVAL = "runs:/abc/data/eval.npz"


def parse(**fields):
    return parse_spec("torch_quantize", {"model_uri": PT2, **fields})


def test_defaults_are_static_int8_with_onnx_export_in_the_torch_image():
    spec = parse(calibration_data_uri=CAL)
    assert (spec.mode, spec.export_onnx, spec.reduce_range, spec.opset) == ("static", True, False, 18)
    assert TorchQuantizeSpec.image_family == "torch"
    assert TorchQuantizeSpec.input_fields == ("model_uri", "calibration_data_uri", "eval_data_uri")


def test_static_without_calibration_data_is_refused_naming_the_field():
    with pytest.raises(SpecError, match=r"calibration_data_uri: required for mode='static'"):
        parse(eval_data_uri=EVAL)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_other_modes_need_some_data_to_measure_on(mode):
    with pytest.raises(SpecError, match=rf"eval_data_uri: mode='{mode}' needs eval_data_uri or calibration_data_uri"):
        parse(mode=mode)
    assert parse(mode=mode, eval_data_uri=EVAL).calibration_data_uri is None


@pytest.mark.parametrize("uri", ["runs:/abc/model/model.pt", "/models/net.torchscript", "file:///m/x.pth"])
def test_torchscript_is_refused_before_anything_starts(uri):
    with pytest.raises(SpecError, match=r"model_uri: .* looks like TorchScript"):
        parse(model_uri=uri, calibration_data_uri=CAL)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "int4", r"mode: Input should be 'static', 'dynamic' or 'weight_only'"),
    ("calibration_samples", 0, r"calibration_samples: Input should be greater than or equal to 1"),
    ("opset", 12, r"opset: Input should be greater than or equal to 17"),
    ("max_accuracy_drop", 1.5, r"max_accuracy_drop: Input should be less than or equal to 1"),
    ("per_channel", False, r"per_channel: unknown field"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(SpecError, match=message):
        parse(calibration_data_uri=CAL, **{field: value})


def test_operator_refuses_literal_bad_arguments_at_parse_time():
    from airflow_modelopt.operators import TorchQuantizeOperator

    with pytest.raises(ValueError, match=r"(?s)TorchQuantizeOperator 'q': .*calibration_data_uri: required"):
        TorchQuantizeOperator(task_id="q", model_uri=PT2)
    templated = TorchQuantizeOperator(task_id="q", model_uri="{{ params.model }}", calibration_data_uri="{{ x }}")
    assert {"model_uri", "calibration_data_uri", "mode"} <= set(templated.template_fields)


def test_torch_int8_target_is_the_quantized_pt2_of_the_pipeline_model():
    from airflow_modelopt.targets import TARGET_CHAINS, TARGETS, builds

    assert "torch_int8" in TARGETS
    chain, artifact, fmt = TARGET_CHAINS["torch_int8"]
    assert (chain, artifact, fmt) == (("torch_int8",), "model_pt2", "pt2")
    build = builds()["torch_int8"]
    assert build.operator == "TorchQuantizeOperator" and build.source is None
    parse(**{k: v.replace("{calibration}", CAL).replace("{eval}", EVAL) if isinstance(v, str) else v
             for k, v in build.kwargs.items()})
