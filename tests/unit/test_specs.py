"""Spec validation: bad input is refused with an error naming the field and what was expected."""

from __future__ import annotations

import json

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import MAX_OPSET, StepResult, TorchToOnnxSpec, parse_spec, spec_class_for


def test_valid_spec_fills_defaults():
    spec = parse_spec("torch_to_onnx", {"model_uri": "runs:/abc/model/model.pt2", "data_uri": "/data/eval.npz"})
    assert isinstance(spec, TorchToOnnxSpec)
    assert spec.opset >= 17
    assert spec.dynamic_batch is True
    assert spec.check_batch_sizes == [1, 7]
    assert spec.export_batch_size not in spec.check_batch_sizes


@pytest.mark.parametrize(
    ("patch", "field", "expected"),
    [
        ({"opset": 9}, "opset", "greater than or equal to 17"),
        ({"opset": MAX_OPSET + 1}, "opset", f"less than or equal to {MAX_OPSET}"),
        ({"model_uri": "ftp://host/model.pt2"}, "model_uri", "unknown URI scheme 'ftp'"),
        ({"model_uri": "s3://bucket/model.pt2"}, "model_uri", "unknown URI scheme 's3'"),
        ({"model_uri": "runs:/"}, "model_uri", "runs:/<run_id>"),
        ({"export_batch_size": 1}, "export_batch_size", "greater than or equal to 2"),
        ({"check_batch_sizes": [2, 7]}, "spec", "must differ from export_batch_size=2"),
        ({"check_batch_sizes": [7]}, "spec", "at least two different batch sizes"),
        ({"opset": "eighteen"}, "opset", "valid integer"),
        ({"colour": "blue"}, "colour", "unknown field"),
    ],
)
def test_bad_fields_are_named(patch, field, expected):
    raw = {"model_uri": "/models/m.pt2", "data_uri": "/data/eval.npz", **patch}
    with pytest.raises(SpecError) as err:
        parse_spec("torch_to_onnx", raw)
    assert f"{field}:" in str(err.value)
    assert expected in str(err.value)


def test_needs_data_or_shapes():
    with pytest.raises(SpecError, match="give data_uri .* or input_shapes"):
        parse_spec("torch_to_onnx", {"model_uri": "/m.pt2"})


def test_static_batch_checks_only_export_batch():
    spec = parse_spec("torch_to_onnx", {"model_uri": "/m.pt2", "input_shapes": {"x": [4, 3]},
                                        "dynamic_batch": False, "export_batch_size": 4})
    assert spec.check_batch_sizes == [4]


def test_unknown_step_lists_known_ones():
    with pytest.raises(SpecError, match="unknown step 'nope'; known steps: .*torch_to_onnx"):
        spec_class_for("nope")


def test_spec_version_mismatch_is_refused():
    with pytest.raises(SpecError, match="spec_version 2 is not supported"):
        parse_spec("torch_to_onnx", {"spec_version": 2, "model_uri": "/m.pt2", "data_uri": "/d.npz"})


def test_spec_for_other_step_is_refused():
    with pytest.raises(SpecError, match="spec is for step 'train_example'"):
        parse_spec("torch_to_onnx", {"step": "train_example"})


def test_invalid_json_is_a_spec_error():
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec("torch_to_onnx", "{model_uri: nope")


def test_spec_round_trips_through_json():
    spec = parse_spec("torch_to_onnx", {"model_uri": "models:/digits/3", "input_shapes": {"x": [2, 1, 8, 8]}})
    again = parse_spec("torch_to_onnx", spec.model_dump_json())
    assert again == spec


def test_result_line_is_compact_json():
    result = StepResult(step="torch_to_onnx", mlflow_run_id="r1", cache_key="k", artifacts={"onnx_model": "models:/m-1"})
    line = result.to_line()
    assert "\n" not in line
    assert json.loads(line)["artifacts"] == {"onnx_model": "models:/m-1"}


def test_unknown_field_hints_at_a_version_skew():
    with pytest.raises(SpecError, match=r"(?s)colour: unknown field.*rebuild or update the step images"):
        parse_spec("torch_to_onnx", {"model_uri": "/m.pt2", "data_uri": "/d.npz", "colour": "blue"})


@pytest.mark.parametrize("uri", ["runs:/abc/../../../../etc/passwd", "runs:/abc/%2E%2E/%2e%2e/etc/passwd",
                                 "mlflow-artifacts:/1/run/artifacts/../../other", "models:/m/../../x"])
def test_artifact_uris_that_leave_their_run_or_model_are_refused(uri):
    with pytest.raises(SpecError, match=r"has a '\.' or '\.\.' path segment; an artifact URI must name a path inside"):
        parse_spec("benchmark", {"model_uri": uri})


@pytest.mark.parametrize("name", ["..", ".", "team/../../tmp", "a/./b"])
def test_experiment_names_that_would_escape_the_artifact_root_are_refused(name):
    with pytest.raises(SpecError, match=r"context\.experiment_name: .* has a '\.' or '\.\.' path segment"):
        parse_spec("benchmark", {"model_uri": "m.onnx", "context": {"experiment_name": name}})
    from airflow_modelopt.operators import BenchmarkOperator

    with pytest.raises(ValueError, match=r"experiment_name: .* path segment"):
        BenchmarkOperator(task_id="b", model_uri="m.onnx", experiment_name=name)
