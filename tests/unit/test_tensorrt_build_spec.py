"""TensorRTBuildSpec: bad options are refused on both sides, naming the field (and the input of a
bad optimization profile); the operator refuses literal ones at DAG parse time, imports no ML
framework, and asks Kubernetes for a GPU by default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import parse_spec
from airflow_modelopt.specs.tensorrt_build import TensorRTBuildSpec
from tests.conftest import REPO

BASE = {"model_uri": "runs:/abc/onnx_model"}
CAL = {"calibration_data_uri": "runs:/abc/data/calibration.npz"}
X = {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}


def parse(**fields):
    return parse_spec("tensorrt_build", {**BASE, **fields})


def test_defaults_and_registration():
    spec = parse()
    assert (spec.precision, spec.workspace_mb, spec.builder_optimization_level, spec.device) == ("fp16", 1024, 3, 0)
    assert spec.optimization_profiles is None
    assert TensorRTBuildSpec.image_family == "tensorrt"
    assert TensorRTBuildSpec.input_fields == ("model_uri", "calibration_data_uri", "timing_cache_uri")


def test_int8_requires_calibration_data():
    with pytest.raises(SpecError, match=r"calibration_data_uri is required for precision 'int8'"):
        parse(precision="int8")
    assert parse(precision="int8", **CAL).calibration_data_uri == CAL["calibration_data_uri"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_calibration_data_is_refused_when_it_would_be_ignored(precision):
    with pytest.raises(SpecError, match=rf"calibration_data_uri is only read for precision 'int8' \(got '{precision}'\)"):
        parse(precision=precision, **CAL)


@pytest.mark.parametrize(("fields", "message"), [
    ({"precision": "bf16"}, r"precision: Input should be 'fp32', 'fp16' or 'int8'"),
    ({"builder_optimization_level": 6}, r"builder_optimization_level: Input should be less than or equal to 5"),
    ({"builder_optimization_level": -1}, r"builder_optimization_level: Input should be greater than or equal to 0"),
    ({"workspace_mb": 8}, r"workspace_mb: Input should be greater than or equal to 16"),
    ({"device": -1}, r"device: Input should be greater than or equal to 0"),
    ({"calibration_batches": 0}, r"calibration_batches: Input should be greater than or equal to 1"),
    ({"timing_cache_uri": "s3://bucket/timing.cache"}, r"timing_cache_uri: unknown URI scheme 's3'"),
    ({"max_workspace_size": 1 << 30}, r"max_workspace_size: unknown field \(not part of this step's spec\)"),
    ({"opt_batch_size": 64, "max_batch_size": 8}, r"opt_batch_size \(64\) must not exceed max_batch_size \(8\)"),
])
def test_bad_types_and_ranges_name_the_field(fields, message):
    with pytest.raises(SpecError, match=message):
        parse(**fields)


@pytest.mark.parametrize(("shapes", "message"), [
    ({"min": [1, 1, 8, 8], "opt": [8, 1, 8], "max": [32, 1, 8, 8]},
     r"optimization_profiles\.0\.x: min, opt and max must have the same rank.*'opt': 3"),
    ({"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [4, 1, 8, 8]},
     r"optimization_profiles\.0\.x: dimension 0 must satisfy min <= opt <= max, got min=1, opt=8, max=4"),
    ({"min": [2, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [4, 1, 8, 8]},
     r"optimization_profiles\.0\.x: dimension 0 must satisfy min <= opt <= max, got min=2, opt=1"),
    ({"min": [0, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]},
     r"optimization_profiles\.0\.x\.min\.0: Input should be greater than or equal to 1"),
    ({"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8]}, r"optimization_profiles\.0\.x\.max: Field required"),
    ({**X, "best": [8, 1, 8, 8]}, r"optimization_profiles\.0\.x\.best: unknown field"),
])
def test_bad_profile_shapes_name_the_profile_and_input(shapes, message):
    with pytest.raises(SpecError, match=message):
        parse(optimization_profiles=[{"x": shapes}])


def test_a_single_mapping_is_one_profile_and_profiles_must_agree():
    spec = parse(optimization_profiles={"x": X})
    assert len(spec.optimization_profiles) == 1
    assert spec.optimization_profiles[0]["x"].opt == [8, 1, 8, 8]
    with pytest.raises(SpecError, match=r"optimization_profiles\[1\] names inputs \['y'\] but optimization_profiles"
                                        r"\[0\] names \['x'\]"):
        parse(optimization_profiles=[{"x": X}, {"y": X}])
    with pytest.raises(SpecError, match=r"optimization_profiles\[1\]\['x'\] has rank 2 but optimization_profiles\[0\]"):
        parse(optimization_profiles=[{"x": X}, {"x": {"min": [1, 64], "opt": [1, 64], "max": [1, 64]}}])
    with pytest.raises(SpecError, match=r"optimization_profiles\[0\] is empty"):
        parse(optimization_profiles=[{}])


def test_the_full_spec_the_operator_sends_validates_again_in_the_container():
    spec = parse(precision="int8", optimization_profiles=[{"x": X}, {"x": {**X, "opt": [16, 1, 8, 8]}}],
                 timing_cache_uri="runs:/r0/tensorrt_engine/timing.cache", **CAL)
    again = parse_spec("tensorrt_build", spec.model_dump_json())
    assert again == spec
    assert json.loads(spec.model_dump_json())["optimization_profiles"][1]["x"]["opt"] == [16, 1, 8, 8]


# -- operator --------------------------------------------------------------------------------


def test_operator_refuses_literal_arguments_at_construction_and_waits_for_templates():
    from airflow_modelopt.operators.tensorrt_build import TensorRTBuildOperator

    with pytest.raises(ValueError, match=r"(?s)TensorRTBuildOperator 'trt'.*calibration_data_uri is required"):
        TensorRTBuildOperator(task_id="trt", model_uri="/m.onnx", precision="int8")
    with pytest.raises(ValueError, match=r"precision: Input should be 'fp32', 'fp16' or 'int8'"):
        TensorRTBuildOperator(task_id="trt", model_uri="{{ ti.xcom_pull('export') }}", precision="int4")
    op = TensorRTBuildOperator(task_id="trt", model_uri="{{ x }}", precision="fp16")
    assert {"model_uri", "optimization_profiles", "timing_cache_uri"} <= set(op.template_fields)
    assert ":param optimization_profiles:" in (TensorRTBuildOperator.__doc__ or "")
    assert ":param request_gpu:" in (TensorRTBuildOperator.__doc__ or "")


def test_kubernetes_pod_requests_a_gpu_and_tolerates_gpu_nodes_by_default():
    from airflow_modelopt.operators.tensorrt_build import TensorRTBuildOperator

    op = TensorRTBuildOperator(task_id="trt", model_uri="/m.onnx")
    assert op.kubernetes_kwargs["container_resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert op.kubernetes_kwargs["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                    "effect": "NoSchedule"}]
    assert "container_resources" not in TensorRTBuildOperator(task_id="t2", model_uri="/m.onnx",
                                                              request_gpu=False).kubernetes_kwargs


def test_user_kubernetes_kwargs_are_merged_and_an_explicit_gpu_setting_wins():
    from kubernetes.client import models as k8s

    from airflow_modelopt.operators.tensorrt_build import TensorRTBuildOperator

    given = k8s.V1ResourceRequirements(requests={"cpu": "2"}, limits={"memory": "8Gi"})
    op = TensorRTBuildOperator(task_id="trt", model_uri="/m.onnx", kubernetes_kwargs={
        "container_resources": given, "node_selector": {"gpu": "a10"},
        "tolerations": [k8s.V1Toleration(key="dedicated", operator="Equal", value="ml", effect="NoSchedule")]})
    res = op.kubernetes_kwargs["container_resources"]
    assert res.limits == {"memory": "8Gi", "nvidia.com/gpu": "1"} and res.requests == {"cpu": "2"}
    assert given.limits == {"memory": "8Gi"}, "the caller's object must not be changed"
    assert op.kubernetes_kwargs["node_selector"] == {"gpu": "a10"}
    assert [getattr(t, "key", None) or t["key"] for t in op.kubernetes_kwargs["tolerations"]] == [
        "dedicated", "nvidia.com/gpu"]

    two = TensorRTBuildOperator(task_id="t2", model_uri="/m.onnx", kubernetes_kwargs={
        "container_resources": {"limits": {"nvidia.com/gpu": "2"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}]})
    assert two.kubernetes_kwargs["container_resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert len(two.kubernetes_kwargs["tolerations"]) == 1


def test_the_pod_the_kubernetes_launcher_builds_carries_the_gpu_request(tmp_path, monkeypatch):
    """Built with the cncf.kubernetes provider's own code; no cluster runs here."""
    from airflow_modelopt.hooks.mlflow import TrackingConfig
    from airflow_modelopt.operators.launchers import KubernetesLauncher
    from airflow_modelopt.operators.tensorrt_build import TensorRTBuildOperator

    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "current-context: x\n")
    monkeypatch.setenv("AIRFLOW__MODELOPT__KUBERNETES_NAMESPACE", "ml")
    op = TensorRTBuildOperator(task_id="trt", model_uri="runs:/r/onnx_model", precision="fp16",
                               kubernetes_kwargs={"config_file": str(tmp_path / "kubeconfig")})
    spec = op.build_spec(None, mode="kubernetes")
    spec.context.image = "airflow-modelopt-tensorrt:0.1.0"
    tracking = TrackingConfig("http://mlflow:5000", {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    pod = KubernetesLauncher(op.launch_request(spec, tracking)).build_operator().build_pod_request_obj()
    step = pod.spec.containers[0]
    assert step.args[:2] == ["run", "tensorrt_build"]
    resources = step.resources if isinstance(step.resources, dict) else step.resources.to_dict()
    assert resources["limits"] == {"nvidia.com/gpu": "1"}
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.spec.tolerations)


def test_operator_module_imports_no_ml_framework():
    heavy = ("torch", "tensorflow", "onnxruntime", "onnx", "mlflow", "tensorrt", "cuda.bindings.runtime", "cuda.cudart")
    code = ("import sys; import airflow_modelopt.operators.tensorrt_build; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_a_worker_that_cannot_run_the_step_fails_the_task_without_retries():
    """The step exits 6 on a worker without TensorRT or a GPU; Airflow must not retry that task."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_modelopt.operators.launchers import failure

    err = failure("tensorrt_build", "a local process", 6, ["modelopt: error: TensorRT target needs an NVIDIA GPU"])
    assert isinstance(err, AirflowFailException)
    assert "not retried" in str(err)
