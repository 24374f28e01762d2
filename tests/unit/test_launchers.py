"""What each execution mode builds: the container command, the Docker container's environment,
the Kubernetes pod. The pod is built with the cncf.kubernetes provider's own code; no cluster
runs here, so these tests assert on the pod object, never on a running pod."""

from __future__ import annotations

import json

import pytest

from airflow_modelopt.hooks.mlflow import MlflowHook, TrackingConfig
from airflow_modelopt.operators import TorchToOnnxOperator
from airflow_modelopt.operators.launchers import (
    DockerLauncher,
    KubernetesLauncher,
    LocalLauncher,
    command_for,
    parse_result,
)
from tests.conftest import UNREACHABLE_KUBECONFIG

SECRET_ENV = {"MLFLOW_TRACKING_TOKEN": "s3cr3t-token"}
TRACKING = TrackingConfig("http://mlflow.internal:5000", {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"},
                          SECRET_ENV, source="connection 'mlflow_default'")


@pytest.fixture
def operator():
    return TorchToOnnxOperator(task_id="export", model_uri="runs:/r1/model/model.pt2", data_uri="runs:/r1/data/eval.npz",
                               opset=18, kubernetes_kwargs={"node_selector": {"pool": "cpu"}})


def _spec(operator, mode):
    spec = operator.build_spec(None, mode=mode)
    spec.context.image = "airflow-modelopt-torch:0.1.0"
    return spec


def _request(operator, mode, tracking=TRACKING):
    return operator.launch_request(_spec(operator, mode), tracking)


def test_command_carries_the_validated_spec(operator):
    spec = _spec(operator, "docker")
    argv = command_for(spec)
    assert argv[:4] == ["airflow-modelopt", "run", "torch_to_onnx", "--spec"]
    sent = json.loads(argv[4])
    assert sent["model_uri"] == "runs:/r1/model/model.pt2" and sent["opset"] == 18
    assert sent["context"]["execution_mode"] == "docker"
    assert "s3cr3t" not in argv[4]


def test_docker_container_gets_credentials_privately(operator):
    docker_op = DockerLauncher(_request(operator, "docker")).build_operator()
    assert docker_op.image == "airflow-modelopt-torch:0.1.0"
    assert docker_op.command[:3] == ["airflow-modelopt", "run", "torch_to_onnx"]
    assert docker_op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "HOME": "/tmp"}
    assert docker_op._private_environment == SECRET_ENV
    assert "private_environment" not in docker_op.template_fields
    assert docker_op.do_xcom_push and docker_op.xcom_all


def test_docker_mode_refuses_a_local_store(operator):
    from airflow.sdk.exceptions import AirflowFailException

    local = TrackingConfig("sqlite:////tmp/mlflow.db", {"MLFLOW_TRACKING_URI": "sqlite:////tmp/mlflow.db"})
    with pytest.raises(AirflowFailException, match="docker mode needs an MLflow tracking server over HTTP"):
        DockerLauncher(_request(operator, "docker", local)).launch({})


