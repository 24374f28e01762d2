"""Operators: literal arguments checked at DAG parse time, templated ones after rendering;
the execution mode comes from the argument or from [modelopt] configuration."""

from __future__ import annotations

import pytest

from airflow_modelopt import config
from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.operators import TorchToOnnxOperator, TrainExampleModelOperator, artifact


def test_bad_literal_argument_fails_at_construction():
    with pytest.raises(ValueError, match=r"(?s)TorchToOnnxOperator 'export'.*opset: Input should be less than or equal"):
        TorchToOnnxOperator(task_id="export", model_uri="/m.pt2", data_uri="/d.npz", opset=99)


def test_unknown_uri_scheme_fails_at_construction():
    with pytest.raises(ValueError, match="unknown URI scheme 'gopher'"):
        TorchToOnnxOperator(task_id="export", model_uri="gopher://x/m.pt2", data_uri="/d.npz")


def test_unknown_argument_is_refused():
    with pytest.raises(Exception, match="opsett"):
        TorchToOnnxOperator(task_id="export", model_uri="/m.pt2", data_uri="/d.npz", opsett=18)


def test_templated_fields_wait_for_rendering_but_literals_are_checked():
    op = TorchToOnnxOperator(task_id="export", model_uri=artifact("train", "model_pt2"), data_uri="/d.npz")
    assert "model_uri" in op.template_fields and "opset" in op.template_fields
    with pytest.raises(ValueError, match="opset"):
        TorchToOnnxOperator(task_id="export2", model_uri=artifact("train", "model_pt2"), data_uri="/d.npz", opset=3)


def test_missing_required_argument_is_named():
    with pytest.raises(ValueError, match="model_uri"):
        TorchToOnnxOperator(task_id="export", data_uri="{{ params.data }}")


def test_rendered_values_are_validated_and_coerced():
    op = TorchToOnnxOperator(task_id="export", model_uri="{{ x }}", data_uri="/d.npz", check_batch_sizes="{{ y }}")
    op.model_uri = "runs:/abc/model/model.pt2"  # as Jinja would leave them
    op.check_batch_sizes = "[1, 5]"
    spec = op.build_spec(None)
    assert spec.check_batch_sizes == [1, 5]
    op.model_uri = "nfs://share/model.pt2"
    with pytest.raises(SpecError, match="model_uri: unknown URI scheme 'nfs'"):
        op.build_spec(None)


def test_unknown_execution_mode_argument_fails_at_construction():
    with pytest.raises(ValueError, match="execution_mode argument is 'lambda'; expected one of local, docker, kubernetes"):
        TrainExampleModelOperator(task_id="train", execution_mode="lambda")


def test_execution_mode_from_argument_wins_over_config(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MODELOPT__EXECUTION_MODE", "kubernetes")
    assert config.resolve_execution_mode("docker") == "docker"
    assert config.resolve_execution_mode(None) == "kubernetes"
    assert config.resolve_execution_mode("") == "kubernetes"
    assert config.resolve_execution_mode("None") == "kubernetes"  # a null param, rendered


def test_execution_mode_defaults_to_local(monkeypatch):
    monkeypatch.delenv("AIRFLOW__MODELOPT__EXECUTION_MODE", raising=False)
    assert config.resolve_execution_mode(None) == "local"


def test_bad_configured_mode_names_the_option(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MODELOPT__EXECUTION_MODE", "ssh")
    with pytest.raises(SpecError, match=r"\[modelopt\] execution_mode is 'ssh'"):
        config.resolve_execution_mode(None)


def test_image_names_from_config(monkeypatch):
    for var in ("IMAGE_REGISTRY", "IMAGE_TAG", "IMAGE_OVERRIDES"):
        monkeypatch.delenv(f"AIRFLOW__MODELOPT__{var}", raising=False)
    from airflow_modelopt import __version__

    assert config.image_for("torch_to_onnx") == f"airflow-modelopt-torch:{__version__}"
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_REGISTRY", "registry.example.com/ml/")
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_TAG", "2026.11")
    assert config.image_for("torch_to_onnx") == "registry.example.com/ml/airflow-modelopt-torch:2026.11"
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_OVERRIDES", '{"torch_to_onnx": "mine/torch:7"}')
    assert config.image_for("torch_to_onnx") == "mine/torch:7"
    assert config.image_for("train_example") == "registry.example.com/ml/airflow-modelopt-torch:2026.11"
    assert config.image_for("torch_to_onnx", "explicit:1") == "explicit:1"


def test_bad_image_overrides_json_is_named(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MODELOPT__IMAGE_OVERRIDES", "{torch_to_onnx: x}")
    with pytest.raises(SpecError, match="image_overrides is not valid JSON"):
        config.image_for("torch_to_onnx")


def test_docstring_lists_spec_fields():
    assert ":param opset:" in TorchToOnnxOperator.__doc__
    assert ":param execution_mode:" in TorchToOnnxOperator.__doc__


def test_provider_is_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_modelopt")]
    assert eps, "airflow_modelopt is not registered under the apache_airflow_provider entry point"
    info = eps[0].load()()
    assert info["package-name"] == "airflow-modelopt"
    assert "modelopt" in info["config"]


def test_validate_and_benchmark_images_follow_the_model_formats(monkeypatch):
    for var in ("IMAGE_REGISTRY", "IMAGE_TAG", "IMAGE_OVERRIDES"):
        monkeypatch.delenv(f"AIRFLOW__MODELOPT__{var}", raising=False)
    from airflow_modelopt.specs import parse_spec

    def family(step, **fields):
        return parse_spec(step, fields).resolved_image_family()

    data = "runs:/r/data/eval.npz"
    assert family("validate", reference_uri="runs:/r/model.pt2", candidate_uri="models:/m-1",
                  candidate_format="onnx", data_uri=data) == "torch"
    assert family("validate", reference_uri="runs:/r/model.pt2", candidate_uri="runs:/r/tflite_model",
                  candidate_format="tflite", data_uri=data) == "tensorflow"
    assert family("validate", reference_uri="a.onnx", candidate_uri="b.onnx", data_uri=data) == "base"
    assert family("benchmark", model_uri="models:/m-1", model_format="onnx") == "base"
    assert family("benchmark", model_uri="runs:/r/engine", model_format="tensorrt") == "tensorrt"
    assert config.image_for("validate", None, "tensorflow").startswith("airflow-modelopt-tensorflow:")
