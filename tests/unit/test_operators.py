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


# --- transient failures and the launch request -------------------------------------------------------

class _FakeHook:
    def tracking_config(self):
        from airflow_modelopt.hooks.mlflow import TrackingConfig

        return TrackingConfig("http://mlflow:5000", {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})


def _execute_with_step_exit(monkeypatch, operator, exit_code, try_number=1):
    """Run ``execute`` with a launcher whose step exits ``exit_code``; return what it raised and
    the request the launcher got."""
    from types import SimpleNamespace

    from airflow_modelopt.operators import launchers

    got = {}

    class ExitingLauncher(launchers.Launcher):
        def launch(self, context):
            got["request"] = self.request
            raise launchers.failure(self.request.spec.step, "a test", exit_code, ["boom"])

    monkeypatch.setitem(launchers.LAUNCHERS, "local", ExitingLauncher)
    operator.__dict__["mlflow_hook"] = _FakeHook()
    with pytest.raises(Exception) as raised:
        operator.execute({"ti": SimpleNamespace(try_number=try_number, dag_id="d", run_id="r")})
    return raised.value, got["request"]


def _export(**kwargs):
    return TorchToOnnxOperator(task_id="export", model_uri="/m.pt2", input_shapes={"x": [1, 4]},
                               execution_mode="local", **kwargs)


def test_without_retries_of_its_own_a_task_retries_only_an_unreachable_mlflow(monkeypatch):
    monkeypatch.delenv("AIRFLOW__MODELOPT__TRANSIENT_FAILURE_RETRIES", raising=False)
    op = _export()
    assert (op.retries, op.own_retries, op.retry_exponential_backoff) == (3, 0, 2.0)
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from airflow_modelopt.operators.launchers import TrackingUnavailableError

    transient, _ = _execute_with_step_exit(monkeypatch, _export(), 4)
    assert isinstance(transient, TrackingUnavailableError) and not isinstance(transient, AirflowFailException)
    assert "MLflow tracking server unreachable" in str(transient)
    # exit 1 keeps the task's own retries (none): failed for good, not retried 3 times
    failed, _ = _execute_with_step_exit(monkeypatch, _export(), 1)
    assert isinstance(failed, AirflowFailException)
    assert "exit code 1" in str(failed) and "the task's retries are 0" in str(failed)
    assert isinstance(failed, AirflowException)
    for code in (2, 3, 5, 6):
        never, _ = _execute_with_step_exit(monkeypatch, _export(), code)
        assert isinstance(never, AirflowFailException), code


