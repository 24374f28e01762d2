"""Fixtures of the container tier: the project's images and Airflow homes whose steps run in Docker.

The tracking server runs on the host's loopback, so containers use host networking
([modelopt] docker_network_mode=host) and reach it over HTTP: no shared disk.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from airflow_modelopt import __version__
from tests.conftest import REPO, AirflowHome, make_airflow_home
from tests.integration.test_dag_local import step_runs_of_latest_dag_run

IMAGES = {family: f"airflow-modelopt-{family}:{__version__}" for family in ("base", "torch", "tensorflow", "openvino")}


@pytest.fixture(scope="session")
def images(docker_engine) -> dict[str, str]:
    """Image ID per family; fails (not skips) when an image is missing: the tier exists to run them."""
    ids = {}
    for family, image in IMAGES.items():
        proc = subprocess.run(["docker", "image", "inspect", image, "--format", "{{.Id}}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"image {image} is not built; run `make images` first")
        ids[family] = proc.stdout.strip()
    return ids


def docker_env(mlflow_server, **extra: str) -> dict[str, str]:
    return {"AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server.uri, "AIRFLOW__MODELOPT__DOCKER_NETWORK_MODE": "host",
            **extra}


@pytest.fixture(scope="session")
def docker_home(tmp_path_factory, mlflow_server, images) -> AirflowHome:
    """An Airflow home with the project's DAGs (dags/)."""
    return make_airflow_home(tmp_path_factory.mktemp("airflow-docker"), docker_env(mlflow_server))


@pytest.fixture(scope="session")
def test_dags_home(tmp_path_factory, mlflow_server, images) -> AirflowHome:
    """An Airflow home with the container tier's own DAGs (tests/container/dags/)."""
    return make_airflow_home(tmp_path_factory.mktemp("airflow-test-dags"), docker_env(
        mlflow_server, AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "tests" / "container" / "dags")))


def optimize_in_docker(home: AirflowHome, mlflow_server, example_model, targets: list[str],
                       registered_model_name: str) -> dict[str, object]:
    """modelopt_optimize as a user triggers it (URIs of a model already in MLflow, steps in
    containers); returns the DAG run's step runs by task id."""
    artifacts = example_model["artifacts"]
    conf = {"model_uri": artifacts["model_pt2"], "calibration_data_uri": artifacts["calibration_data"],
            "eval_data_uri": artifacts["eval_data"], "targets": targets,
            "registered_model_name": registered_model_name, "execution_mode": "docker"}
    proc = home.run("dags", "test", "modelopt_optimize", "-c", json.dumps(conf))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return step_runs_of_latest_dag_run(mlflow_server.client(), "modelopt_optimize")[1]
