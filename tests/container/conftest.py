"""Fixtures of the container tier: the project's images and Airflow homes whose steps run in Docker.

The tracking server runs on the host's loopback, so containers use host networking
([modelopt] docker_network_mode=host) and reach it over HTTP: no shared disk.
"""

from __future__ import annotations

import subprocess

import pytest

from airflow_modelopt import __version__
from tests.conftest import REPO, AirflowHome, make_airflow_home

IMAGES = {family: f"airflow-modelopt-{family}:{__version__}" for family in ("base", "torch", "tensorflow")}


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
