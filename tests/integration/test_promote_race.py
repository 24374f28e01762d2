"""Concurrent promotions against a real MLflow server backed by a real PostgreSQL: copies of the
same promotion started together register each candidate once, and alias moves are serialised
(the champion ends on the best candidate whatever order the promotions ran in)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import MLFLOW_SERVER_TEST_ENV, MlflowServer, Postgres, free_port, run_step, wait_http

pytestmark = pytest.mark.timeout(1500)

COPIES = 4


@pytest.fixture(scope="module")
def pg_mlflow(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:  # noqa: F811
    """`mlflow server --serve-artifacts` whose backend store is the PostgreSQL above (psycopg2)."""
    admin = postgres.connect(host=postgres.socket_dir, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow_race")
    admin.close()
    root = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    backend = f"postgresql+psycopg2://postgres@/mlflow_race?host={postgres.socket_dir}&port={postgres.port}"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts"),
             "--serve-artifacts", "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **MLFLOW_SERVER_TEST_ENV},
        )
    try:
        wait_http(f"{uri}/health", timeout=900, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield MlflowServer(uri, root)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_folders(pg_mlflow: MlflowServer) -> dict[str, str]:
    """Three small artifact folders logged to one run: runs:/ URIs the candidates point at."""
    client = pg_mlflow.client()
    exp = client.create_experiment("race-models")
    run = client.create_run(exp)
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in ("onnx_fp32", "onnx_int8_dynamic", "tflite_int8"):
            folder = Path(tmp, target)
            folder.mkdir()
            (folder / "model.bin").write_bytes(target.encode() * 100)
            client.log_artifacts(run.info.run_id, str(folder), target)
            uris[target] = f"runs:/{run.info.run_id}/{target}"
    client.set_terminated(run.info.run_id)
    return uris


def _spec(name: str, candidates: list[dict], run_id: str) -> dict:
    return {"registered_model_name": name, "candidates": candidates, "write_summary": False,
            "context": {"experiment_name": "race-promote", "dag_id": "race", "run_id": run_id, "force": True}}


def _candidate(target: str, uri: str, latency: float, key: str) -> dict:
    return {"target": target, "model_uri": uri, "passed": True, "candidate_key": key,
            "metrics": {"latency_ms_p50": latency, "model_bytes": 1000.0, "accuracy_drop": 0.0}}


def _together(server: MlflowServer, specs: list[dict]) -> list:
    env = {**server.env(), "MODELOPT_MLFLOW_CONNECT_RETRIES": "20"}
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(lambda s: run_step("promote", s, env, timeout=400), specs))


def test_copies_of_one_promotion_register_each_candidate_once(pg_mlflow, model_folders):
    name = "race-same-spec"
    candidates = [_candidate(t, uri, latency=float(i + 1), key=f"key-{t}") for i, (t, uri) in
                  enumerate(sorted(model_folders.items()))]
    runs = _together(pg_mlflow, [_spec(name, candidates, f"manual__copy{i}") for i in range(COPIES)])
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
    versions = pg_mlflow.client().search_model_versions(f"name = '{name}'")
    per_key = Counter(v.tags["modelopt.candidate_key"] for v in versions)
    assert per_key == {f"key-{t}": 1 for t in model_folders}, f"duplicate versions: {per_key}"
    # Every copy reports the one surviving version of each target.
    registered = {v.tags["modelopt.target"]: int(v.version) for v in versions}
    for run in runs:
        reported = {row["target"]: row["version"] for row in run.result["info"]["candidates"]}
        assert reported == registered
    assert sum(run.result["metrics"]["registered_now"] for run in runs) == len(model_folders)
    client = pg_mlflow.client()
    for target, version in registered.items():
        assert int(client.get_model_version_by_alias(name, target).version) == version
    assert int(client.get_model_version_by_alias(name, "champion").version) == min(
        registered.values(), key=lambda v: [c["metrics"]["latency_ms_p50"] for c in candidates
                                            if registered[c["target"]] == v][0])
    assert not [m for m in client.search_registered_models() if m.name.startswith(f"{name}.")], "a lock was left"


def test_concurrent_generations_leave_the_best_as_champion(pg_mlflow, model_folders):
    """Different candidates promoted at once: serialised alias moves compare each with the champion
    the previous one left, so the fastest ends as champion whatever the order."""
    name = "race-generations"
    uri = model_folders["onnx_fp32"]
    latencies = [4.0, 1.0, 3.0, 2.0]
    specs = [_spec(name, [_candidate("onnx_fp32", uri, latency=lat, key=f"gen-{lat}")], f"manual__gen{i}")
             for i, lat in enumerate(latencies)]
    runs = _together(pg_mlflow, specs)
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
    client = pg_mlflow.client()
    champion = client.get_model_version_by_alias(name, "champion")
    assert float(champion.tags["modelopt.metric.latency_ms_p50"]) == 1.0
    assert len(client.search_model_versions(f"name = '{name}'")) == len(latencies)


def test_a_stale_lock_is_broken_and_a_live_one_waited_for(pg_mlflow, model_folders):
    """A promotion that died holding the lock does not block the next one past its lease."""
    from airflow_modelopt.container.steps.promote import LOCK_SUFFIX, TAG_LEASE_EXPIRES

    name = "race-stale-lock"
    client = pg_mlflow.client()
    client.create_registered_model(f"{name}{LOCK_SUFFIX}", tags={TAG_LEASE_EXPIRES: "1", "modelopt.lock_holder": "dead"})
    spec = _spec(name, [_candidate("onnx_fp32", model_folders["onnx_fp32"], 1.0, "stale")], "manual__stale")
    run = run_step("promote", spec, pg_mlflow.env())
    assert run.returncode == 0, run.output[-3000:]
    assert "stale" in run.output and "lock" in run.output
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found|does not exist"):
        client.get_registered_model(f"{name}{LOCK_SUFFIX}")