def test_a_task_with_retries_keeps_them_for_every_retryable_failure(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    op = _export(retries=2)
    assert (op.retries, op.own_retries, op.retry_exponential_backoff) == (2, 2, 0)
    err, _ = _execute_with_step_exit(monkeypatch, _export(retries=2), 1, try_number=2)
    assert not isinstance(err, AirflowFailException)  # a retry is left
    err, _ = _execute_with_step_exit(monkeypatch, _export(retries=2), 2, try_number=1)
    assert isinstance(err, AirflowFailException)  # a bad spec never is


def test_own_retries_spent_stops_before_the_transient_budget(monkeypatch):
    """retries=1 by default_args; the transient budget (3) adds tries for exit 4 only."""
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("AIRFLOW__MODELOPT__TRANSIENT_FAILURE_RETRIES", "3")
    with DAG("d", schedule=None, default_args={"retries": 1}):
        op = _export()
    assert (op.retries, op.own_retries) == (1, 1)  # default_args count as the task's own
    with DAG("d2", schedule=None, default_args={"retry_exponential_backoff": 3.0}):
        op = _export()
    assert (op.retries, op.retry_exponential_backoff) == (3, 3.0)
    err, _ = _execute_with_step_exit(monkeypatch, op, 1, try_number=1)
    assert isinstance(err, AirflowFailException)


def test_transient_retries_come_from_config(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MODELOPT__TRANSIENT_FAILURE_RETRIES", "0")
    op = _export()
    assert (op.retries, op.retry_exponential_backoff) == (0, 0)
    monkeypatch.setenv("AIRFLOW__MODELOPT__TRANSIENT_FAILURE_RETRIES", "many")
    with pytest.raises(ValueError, match=r"\[modelopt\] transient_failure_retries is 'many'"):
        _export()


def test_the_launcher_gets_a_frozen_request_not_the_operator(monkeypatch):
    import dataclasses

    op = _export(image="{{ params.image }}", python="/opt/py/bin/python", docker_kwargs={"mem_limit": "1g"})
    op.image = "None"  # a param rendered empty means: from configuration
    _, request = _execute_with_step_exit(monkeypatch, op, 4)
    assert request.task_id == "export" and request.spec.step == "torch_to_onnx"
    assert request.image is None and request.python == "/opt/py/bin/python"
    assert request.docker_kwargs == {"mem_limit": "1g"}
    assert request.tracking.public_env["MODELOPT_MLFLOW_CONNECT_RETRIES"] == config.get("mlflow_connect_retries")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.image = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.docker_kwargs["mem_limit"] = "2g"  # type: ignore[index]
    op.docker_kwargs["mem_limit"] = "4g"
    assert request.docker_kwargs == {"mem_limit": "1g"}  # a copy, not the operator's dict


def test_on_kill_reaches_the_nested_provider_operator(monkeypatch):
    from unittest import mock

    from airflow_modelopt.hooks.mlflow import TrackingConfig
    from airflow_modelopt.operators.launchers import DockerLauncher

    op = _export()
    launcher = DockerLauncher(op.launch_request(op.build_spec(None, mode="docker"), TrackingConfig("http://m", {})))
    launcher.docker_operator = mock.Mock()
    op._launcher = launcher
    op.on_kill()
    launcher.docker_operator.on_kill.assert_called_once_with()


def test_trust_model_code_is_off_unless_the_task_or_the_deployment_opts_in(monkeypatch):
    from airflow_modelopt.operators import TorchToOnnxOperator

    op = TorchToOnnxOperator(task_id="export", model_uri="runs:/abc/model.pt2", input_shapes={"x": [1, 4]})
    assert op.build_spec(None).context.trust_model_code is False
    monkeypatch.setenv("AIRFLOW__MODELOPT__TRUST_MODEL_CODE", "True")
    assert op.build_spec(None).context.trust_model_code is True
    explicit = TorchToOnnxOperator(task_id="export2", model_uri="runs:/abc/model.pt2", input_shapes={"x": [1, 4]},
                                   trust_model_code=False)
    assert explicit.build_spec(None).context.trust_model_code is False


def test_a_template_that_cannot_render_fails_the_task_without_the_transient_retries():
    """Rendering happens before execute: an upstream task that left no XCom is not an MLflow outage,
    so the retries added for exit 4 must not apply (a DAG run once waited 35 min of backoff on it)."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from airflow_modelopt.operators import BenchmarkOperator

    op = BenchmarkOperator(task_id="bench", model_uri="{{ ti.xcom_pull(task_ids='train')['artifacts']['m'] }}")
    assert op.retries == 3 and op.own_retries == 0  # the transient retries are there
    ti = SimpleNamespace(try_number=1, xcom_pull=lambda **_: None)
    with pytest.raises(AirflowFailException, match=r"BenchmarkOperator 'bench': a templated argument did not render"):
        op.render_template_fields({"ti": ti})


# --- extra links -------------------------------------------------------------------------------------

def test_a_finished_step_links_its_task_to_its_mlflow_run(monkeypatch):
    """The link Airflow stores when the task ends points at the step's run in the connection's
    MLflow UI (extra ``ui_url`` when people reach it under another name than the workers)."""
    from types import SimpleNamespace

    from airflow_modelopt.operators import launchers
    from airflow_modelopt.operators.links import MlflowRunLink
    from airflow_modelopt.specs import StepResult

    class FinishingLauncher(launchers.Launcher):
        def launch(self, context):
            return StepResult(step="torch_to_onnx", mlflow_run_id="abc123", experiment_id="7", cache_key="k" * 64)

    class Hook(_FakeHook):
        mlflow_conn_id = "mlflow_default"

        def __init__(self, extra):
            self.extra = extra

        def get_connection(self, conn_id):
            return SimpleNamespace(extra_dejson=self.extra)

    monkeypatch.setitem(launchers.LAUNCHERS, "local", FinishingLauncher)
    for extra, base in (({}, "http://mlflow:5000"), ({"ui_url": "https://mlflow.example.com/"},
                                                     "https://mlflow.example.com")):
        op = _export()
        op.__dict__["mlflow_hook"] = Hook(extra)
        assert MlflowRunLink().get_link(op, ti_key=None) == ""  # before it ran: no link yet
        op.execute({"ti": SimpleNamespace(try_number=1, dag_id="d", run_id="r")})
        assert MlflowRunLink().get_link(op, ti_key=None) == f"{base}/#/experiments/7/runs/abc123"
    assert [link.name for link in TorchToOnnxOperator.operator_extra_links] == ["MLflow run"]


def test_promote_links_to_the_registered_model_and_links_are_registered_with_the_provider():
    from airflow_modelopt import get_provider_info
    from airflow_modelopt.operators import PromoteModelOperator
    from airflow_modelopt.operators.links import step_links, ui_base

    assert [link.name for link in PromoteModelOperator.operator_extra_links] == ["MLflow run", "MLflow registered model"]
    links = step_links(ui_base("http://127.0.0.1:5000"), {"mlflow_run_id": "r1", "experiment_id": "3",
                                                          "info": {"registered_model_name": "digits cnn"}})
    assert links["MLflow registered model"] == "http://127.0.0.1:5000/#/models/digits%20cnn"
    # A local store has no UI: no URL, so the button stays disabled rather than pointing nowhere.
    assert step_links(ui_base("sqlite:////tmp/mlflow.db"), {"mlflow_run_id": "r1"}) == {"MLflow run": ""}
    assert set(get_provider_info()["extra-links"]) == {
        f"airflow_modelopt.operators.links.{c}" for c in ("MlflowRunLink", "MlflowRegisteredModelLink")}
