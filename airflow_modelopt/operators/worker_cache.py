"""The cache lookup on the Airflow worker: a task whose result is cached starts no step process.

Before a step operator launches anything, it computes the step's cache key here, with the same
function the step would (``caching.cache_key``: step, parameters, input content digests, the
container code's digest, the image's digest in docker mode, the hardware for measuring steps), and
asks MLflow for a finished, successful run with that key. On a hit it records the reuse exactly as
the step does (a nested run under the DAG run's parent run with the same tags, ``modelopt.verdict``
included, its ``modelopt/result.json``) and returns the same result, so XCom and every downstream task
see what a step-side hit gives. Whatever it cannot establish for certain is a miss, and the step is
launched as before, which looks again and does the work (:class:`Uncertain` says why, in the log):

* input digests come without downloading: the digest of a ``runs:/<run>/<path>`` input, recorded on
  its FINISHED run, or of a logged model ``models:/<model id>``, recorded on the READY model, by the
  first step that hashed it (``tracking.record_digest``); a local path (local mode only) is hashed
  here. Any other URI (``models:/<name>/<version>``, ``s3://``), or no record yet: a miss.
* the code digest: local mode computes it from this installation, when the step would run in this
  interpreter; docker mode reads it from a run that recorded it for the same image digest (the image
  is inspected, never pulled); kubernetes mode cannot know the image's content: always a miss.
* MLflow over HTTP(S) only, through the REST API with the standard library (no MLflow import: it
  costs seconds per task process); a failing or slow request is a miss, never a task failure.
* a retried task whose earlier try left a run open, and ``force``, go to the step.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_modelopt import caching
from airflow_modelopt.specs import StepResult, StepSpec
from airflow_modelopt.uris import uri_scheme

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping

    from airflow_modelopt.hooks.mlflow import TrackingConfig

#: Seconds one MLflow request of the lookup may take before the lookup gives up (and the step runs).
REQUEST_TIMEOUT_S = 10.0


class Uncertain(Exception):  # noqa: N818 - not an error: the reason the lookup leaves it to the step
    """The lookup cannot decide for certain; the step is launched and decides."""


#: What a worker process has learned from MLflow that does not change: an experiment's id, the
#: content digest recorded on a finished run or a ready logged model, a DAG run's parent run. Under
#: ``airflow dags test`` every task of a DAG run shares it, and each lookup saves a few requests.
_known: dict[tuple[str, ...], str] = {}


class MlflowRest:
    """The few MLflow tracking REST calls the lookup needs, with the connection's credentials."""

    def __init__(self, tracking: TrackingConfig, timeout: float = REQUEST_TIMEOUT_S) -> None:
        uri = tracking.tracking_uri
        if not uri.startswith(("http://", "https://")):
            raise Uncertain(f"the tracking store is not an HTTP server ({tracking.source})")
        self.base = uri.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        secret = tracking.secret_env
        if secret.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {secret['MLFLOW_TRACKING_TOKEN']}"
        elif secret.get("MLFLOW_TRACKING_USERNAME") and secret.get("MLFLOW_TRACKING_PASSWORD"):
            pair = f"{secret['MLFLOW_TRACKING_USERNAME']}:{secret['MLFLOW_TRACKING_PASSWORD']}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        insecure = str(tracking.public_env.get("MLFLOW_TRACKING_INSECURE_TLS", "")).lower() == "true"
        self.ssl = ssl._create_unverified_context() if insecure else None  # noqa: S323 - the user asked

    def request(self, method: str, url: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise Uncertain(f"MLflow answered HTTP {exc.code} to {method} {urllib.parse.urlsplit(url).path}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Uncertain(f"MLflow did not answer ({getattr(exc, 'reason', exc)})") from None

    def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.base}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        raw = self.request(method, url, json.dumps(body).encode() if body is not None else None)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise Uncertain(f"MLflow's answer to {endpoint} is not JSON") from None

    # -- runs and experiments -------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        memo = ("experiment", self.base, name)
        if memo in _known:
            return _known[memo]
        try:
            answer = self.call("GET", "experiments/get-by-name", query={"experiment_name": name})
        except Uncertain as exc:
            if "HTTP 404" in str(exc):
                raise Uncertain(f"experiment {name!r} does not exist yet") from None
            raise
        _known[memo] = str(answer["experiment"]["experiment_id"])
        return _known[memo]

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", "runs/get", query={"run_id": run_id})["run"]

    def search(self, experiment_id: str, filter_string: str, max_results: int,
               order_by: list[str] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"experiment_ids": [experiment_id], "filter": filter_string,
                                "max_results": max_results, "run_view_type": "ACTIVE_ONLY"}
        if order_by:
            body["order_by"] = order_by
        return list(self.call("POST", "runs/search", body).get("runs") or [])

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str) -> dict[str, Any]:
        body = {"experiment_id": experiment_id, "user_id": tags.get("mlflow.user", "unknown"),
                "start_time": int(time.time() * 1000), "run_name": run_name,
                "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        return self.call("POST", "runs/create", body)["run"]

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.call("POST", "runs/set-tag", {"run_id": run_id, "key": key, "value": value})

    def terminate(self, run_id: str, status: str) -> None:
        self.call("POST", "runs/update", {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    def delete_run(self, run_id: str) -> None:
        self.call("POST", "runs/delete", {"run_id": run_id})

    # -- artifacts (the server's proxied store, or a folder this worker reaches) ------------------

    def _artifact_location(self, run: dict[str, Any], path: str) -> str | Path:
        root = str(run["info"].get("artifact_uri") or "")
        if root.startswith("mlflow-artifacts:/") and not root.startswith("mlflow-artifacts://"):
            rest = root[len("mlflow-artifacts:"):].strip("/")
            return f"{self.base}/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(rest)}/{path}"
        if uri_scheme(root) in ("", "file"):
            folder = Path(root[len("file://"):] if root.startswith("file://") else root)
            if folder.is_absolute() and (folder.is_dir() or folder.parent.is_dir()):
                return folder / path
        raise Uncertain(f"artifacts at {root.split('://')[0]}:// are not read on the worker")

    def read_artifact(self, run: dict[str, Any], path: str) -> bytes:
        where = self._artifact_location(run, path)
        if isinstance(where, Path):
            try:
                return where.read_bytes()
            except OSError as exc:
                raise Uncertain(f"cannot read {path} of run {run['info']['run_id']}: {exc}") from None
        return self.request("GET", where)

    def write_artifact(self, run: dict[str, Any], path: str, data: bytes) -> None:
        where = self._artifact_location(run, path)
        if isinstance(where, Path):
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_bytes(data)
            return
        self.request("PUT", where, data, content_type="application/json")


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in (run.get("data") or {}).get("tags") or []}


# -- the parts of the key this worker can know -----------------------------------------------------

_code_memo: dict[tuple[Any, ...], str] = {}


def local_code_digest() -> str:
    """``caching.code_digest`` of this installation, recomputed when any source file changed (by
    size or modification time), so a worker that runs many tasks hashes the sources once."""
    package = Path(caching.__file__).resolve().parent
    stamp: list[Any] = []
    for root in (package / "container", package / "specs"):
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            stamp.append((str(path), st.st_size, st.st_mtime_ns))
    st = Path(caching.__file__).stat()
    key = (*stamp, (caching.__file__, st.st_size, st.st_mtime_ns))
    if key not in _code_memo:
        _code_memo.clear()
        _code_memo[key] = caching.local_code_digest()
    return _code_memo[key]


def local_input_digest(uri: str, field: str) -> str:
    """Digest of a local path input, as the step would compute it (local mode reads it in place)."""
    path = Path(uri[len("file://"):] if uri_scheme(uri) == "file" else uri).expanduser()
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise Uncertain(f"{field}: {uri} is not there to hash (the step reports it)")
    return caching.digest(path)


class WorkerCache:
    """One task's lookup. ``image``, ``image_digest`` and ``code_from``: what the launcher knows of
    the image the step would run in (``Launcher.known_image``)."""

    def __init__(self, rest: MlflowRest, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.rest = rest
        self.log = log
        self._runs: dict[str, dict[str, Any]] = {}

    def run(self, run_id: str) -> dict[str, Any]:
        if run_id not in self._runs:
            self._runs[run_id] = self.rest.get_run(run_id)
        return self._runs[run_id]

    def recorded_digest(self, kind: str, ident: str, tag: str) -> str | None:
        """The digest recorded on a FINISHED run or a READY logged model (``caching.digest_record``)."""
        memo = ("digest", self.rest.base, kind, ident, tag)
        if memo in _known:
            return _known[memo]
        if kind == "run":
            run = self.run(ident)
            found = tags_of(run).get(tag) if run["info"].get("status") == "FINISHED" else None
        else:
            info = self.rest.call("GET", f"logged-models/{urllib.parse.quote(ident)}").get("model", {}).get("info", {})
            if str(info.get("status", "")).upper() not in ("LOGGED_MODEL_READY", "READY"):
                return None
            found = {t["key"]: t.get("value", "") for t in info.get("tags") or []}.get(tag)
        if found:
            _known[memo] = found
        return found

    def input_digests(self, spec: StepSpec) -> dict[str, str]:
        digests = {}
        for name in spec.input_fields:
            value = getattr(spec, name)
            if not value:
                continue
            record = caching.digest_record(value)
            if record is not None:
                recorded = self.recorded_digest(*record)
                if not recorded:
                    raise Uncertain(f"{name}: no content digest recorded for {value}")
                digests[name] = recorded
            elif uri_scheme(value) in ("", "file") and spec.context.execution_mode == "local":
                digests[name] = local_input_digest(value, name)
            else:
                raise Uncertain(f"{name}: {uri_scheme(value) or 'a path'} inputs are hashed by the step")
        return digests

    def code_digest(self, spec: StepSpec, experiment_id: str, python: str | None) -> str:
        mode = spec.context.execution_mode
        if mode == "local":
            if python and os.path.abspath(python) != os.path.abspath(sys.executable):
                raise Uncertain(f"the step runs in another interpreter ({python}), whose code is not hashed here")
            return local_code_digest()
        if mode == "docker" and spec.context.image_digest:
            query = f"tags.`{caching.TAG_IMAGE_DIGEST}` = '{spec.context.image_digest}'"
            for run in self.rest.search(experiment_id, query, 20, ["attributes.start_time DESC"]):
                code = tags_of(run).get(caching.TAG_CODE_DIGEST)
                if code:
                    return code
            raise Uncertain(f"no run recorded the code digest of image {spec.context.image_digest[:19]}")
        raise Uncertain(f"the content of the {mode} image is not known before it runs")

    def parent_run(self, experiment_id: str, spec: StepSpec) -> str | None:
        """``tracking.get_or_create_parent_run`` over REST: one parent per DAG run, oldest wins."""
        ctx = spec.context
        if ctx.parent_run_id:
            return ctx.parent_run_id
        if not ctx.dag_id or not ctx.run_id:
            return None
        memo = ("parent", self.rest.base, experiment_id, ctx.dag_id, ctx.run_id)
        if memo in _known:
            return _known[memo]
        query = (f"tags.`{caching.TAG_ROLE}` = 'dag_run' and tags.`{caching.TAG_DAG_ID}` = '{_q(ctx.dag_id)}' "
                 f"and tags.`{caching.TAG_RUN_ID}` = '{_q(ctx.run_id)}'")

        def find() -> list[dict[str, Any]]:
            runs = self.rest.search(experiment_id, query, 50)
            return sorted(runs, key=lambda r: (int(r["info"].get("start_time") or 0), r["info"]["run_id"]))

        existing = find()
        if existing:
            _known[memo] = existing[0]["info"]["run_id"]
            return _known[memo]
        tags = {caching.TAG_ROLE: "dag_run", caching.TAG_DAG_ID: ctx.dag_id, caching.TAG_RUN_ID: ctx.run_id}
        if ctx.logical_date:
            tags[caching.TAG_LOGICAL_DATE] = ctx.logical_date
        mine = self.rest.create_run(experiment_id, tags, f"{ctx.dag_id} {ctx.run_id}")["info"]["run_id"]
        keeper = find()[0]["info"]["run_id"]
        if keeper != mine:
            self.rest.delete_run(mine)
        self.log.info("Parent MLflow run for DAG run %s: %s", ctx.run_id, keeper)
        _known[memo] = keeper
        return keeper

    def check_no_open_runs(self, experiment_id: str, spec: StepSpec) -> None:
        ctx = spec.context
        if ctx.try_number <= 1 or not (ctx.dag_id and ctx.run_id and ctx.task_id):
            return
        query = (f"tags.`{caching.TAG_ROLE}` = 'step' and tags.`{caching.TAG_DAG_ID}` = '{_q(ctx.dag_id)}' "
                 f"and tags.`{caching.TAG_RUN_ID}` = '{_q(ctx.run_id)}' "
                 f"and tags.`{caching.TAG_TASK_ID}` = '{_q(ctx.task_id)}' and attributes.status = 'RUNNING'")
        if self.rest.search(experiment_id, query, 5):
            raise Uncertain("an earlier try left its run open; the step closes it")

    def lookup(self, spec: StepSpec, *, python: str | None = None,
               environ: Mapping[str, str] | None = None) -> StepResult:
        """The reused result, recorded as this task's run; :class:`Uncertain` when not certain.
        ``environ``: the environment the step process would get (what the key may depend on)."""
        started = time.monotonic()
        if not spec.cacheable or spec.context.force:
            raise Uncertain("force" if spec.context.force else "the step is never cached")
        if spec.cache_per_machine and spec.context.execution_mode != "local":
            raise Uncertain("the step measures the machine it runs on, which is not this worker")
        experiment_id = self.rest.experiment_id(spec.context.experiment_name)
        digests = self.input_digests(spec)
        code = self.code_digest(spec, experiment_id, python)
        key = caching.cache_key(spec, digests, code=code, environ=environ)
        hit = next((r for r in self.rest.search(experiment_id, caching.cached_filter(key), 5,
                                                ["attributes.start_time DESC"])
                    if tags_of(r).get(caching.TAG_CACHE_HIT) != "true"), None)
        if hit is None:
            raise Uncertain(f"no finished run with cache key {key[:16]}")
        self.check_no_open_runs(experiment_id, spec)
        hit_id = hit["info"]["run_id"]
        try:
            original = StepResult.model_validate(json.loads(self.rest.read_artifact(hit, caching.RESULT_ARTIFACT)))
        except (ValueError, TypeError) as exc:
            raise Uncertain(f"the result of cached run {hit_id} is unreadable: {exc}") from None
        parent = self.parent_run(experiment_id, spec)
        tags = caching.reuse_tags(spec, key, parent, code, hit_id, original, "worker")
        run = self.rest.create_run(experiment_id, tags, caching.reuse_run_name(spec))
        run_id = run["info"]["run_id"]
        try:
            result = original.model_copy(update={
                "mlflow_run_id": run_id, "parent_run_id": parent, "cache_hit": True, "cached_from_run_id": hit_id,
                "duration_s": round(time.monotonic() - started, 3),
            })
            self.rest.write_artifact(run, caching.RESULT_ARTIFACT,
                                     json.dumps(result.model_dump(mode="json"), indent=2).encode())
            self.rest.terminate(run_id, "FINISHED")
        except Uncertain as exc:  # leave no run behind that looks like a result
            try:
                self.rest.set_tag(run_id, caching.TAG_STATUS, "failed")
                self.rest.set_tag(run_id, caching.TAG_ERROR, f"worker-side cache reuse failed: {exc}")
                self.rest.terminate(run_id, "FAILED")
            except Uncertain:
                pass
            raise
        self.log.info("Cache hit on the worker: reusing MLflow run %s (cache key %s) as run %s; no step process "
                      "started; pass force=True to rebuild", hit_id, key, run_id)
        return result


def _q(value: str) -> str:
    return value.replace("'", "\\'")
