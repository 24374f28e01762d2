"""Docker mode with a real Docker engine and the base and torch images (`make images`)."""

from __future__ import annotations

import pytest

from tests.conftest import make_airflow_home
from tests.container.conftest import IMAGES, optimize_in_docker
from tests.integration.test_dag_local import DAG_ID, dag_conf, step_runs_of_latest_dag_run

TORCH_IMAGE = IMAGES["torch"]
BASE_IMAGE = IMAGES["base"]


DOCKER_TARGETS = ["onnx_fp32", "onnx_int8_static", "pruned_onnx_int8"]
#: The image family each step task must have run in.
EXPECTED_FAMILY = {
    "train": "torch", "optimize.export_onnx": "torch", "optimize.onnx_int8_static": "base",
    "optimize.prune": "torch", "optimize.export_pruned_onnx": "torch", "optimize.pruned_onnx_int8": "base",
    "optimize.promote": "base",
    # validation reads the .pt2 reference: torch; benchmarks of ONNX candidates: base
    **{f"optimize.validate_{t}": "torch" for t in DOCKER_TARGETS},
    **{f"optimize.benchmark_{t}": "base" for t in DOCKER_TARGETS},
}


def test_dag_runs_in_docker_and_records_image_and_digest(docker_home, mlflow_server, images):
    """Export, ORT quantization, pruning, validation, benchmark and promotion, each in its image."""
    proc = docker_home.run("dags", "test", DAG_ID, "-c", dag_conf(
        epochs=4, execution_mode="docker", registered_model_name="digits-docker-test", targets=DOCKER_TARGETS))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Starting docker container from image airflow-modelopt-torch" in proc.stdout + proc.stderr
    client = mlflow_server.client()
    _, steps = step_runs_of_latest_dag_run(client, DAG_ID)
    out = proc.stdout + proc.stderr
    assert set(steps) == set(EXPECTED_FAMILY), "\n".join(
        line for line in out.splitlines() if "modelopt: error" in line or "Marking task" in line)[-4000:]
    for task_id, run in steps.items():
        tags = run.data.tags
        assert tags["modelopt.execution_mode"] == "docker"
        family = EXPECTED_FAMILY[task_id]
        assert tags["modelopt.image"] == IMAGES[family], task_id
        assert tags["modelopt.image_digest"] == images[family], task_id
        assert tags["modelopt.status"] == "succeeded", task_id
    for target in DOCKER_TARGETS:
        assert client.get_model_version_by_alias("digits-docker-test", target) is not None
    assert steps["optimize.prune"].data.metrics["params_after"] < steps["optimize.prune"].data.metrics["params_before"]
    assert steps["optimize.onnx_int8_static"].data.metrics["size_ratio"] < 0.5
    export = steps["optimize.export_onnx"]
    assert export.data.metrics["max_abs_error_batch_1"] < 1e-4
    assert export.data.metrics["max_abs_error_batch_7"] < 1e-4


def test_failing_container_fails_the_task_with_its_last_log_lines(test_dags_home):
    proc = test_dags_home.run("dags", "test", "modelopt_test_failing_container")
    out = proc.stdout + proc.stderr
    assert "DagRun failed" in out or proc.returncode != 0, out[-3000:]
    assert f"step torch_to_onnx failed in container {TORCH_IMAGE} (exit code 2: bad spec or input; not retried)" in out
    assert "Last log lines:" in out
    assert "modelopt: error: model_uri: cannot read runs:/00000000000000000000000000000000/model/model.pt2" in out
    # AirflowFailException: the task fails at once although it has retries=2
    assert "up_for_retry" not in out.lower()


def test_missing_image_gives_one_clear_error(tmp_path_factory, mlflow_server, images):
    home = make_airflow_home(tmp_path_factory.mktemp("airflow-noimage"), {
        "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server.uri,
        "AIRFLOW__MODELOPT__IMAGE_TAG": "no-such-tag",
    })
    proc = home.run("dags", "test", DAG_ID, "-c", dag_conf(epochs=1, execution_mode="docker"))
    out = proc.stdout + proc.stderr
    assert "image 'airflow-modelopt-torch:no-such-tag' is not present on the Docker engine and could not be pulled" in out
    assert "make images" in out


def test_optimize_dag_in_docker_promotes_from_a_model_uri(docker_home, mlflow_server, images, example_model):
    """modelopt_optimize as a user triggers it: URIs of a model already in MLflow, steps in containers."""
    steps = optimize_in_docker(docker_home, mlflow_server, example_model, ["onnx_fp32", "onnx_int8_dynamic"],
                               "digits-optimize-docker")
    client = mlflow_server.client()
    assert {run.data.tags["modelopt.execution_mode"] for run in steps.values()} == {"docker"}
    assert steps["optimize.onnx_int8_dynamic"].data.tags["modelopt.image"] == BASE_IMAGE
    versions = client.search_model_versions("name = 'digits-optimize-docker'")
    assert sorted(v.tags["modelopt.target"] for v in versions) == ["onnx_fp32", "onnx_int8_dynamic"]
    champion = client.get_model_version_by_alias("digits-optimize-docker", "champion")
    assert champion.tags["modelopt.target"] in ("onnx_fp32", "onnx_int8_dynamic")


def test_step_container_runs_without_privileges_on_a_read_only_root(mlflow_server, images):
    """What the engine ran: a read-only root with a tmpfs on /tmp, no capabilities, no new
    privileges, the images' non-root user. The step reaches MLflow and exits 2 (no such run), so
    it ran far enough to import its stack and write its temp files on that root."""
    import docker
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_modelopt.hooks.mlflow import TrackingConfig
    from airflow_modelopt.operators import TorchToOnnxOperator
    from airflow_modelopt.operators.launchers import DockerLauncher

    op = TorchToOnnxOperator(task_id="hardened", model_uri="runs:/00000000000000000000000000000000/model/model.pt2",
                             input_shapes={"x": [1, 1, 8, 8]},
                             docker_kwargs={"auto_remove": "never", "network_mode": "host"})
    tracking = TrackingConfig(mlflow_server.uri, {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    launcher = DockerLauncher(op.launch_request(op.build_spec(None, mode="docker"), tracking))
    with pytest.raises(AirflowFailException, match="exit code 2"):
        launcher.launch({})
    container = docker.from_env().containers.get(launcher.docker_operator.container["Id"])
    try:
        host, cfg = container.attrs["HostConfig"], container.attrs["Config"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges:true"]
        assert list(host["Tmpfs"]) == ["/tmp"]
        assert not host["Privileged"]
        assert cfg["User"] == "modelopt"
        assert "HOME=/tmp" in cfg["Env"]
    finally:
        container.remove(force=True)
