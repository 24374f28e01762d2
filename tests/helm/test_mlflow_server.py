"""The `mlflow server` invocation the chart renders, run for real against PostgreSQL.

No cluster runs here, so the Deployment's own command, arguments and environment are taken from
`helm template` and run on the host with this environment's mlflow, against a real PostgreSQL
(initdb/pg_ctl in a temporary folder) whose role, password and database are the ones in the
chart's generated Secret. Only what is specific to the pod is swapped: the bind address (0.0.0.0
becomes 127.0.0.1), the port, the artifact claim's mount path and the emptyDir at /tmp, and the
database host (the Service name becomes 127.0.0.1). The auth-config init container's script runs
first, as in the pod, writing the basic-auth app's ini. A wrong flag, a URI the driver cannot
parse, an ini the auth app cannot read, a Host check that refuses the in-cluster name or a server
that answers without credentials fails here, as it would in the pod.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Postgres, free_port, wait_http
from tests.helm.conftest import IN_CLUSTER_URI, MLFLOW, NAMESPACE, POSTGRESQL, RELEASE, Helm, Manifests

pytestmark = [pytest.mark.helm, pytest.mark.timeout(480)]

MLFLOW_EXE = Path(sys.executable).with_name("mlflow")


def _request(url: str, *, host: str | None = None, method: str = "GET", body: bytes | None = None,
             content_type: str = "application/json", auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if host:
        headers["Host"] = host
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2:]]


def _container_env(manifests: Manifests, container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet would give it: Secret references resolved."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = manifests.secret_data(ref["name"])[ref["key"]]
    return env


def test_rendered_mlflow_server_runs_on_postgres(helm: Helm, postgres: Postgres, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.engine import make_url

    if not MLFLOW_EXE.exists():
        pytest.skip(f"no mlflow executable next to {sys.executable}")
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("the chart runs MLflow's basic-auth app, which needs Flask-WTF (pip install 'mlflow[auth]')")
    # A password with URL-special characters: it must survive the URI the chart builds, and the
    # %-escapes in it the ini file the auth app reads that URI from (configparser interpolates %).
    password = f"p@ss/{secrets.token_hex(4)}:%x"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"postgresql": {"auth": {"password": password}}}))
    manifests: Manifests = helm.render("-f", str(values))

    # The database the chart's StatefulSet would create: its role, password and database.
    uri = make_url(manifests.secret_data(POSTGRESQL)["backend-store-uri"])
    admin = postgres.connect(host=postgres.socket_dir, user="postgres", dbname="postgres")
    admin.autocommit = True  # CREATE DATABASE refuses to run in a transaction
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE ROLE "{uri.username}" LOGIN PASSWORD %s', (uri.password,))
            cur.execute(f'CREATE DATABASE "{uri.database}" OWNER "{uri.username}"')
    finally:
        admin.close()

    # The Deployment's containers, as rendered.
    pod = manifests.one("Deployment", MLFLOW)["spec"]["template"]["spec"]
    container = manifests.container("Deployment", MLFLOW, "mlflow")
    init = next(c for c in pod["initContainers"] if c["name"] == "auth-config")
    command, args = container["command"], container["args"]
    env = _container_env(manifests, container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    # Swap only what belongs to the pod: addresses, and the volumes for folders of the test's.
    port, scratch, artifacts, auth_dir = free_port(), tmp_path / "tmp", tmp_path / "artifacts", tmp_path / "auth"
    scratch.mkdir()
    auth_dir.mkdir()
    volumes = {mounts["tmp"]: str(scratch), mounts["auth-config"]: str(auth_dir)}

    def local(env: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, value in env.items():
            if value in volumes:
                value = volumes[value]
            elif os.path.dirname(value) in volumes:
                value = os.path.join(volumes[os.path.dirname(value)], os.path.basename(value))
            elif value.startswith("postgresql"):
                assert make_url(value).host == f"{POSTGRESQL}.{NAMESPACE}.svc.cluster.local"
                value = make_url(value).set(host=postgres.host, port=postgres.port).render_as_string(hide_password=False)
            out[key] = value
        return out

    assert args[args.index("--artifacts-destination") + 1] == mounts["artifacts"]
    run_args = _swap(_swap(_swap(args, "--host", "127.0.0.1"), "--port", str(port)),
                     "--artifacts-destination", str(artifacts))
    env = local(env)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # This host is shared: a worker still importing the auth app on a loaded machine misses
    # uvicorn's 5 s health check and is killed, again and again. A pod has its own CPU.
    base_env["UVICORN_TIMEOUT_WORKER_HEALTHCHECK"] = "120"

    # The init container writes the auth app's ini (its database: MLflow's own, by default).
    init_env = local(_container_env(manifests, init))
    assert init["command"][0] == "sh"
    done = subprocess.run(init["command"], env={**base_env, **init_env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert init_env["MLFLOW_AUTH_CONFIG_PATH"] == env["MLFLOW_AUTH_CONFIG_PATH"]
    assert os.stat(env["MLFLOW_AUTH_CONFIG_PATH"]).st_mode & 0o077 == 0  # the URI's password: owner only

    assert command[0] == "mlflow"
    argv = [str(MLFLOW_EXE), *command[1:], *run_args]
    cwd = scratch if container.get("workingDir") == mounts["tmp"] else tmp_path
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(argv, env={**base_env, **env}, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    # The credentials the provider hands the step pods (the chart's Secret for them).
    step_env = manifests.secret_data(f"{MLFLOW}-credentials")
    creds = (step_env["MLFLOW_TRACKING_USERNAME"], step_env["MLFLOW_TRACKING_PASSWORD"])
    try:
        try:
            wait_http(f"{base}/health", timeout=300, proc=proc)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n{(tmp_path / 'mlflow.log').read_text()[-4000:]}")
        status, body = _request(f"{base}/health")  # the kubelet's probes carry no credentials
        assert (status, body.strip()) == (200, b"OK")

        # A client in the cluster sends the Service's name as Host; the server must accept it...
        in_cluster_host = IN_CLUSTER_URI.split("//", 1)[1]
        name = f"helm-chart-{secrets.token_hex(4)}"
        create = f"{base}/api/2.0/mlflow/experiments/create"
        # ... but only with credentials: anything else in the cluster gets 401, a wrong password too.
        for auth in (None, (creds[0], creds[1] + "x"), ("mallory", creds[1])):
            status, _ = _request(create, host=in_cluster_host, method="POST", body=json.dumps({"name": name}).encode(),
                                 auth=auth)
            assert status == 401, auth and auth[0]
        status, body = _request(create, host=in_cluster_host, method="POST", body=json.dumps({"name": name}).encode(),
                                auth=creds)
        assert status == 200, body
        experiment_id = json.loads(body)["experiment_id"]
        status, body = _request(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                                host=in_cluster_host, auth=creds)
        assert status == 200, body
        # artifacts are proxied (mlflow-artifacts:/), so step pods need no shared disk
        assert json.loads(body)["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
        put = f"{base}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/check/hello.txt"
        status, _ = _request(put, host=in_cluster_host, method="PUT", body=b"hello", content_type="text/plain")
        assert status == 401  # the artifact proxy is behind the same door
        status, body = _request(put, host=in_cluster_host, method="PUT", body=b"hello", content_type="text/plain",
                                auth=creds)
        assert status == 200, body
        assert (artifacts / experiment_id / "check" / "hello.txt").read_bytes() == b"hello"

        # ... and refuse a name it does not serve (the Host check is on, not "*").
        status, _ = _request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
                             host="mlflow.attacker.example", auth=creds)
        assert status == 403

        # MLflow's own client with the variables the step pods get moves `champion`; without
        # them it cannot.
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        for key, value in step_env.items():
            monkeypatch.setenv(key, value)
        client = MlflowClient(tracking_uri=base)
        run = client.create_run(experiment_id)
        model = f"{name}-model"
        client.create_registered_model(model)
        version = client.create_model_version(model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_registered_model_alias(model, "champion", version.version)
        assert client.get_model_version_by_alias(model, "champion").version == version.version
        for key in step_env:
            monkeypatch.delenv(key)
        with pytest.raises(MlflowException, match="401|[Uu]nauthorized|credentials"):
            MlflowClient(tracking_uri=base).set_registered_model_alias(model, "champion", version.version)

        # The experiment and the users are in PostgreSQL, written with the Secret's credentials.
        with postgres.connect(user=uri.username, password=uri.password, dbname=uri.database) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT experiment_id FROM experiments WHERE name = %s", (name,))
                assert [str(row[0]) for row in cur.fetchall()] == [experiment_id]
                cur.execute("SELECT username, is_admin FROM users")
                assert cur.fetchall() == [(creds[0], True)]
        conn.close()
        # no password reached the command line
        for secret in (password, uri.password, creds[1], env["MLFLOW_FLASK_SERVER_SECRET_KEY"]):
            assert secret not in " ".join(argv + init["command"])
        # Airflow's connection carries the same account
        from airflow.models.connection import Connection

        conn_uri = manifests.secret_data(f"{RELEASE}-connection")["AIRFLOW_CONN_MLFLOW_DEFAULT"]
        airflow_conn = Connection(conn_id="mlflow_default", uri=conn_uri)
        assert (airflow_conn.login, airflow_conn.password) == creds
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group it leads
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
