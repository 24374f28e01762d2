"""The `mlflow server` invocation the chart renders, run for real against PostgreSQL.

No cluster runs here, so the Deployment's own command, arguments and environment are taken from
`helm template` and run on the host with this environment's mlflow, against a real PostgreSQL
(initdb/pg_ctl in a temporary folder) whose role, password and database are the ones in the
chart's generated Secret. Only what is specific to the pod is swapped: the bind address (0.0.0.0
becomes 127.0.0.1), the port, the artifact claim's mount path and the emptyDir at /tmp, and the
database host (the Service name becomes 127.0.0.1). A wrong flag, a URI the driver cannot parse
or a Host check that refuses the in-cluster name fails here, as it would in the pod.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, wait_http
from tests.helm.conftest import IN_CLUSTER_URI, MLFLOW, NAMESPACE, POSTGRESQL, Helm, Manifests

pytestmark = [pytest.mark.helm, pytest.mark.timeout(240)]

MLFLOW_EXE = Path(sys.executable).with_name("mlflow")


@dataclass
class Postgres:
    host: str
    port: int
    socket_dir: str

    def connect(self, **kwargs: Any) -> Any:
        import psycopg2

        return psycopg2.connect(host=kwargs.pop("host", self.host), port=self.port, **kwargs)


def postgres_unavailable() -> str | None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if shutil.which(tool) is None]
    if missing:
        return f"PostgreSQL server tools not on PATH: {', '.join(missing)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user 'nobody' to run PostgreSQL as"
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1: superuser over the socket (trust), others by password."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(f"running the rendered MLflow server needs PostgreSQL: {reason}")
    root = Path(tempfile.mkdtemp(prefix="modelopt-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data, port = root / "data", free_port()
    try:
        subprocess.run(["initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120, cwd=root, **run_as)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(["pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60",
                        "start"], check=True, capture_output=True, timeout=90, cwd=root, **run_as)
    except subprocess.CalledProcessError as exc:
        log = (root / "postgres.log").read_text()[-2000:] if (root / "postgres.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"{exc.cmd[0]} failed: {exc.stderr.decode()[-2000:]}\n{log}")
    try:
        yield Postgres("127.0.0.1", port, str(root))
    finally:
        subprocess.run(["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60, cwd=root, **run_as)
        shutil.rmtree(root, ignore_errors=True)


def _request(url: str, *, host: str | None = None, method: str = "GET", body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if host:
        headers["Host"] = host
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2:]]


def test_rendered_mlflow_server_runs_on_postgres(helm: Helm, postgres: Postgres, tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    if not MLFLOW_EXE.exists():
        pytest.skip(f"no mlflow executable next to {sys.executable}")
    # A password with URL-special characters: it must survive the URI the chart builds.
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

    # The Deployment's container, as rendered.
    container = manifests.container("Deployment", MLFLOW, "mlflow")
    command, args = container["command"], container["args"]
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = manifests.secret_data(ref["name"])[ref["key"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    # Swap only what belongs to the pod.
    port, scratch, artifacts = free_port(), tmp_path / "tmp", tmp_path / "artifacts"
    scratch.mkdir()
    assert args[args.index("--artifacts-destination") + 1] == mounts["artifacts"]
    run_args = _swap(_swap(_swap(args, "--host", "127.0.0.1"), "--port", str(port)),
                     "--artifacts-destination", str(artifacts))
    store = make_url(env["MLFLOW_BACKEND_STORE_URI"])
    assert store.host == f"{POSTGRESQL}.{NAMESPACE}.svc.cluster.local"
    env["MLFLOW_BACKEND_STORE_URI"] = store.set(host=postgres.host, port=postgres.port).render_as_string(hide_password=False)
    env = {k: (str(scratch) if v == mounts["tmp"] else v) for k, v in env.items()}
    assert command[0] == "mlflow"
    argv = [str(MLFLOW_EXE), *command[1:], *run_args]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cwd = scratch if container.get("workingDir") == mounts["tmp"] else tmp_path
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(argv, env={**base_env, **env}, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(f"{base}/health", timeout=150, proc=proc)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n{(tmp_path / 'mlflow.log').read_text()[-4000:]}")
        status, body = _request(f"{base}/health")
        assert (status, body.strip()) == (200, b"OK")

        # A client in the cluster sends the Service's name as Host; the server must accept it.
        in_cluster_host = IN_CLUSTER_URI.split("//", 1)[1]
        name = f"helm-chart-{secrets.token_hex(4)}"
        status, body = _request(f"{base}/api/2.0/mlflow/experiments/create", host=in_cluster_host, method="POST",
                                body=json.dumps({"name": name}).encode())
        assert status == 200, body
        experiment_id = json.loads(body)["experiment_id"]
        status, body = _request(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                                host=in_cluster_host)
        assert status == 200, body
        # artifacts are proxied (mlflow-artifacts:/), so step pods need no shared disk
        assert json.loads(body)["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
        status, body = _request(f"{base}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/check/hello.txt",
                                host=in_cluster_host, method="PUT", body=b"hello", content_type="text/plain")
        assert status == 200, body
        assert (artifacts / experiment_id / "check" / "hello.txt").read_bytes() == b"hello"

        # ... and refuse a name it does not serve (the Host check is on, not "*").
        status, _ = _request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
                             host="mlflow.attacker.example")
        assert status == 403

        # The experiment is in PostgreSQL, written with the Secret's credentials.
        with postgres.connect(user=uri.username, password=uri.password, dbname=uri.database) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT experiment_id FROM experiments WHERE name = %s", (name,))
                assert [str(row[0]) for row in cur.fetchall()] == [experiment_id]
        conn.close()
        # the password never reached the command line
        assert password not in " ".join(argv) and uri.password not in " ".join(argv)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group it leads
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