def test_kubernetes_pod_has_secret_env_resources_and_result_sidecar(operator, monkeypatch, tmp_path):
    """No cluster here: a kubeconfig naming an unreachable server lets the provider build the pod."""
    from kubernetes.client import models as k8s

    (tmp_path / "kubeconfig").write_text(UNREACHABLE_KUBECONFIG)
    operator.kubernetes_kwargs["config_file"] = str(tmp_path / "kubeconfig")

    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_MLFLOW_SECRET", "mlflow-credentials")
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_NAMESPACE", "ml")
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_SERVICE_ACCOUNT", "modelopt-steps")
    operator.kubernetes_kwargs["container_resources"] = k8s.V1ResourceRequirements(
        requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "4Gi"})
    pod_op = KubernetesLauncher(_request(operator, "kubernetes")).build_operator()
    pod = pod_op.build_pod_request_obj()
    assert pod.metadata.namespace == "ml"
    assert pod.spec.service_account_name == "modelopt-steps"
    assert pod.spec.node_selector == {"pool": "cpu"}
    # the Helm chart's NetworkPolicy admits step pods to MLflow by this label: a contract
    assert pod.metadata.labels["airflow-modelopt/step"] == "torch_to_onnx"
    base = pod.spec.containers[0]
    assert base.image == "airflow-modelopt-torch:0.1.0"
    assert base.command == ["airflow-modelopt"]
    assert base.args[:3] == ["run", "torch_to_onnx", "--spec"]
    env = {e.name: e.value for e in base.env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert "MLFLOW_TRACKING_TOKEN" not in env
    assert [s.secret_ref.name for s in base.env_from] == ["mlflow-credentials"]
    assert base.resources.requests == {"cpu": "1", "memory": "2Gi"}
    # do_xcom_push: the provider adds its sidecar and the shared /airflow/xcom volume
    assert any(c.name == "airflow-xcom-sidecar" for c in pod.spec.containers)
    assert any(m.mount_path == "/airflow/xcom" for m in base.volume_mounts)
    assert "s3cr3t" not in json.dumps(pod.to_dict(), default=str)


def test_kubernetes_refuses_credentials_without_a_secret(operator, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.delenv("AIRFLOW__MODELOPT__KUBERNETES_MLFLOW_SECRET", raising=False)
    with pytest.raises(AirflowFailException, match="kubernetes_mlflow_secret"):
        KubernetesLauncher(_request(operator, "kubernetes")).build_operator()


def test_local_mode_runs_the_same_entry_point(operator):
    assert LocalLauncher(_request(operator, "local")).python()
    operator.python = "/opt/other/bin/python"
    assert LocalLauncher(_request(operator, "local")).python() == "/opt/other/bin/python"


def test_result_is_the_last_json_line():
    line = '{"step":"torch_to_onnx","mlflow_run_id":"r","cache_key":"k","spec_version":1}'
    result = parse_result(["progress 1", '{"not": "a result"}', line, ""], where="test")
    assert result.mlflow_run_id == "r"
    with pytest.raises(Exception, match="printed no result JSON"):
        parse_result(["only logs"], where="test")


def test_plain_uri_connection():
    from airflow.models.connection import Connection

    conn = Connection(conn_id="mlflow_default", uri="http://127.0.0.1:5000")
    cfg = MlflowHook.config_from_connection(conn)
    assert cfg.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.secret_env == {}


def test_user_password_and_token_connections():
    from airflow.models.connection import Connection

    basic = MlflowHook.config_from_connection(
        Connection(conn_id="mlflow_default", uri="https://alice:pa%24%24@mlflow.example.com/tracking"))
    assert basic.tracking_uri == "https://mlflow.example.com/tracking"
    assert basic.secret_env == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pa$$"}
    assert "pa$$" not in repr(basic)
    token = MlflowHook.config_from_connection(
        Connection(conn_id="mlflow_default", conn_type="mlflow", host="mlflow.example.com", port=443,
                   extra=json.dumps({"token": "tok", "scheme": "https"})))
    assert token.tracking_uri == "https://mlflow.example.com:443"
    assert token.secret_env == {"MLFLOW_TRACKING_TOKEN": "tok"}
    explicit = MlflowHook.config_from_connection(
        Connection(conn_id="mlflow_default", conn_type="mlflow", extra=json.dumps({"tracking_uri": "sqlite:////d/m.db"})))
    assert explicit.tracking_uri == "sqlite:////d/m.db"


def test_connection_without_host_is_refused():
    from airflow.models.connection import Connection

    with pytest.raises(ValueError, match="has no host"):
        MlflowHook.config_from_connection(Connection(conn_id="mlflow_default", conn_type="mlflow"))



def _failed_pod_launcher(operator, monkeypatch, tmp_path, exit_code):
    """No cluster here, so the pod's end is simulated: ``execute`` leaves the pod the provider
    last read (step container terminated with ``exit_code``) and raises the provider's error."""
    from airflow.sdk.exceptions import AirflowException
    from kubernetes.client import models as k8s

    (tmp_path / "kubeconfig").write_text(UNREACHABLE_KUBECONFIG)
    operator.kubernetes_kwargs["config_file"] = str(tmp_path / "kubeconfig")
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_MLFLOW_SECRET", "mlflow-credentials")
    launcher = KubernetesLauncher(operator.launch_request(operator.build_spec(None, mode="kubernetes"), TRACKING))
    build = launcher.build_operator

    def build_failing(spec):
        pod_op = build(spec)

        def execute(context):
            pod = pod_op.build_pod_request_obj()
            pod_op.remote_pod = k8s.V1Pod(metadata=pod.metadata, status=k8s.V1PodStatus(
                phase="Failed", container_statuses=[k8s.V1ContainerStatus(
                    name=pod_op.base_container_name, image=pod_op.image, image_id="", ready=False,
                    restart_count=0, state=k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(
                        exit_code=exit_code, reason="Error")))]))
            raise AirflowException(f"Pod {pod.metadata.name} returned a failure.")

        pod_op.execute = execute
        return pod_op

    launcher.build_operator = build_failing
    return launcher


@pytest.mark.parametrize(("exit_code", "retried", "meaning"), [
    (2, False, "bad spec or input"), (3, False, "quality gate"), (1, True, "step failed"), (4, True, "MLflow")])
def test_failed_pod_exit_code_decides_the_retry_simulated_pod(operator, monkeypatch, tmp_path, exit_code, retried,
                                                              meaning):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    launcher = _failed_pod_launcher(operator, monkeypatch, tmp_path, exit_code)
    with pytest.raises(AirflowException) as raised:
        launcher.launch({})
    assert isinstance(raised.value, AirflowFailException) is not retried
    message = str(raised.value)
    image = launcher.request.resolved_image()
    assert f"step torch_to_onnx failed in pod of image {image} (exit code {exit_code}: " in message
    assert meaning in message
    assert "returned a failure" in message  # the provider's words are kept
