"""Steps run with the least privilege each mode allows: what the Docker engine is asked for and
what pod the Kubernetes provider builds. No engine and no cluster run here: the Docker side runs
the provider's DockerOperator against a recording client (docker-py builds the real HostConfig),
the pod is built by the cncf.kubernetes provider's own code."""

from __future__ import annotations

import json

import pytest

from airflow_modelopt.hooks.mlflow import TrackingConfig
from airflow_modelopt.operators import TorchToOnnxOperator
from airflow_modelopt.operators.launchers import DockerLauncher, KubernetesLauncher
from tests.conftest import UNREACHABLE_KUBECONFIG

TRACKING = TrackingConfig("http://mlflow.internal:5000", {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"})
RESULT = '{"step": "torch_to_onnx", "mlflow_run_id": "r1", "cache_key": "k", "spec_version": 1}'


def _operator(**kwargs):
    return TorchToOnnxOperator(task_id="export", model_uri="runs:/r1/model/model.pt2",
                               data_uri="runs:/r1/data/eval.npz", **kwargs)


# --- docker ----------------------------------------------------------------------------------------

class RecordingEngine:
    """The docker-py calls DockerOperator makes, answered as an engine would; the HostConfig is
    docker-py's own, so the test sees what the engine would receive."""

    def __init__(self) -> None:
        import docker

        self._real = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.45")
        self.created: dict = {}

    def inspect_image(self, image):
        return {"Id": "sha256:" + "a" * 64, "RepoDigests": []}

    def images(self, name):
        return [{"Id": "sha256:" + "a" * 64}]

    def create_host_config(self, **kwargs):
        return self._real.create_host_config(**kwargs)

    def create_container(self, **kwargs):
        self.created = kwargs
        return {"Id": "c1"}

    def attach(self, **kwargs):
        return iter([b"progress\n", RESULT.encode() + b"\n"])

    def start(self, container_id):
        pass

    def wait(self, container_id):
        return {"StatusCode": 0}

    def remove_container(self, container_id, **kwargs):
        pass


def _run_in_docker(operator):
    engine = RecordingEngine()
    launcher = DockerLauncher(operator.launch_request(operator.build_spec(None, mode="docker"), TRACKING))
    build = launcher.build_operator

    def build_on_recording_engine(spec=None):
        docker_op = build(spec)
        docker_op.hook = type("Hook", (), {"api_client": engine})()
        return docker_op

    launcher.build_operator = build_on_recording_engine
    result = launcher.launch({})
    return engine.created, result


def test_docker_step_container_is_hardened_by_default():
    created, result = _run_in_docker(_operator())
    assert result.mlflow_run_id == "r1"
    host = created["host_config"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert not host.get("Privileged")
    # scratch for tempfile and HOME on the read-only root; exec, since torch loads code it compiles there
    assert set(host["Tmpfs"]) == {"/tmp"} and "exec" in host["Tmpfs"]["/tmp"].split(",")
    assert "noexec" not in host["Tmpfs"]["/tmp"]
    assert created["environment"]["HOME"] == "/tmp"
    assert created["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"


def test_docker_kwargs_override_each_hardening_setting():
    created, _ = _run_in_docker(_operator(docker_kwargs={
        "read_only": False, "cap_drop": ["NET_RAW"], "tmpfs": {"/scratch": "size=1g"}, "mem_limit": "2g"}))
    host = created["host_config"]
    assert not host.get("ReadonlyRootfs")
    assert host["CapDrop"] == ["NET_RAW"]
    assert host["Tmpfs"] == {"/scratch": "size=1g"}
    assert host["SecurityOpt"] == ["no-new-privileges:true"]  # not overridden: kept
    assert host["Memory"] == 2 * 1024**3  # other docker_kwargs still reach the DockerOperator


def test_a_writable_root_by_configuration_drops_the_scratch(monkeypatch):
    monkeypatch.setenv("AIRFLOW__MODELOPT__READ_ONLY_ROOT_FILESYSTEM", "False")
    created, _ = _run_in_docker(_operator())
    host = created["host_config"]
    assert not host.get("ReadonlyRootfs") and not host.get("Tmpfs")
    assert "HOME" not in created["environment"]
    assert host["CapDrop"] == ["ALL"]


# --- kubernetes --------------------------------------------------------------------------------------

def _pod(operator, monkeypatch, tmp_path):
    (tmp_path / "kubeconfig").write_text(UNREACHABLE_KUBECONFIG)
    operator.kubernetes_kwargs["config_file"] = str(tmp_path / "kubeconfig")
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_NAMESPACE", "ml")
    request = operator.launch_request(operator.build_spec(None, mode="kubernetes"), TRACKING)
    pod = KubernetesLauncher(request).build_operator().build_pod_request_obj()
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)  # the manifest the API server receives


def _containers(pod):
    return {c["name"]: c for c in pod["spec"]["containers"]}


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
    "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
}


def test_step_pod_meets_the_restricted_pod_security_standard(monkeypatch, tmp_path):
    pod = _pod(_operator(), monkeypatch, tmp_path)
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    containers = _containers(pod)
    step, sidecar = containers["base"], containers["airflow-xcom-sidecar"]
    assert step["securityContext"] == RESTRICTED_CONTAINER
    assert sidecar["securityContext"] == RESTRICTED_CONTAINER
    # the read-only root gets a scratch emptyDir on /tmp, HOME points into it; the xcom volume stays
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in step["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "/airflow/xcom" in mounts
    assert {e["name"]: e.get("value") for e in step["env"]}["HOME"] == "/tmp"


def test_kubernetes_kwargs_override_the_security_contexts(monkeypatch, tmp_path):
    from kubernetes.client import models as k8s

    operator = _operator(kubernetes_kwargs={
        "security_context": {"runAsNonRoot": True, "runAsUser": 2000},
        "container_security_context": k8s.V1SecurityContext(read_only_root_filesystem=False),
        "volumes": [k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource())],
        "volume_mounts": [k8s.V1VolumeMount(name="data", mount_path="/data")],
    })
    pod = _pod(operator, monkeypatch, tmp_path)
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000}
    containers = _containers(pod)
    assert containers["base"]["securityContext"] == {"readOnlyRootFilesystem": False}
    assert containers["airflow-xcom-sidecar"]["securityContext"] == RESTRICTED_CONTAINER
    mounts = {m["mountPath"] for m in containers["base"]["volumeMounts"]}
    assert {"/data", "/tmp", "/airflow/xcom"} <= mounts  # the user's mounts are kept, scratch added


def test_a_user_mount_on_tmp_replaces_the_scratch_volume(monkeypatch, tmp_path):
    from kubernetes.client import models as k8s

    operator = _operator(kubernetes_kwargs={
        "volumes": [k8s.V1Volume(name="big-tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="20Gi"))],
        "volume_mounts": [k8s.V1VolumeMount(name="big-tmp", mount_path="/tmp")],
    })
    pod = _pod(operator, monkeypatch, tmp_path)
    step = _containers(pod)["base"]
    assert [m["name"] for m in step["volumeMounts"] if m["mountPath"] == "/tmp"] == ["big-tmp"]
    assert "modelopt-scratch" not in json.dumps(pod)


def test_an_empty_run_as_user_leaves_the_uid_to_the_platform(monkeypatch, tmp_path):
    """OpenShift's restricted SCC assigns a uid from the namespace range and refuses a fixed one."""
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_RUN_AS_USER", "")
    pod = _pod(_operator(), monkeypatch, tmp_path)
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_a_bad_boolean_option_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__MODELOPT__READ_ONLY_ROOT_FILESYSTEM", "maybe")
    with pytest.raises(ValueError, match=r"\[modelopt\] read_only_root_filesystem is 'maybe'; expected True or False"):
        _pod(_operator(), monkeypatch, tmp_path)
