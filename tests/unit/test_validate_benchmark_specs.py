"""Specs and operators of the validate and benchmark steps: bad values are refused naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import BenchmarkSpec, ValidateEquivalenceSpec, parse_spec
from tests.conftest import REPO

VALIDATE = {"reference_uri": "runs:/abc/model.pt2", "candidate_uri": "runs:/def/model.tflite", "data_uri": "runs:/abc/eval.npz"}
BENCH = {"model_uri": "models:/m-123"}


def test_validate_defaults_gate_accuracy_drop_at_the_guides_figure():
    spec = parse_spec("validate", VALIDATE)
    assert isinstance(spec, ValidateEquivalenceSpec)
    assert spec.max_accuracy_drop == 0.02
    assert spec.atol is None and spec.min_cosine is None and spec.min_top1_agreement is None
    assert spec.image_families() == {"torch", "tensorflow"}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("min_cosine", 1.5, "less than or equal to 1"),
        ("min_top1_agreement", -0.1, "greater than or equal to 0"),
        ("max_accuracy_drop", 2, "less than or equal to 1"),
        ("atol", -1e-3, "greater than or equal to 0"),
        ("candidate_format", "caffe", "'pt2', 'torchscript'"),
        ("threads", 0, "greater than or equal to 1"),
        ("batch_size", 0, "greater than or equal to 1"),
        ("reference_uri", "s3://bucket/model.onnx", "unknown URI scheme 's3'"),
    ],
)
def test_validate_refuses_bad_values_naming_the_field(field, value, expected):
    with pytest.raises(SpecError) as err:
        parse_spec("validate", {**VALIDATE, field: value})
    assert f"{field}:" in str(err.value) and expected in str(err.value)


def test_validate_rtol_without_atol_is_refused():
    with pytest.raises(SpecError, match="rtol is set but atol is not"):
        parse_spec("validate", {**VALIDATE, "rtol": 1e-3})


def test_validate_needs_all_three_uris():
    with pytest.raises(SpecError) as err:
        parse_spec("validate", {"reference_uri": "a.onnx"})
    assert "candidate_uri: Field required" in str(err.value) and "data_uri: Field required" in str(err.value)


def test_zero_timed_runs_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        parse_spec("benchmark", {**BENCH, "timed_runs": 0})
    assert "timed_runs: Input should be greater than or equal to 1 (got 0)" in str(err.value)


def test_benchmark_batch_sizes_are_sorted_and_must_not_repeat():
    assert parse_spec("benchmark", {**BENCH, "batch_sizes": [8, 1, 32]}).batch_sizes == [1, 8, 32]
    with pytest.raises(SpecError, match="batch_sizes must not repeat"):
        parse_spec("benchmark", {**BENCH, "batch_sizes": [1, 1]})
    with pytest.raises(SpecError, match="batch_sizes"):
        parse_spec("benchmark", {**BENCH, "batch_sizes": []})


def test_benchmark_defaults_carry_the_guides_targets():
    spec = parse_spec("benchmark", BENCH)
    assert isinstance(spec, BenchmarkSpec)
    assert (spec.max_latency_ms, spec.min_throughput, spec.max_peak_memory_mb) == (100, 30, 500)
    assert spec.enforce_targets is False and spec.measure_memory is True
    assert parse_spec("benchmark", {"model_uri": "x/model.engine"}).image_families() == {"tensorrt"}


def test_operators_refuse_literal_bad_values_at_parse_time():
    from airflow_modelopt.operators import BenchmarkOperator, ValidateEquivalenceOperator

    with pytest.raises(ValueError, match="timed_runs"):
        BenchmarkOperator(task_id="bench", model_uri="runs:/x/m.onnx", timed_runs=0)
    with pytest.raises(ValueError, match="min_cosine"):
        ValidateEquivalenceOperator(task_id="val", **VALIDATE, min_cosine=3)
    op = ValidateEquivalenceOperator(task_id="val2", **VALIDATE, min_top1_agreement=0.99)
    assert "max_accuracy_drop" in op.template_fields and "candidate_uri" in op.template_fields
    assert ":param max_accuracy_drop:" in (ValidateEquivalenceOperator.__doc__ or "")


def test_operator_module_imports_no_ml_framework():
    code = ("import sys, airflow_modelopt.operators.validate; "
            "print([m for m in ('torch', 'tensorflow', 'onnxruntime', 'onnx', 'matplotlib', 'airflow_modelopt.container.runtimes') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
