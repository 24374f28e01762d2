"""Container side: reaching MLflow, reading inputs by URI, and the per-DAG-run parent run.

Credentials come from the process environment (MLFLOW_TRACKING_TOKEN, or _USERNAME and
_PASSWORD), where the launcher put them for this process only; nothing here prints them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_modelopt.exceptions import InputError, TrackingUnavailable
from airflow_modelopt.uris import is_remote, uri_scheme

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from airflow_modelopt.specs import RunContext

log = logging.getLogger("airflow_modelopt.container.tracking")

#: Tags that tie MLflow runs to Airflow.
TAG_ROLE = "modelopt.role"
TAG_DAG_ID = "airflow.dag_id"
TAG_RUN_ID = "airflow.run_id"
TAG_LOGICAL_DATE = "airflow.logical_date"
TAG_TASK_ID = "airflow.task_id"
TAG_TRY = "airflow.try_number"
TAG_STEP = "modelopt.step"
TAG_IMAGE = "modelopt.image"
TAG_IMAGE_DIGEST = "modelopt.image_digest"
TAG_CACHE_KEY = "modelopt.cache_key"
TAG_MODE = "modelopt.execution_mode"
TAG_STATUS = "modelopt.status"
TAG_CACHE_HIT = "modelopt.cache_hit"
TAG_CACHED_FROM = "modelopt.cached_from_run_id"
TAG_ERROR = "modelopt.error"
PARENT_TAG = "mlflow.parentRunId"

RESULT_ARTIFACT = "modelopt/result.json"


def redact(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def tracking_uri() -> str:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def wait_for_server(uri: str, attempts: int | None = None, first_delay: float = 1.0) -> None:
    """For an HTTP tracking server, poll /health with exponential backoff; raise naming the URI."""
    if not uri.startswith(("http://", "https://")):
        return
    attempts = attempts or int(os.environ.get("MODELOPT_MLFLOW_CONNECT_RETRIES", "5"))
    delay, last_error = first_delay, ""
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
                if response.status < 500:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # a server that answers (401/403/404) is reachable
                return
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            log.warning("MLflow at %s not reachable (%s); retry %d/%d in %.0f s",
                        redact(uri), last_error, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
    raise TrackingUnavailable(
        f"MLflow tracking server at {redact(uri)} is unreachable after {attempts} attempts over "
        f"{time.monotonic() - started:.0f} s (last error: {last_error})"
    )


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Experiment id by name, created if missing (with MODELOPT_ARTIFACT_ROOT when set)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = os.environ.get("MODELOPT_ARTIFACT_ROOT")
    location = Path(root, name.replace("/", "_")).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel task
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, ctx: RunContext) -> str | None:
    """One parent run per DAG run, shared by its tasks. Parallel first tasks converge on the oldest."""
    if not ctx.dag_id or not ctx.run_id:
        return None
    query = (
        f"tags.`{TAG_ROLE}` = 'dag_run' and tags.`{TAG_DAG_ID}` = '{_q(ctx.dag_id)}' "
        f"and tags.`{TAG_RUN_ID}` = '{_q(ctx.run_id)}'"
    )

    def find() -> list[Any]:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    existing = find()
    if existing:
        return existing[0].info.run_id
    tags = {TAG_ROLE: "dag_run", TAG_DAG_ID: ctx.dag_id, TAG_RUN_ID: ctx.run_id}
    if ctx.logical_date:
        tags[TAG_LOGICAL_DATE] = ctx.logical_date
    mine = client.create_run(experiment_id, tags=tags, run_name=f"{ctx.dag_id} {ctx.run_id}")
    keeper = find()[0]
    if keeper.info.run_id != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    log.info("Parent MLflow run for DAG run %s: %s", ctx.run_id, keeper.info.run_id)
    return keeper.info.run_id


def _q(value: str) -> str:
    return value.replace("'", "\\'")


def fetch(uri: str, dest: Path, *, field: str) -> Path:
    """Make the artifact at ``uri`` available locally and return its path.

    Plain paths and file:// URIs are used in place; MLflow URIs are downloaded under ``dest``.
    """
    if is_remote(uri):
        import mlflow
        from mlflow.exceptions import MlflowException

        dest.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
        except MlflowException as exc:
            text = str(exc)
            if "Max retries" in text or "Connection" in text and "refused" in text:
                raise TrackingUnavailable(f"{field}: cannot download {uri}: {text.splitlines()[0]}") from None
            raise InputError(f"{field}: cannot read {uri}: {text.splitlines()[0]}") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{field}: cannot read {uri}: {exc}") from None
        path = Path(local)
    else:
        path = Path(uri[len("file://"):] if uri_scheme(uri) == "file" else uri).expanduser()
        if not path.exists():
            raise InputError(f"{field}: {uri} does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(f"{field}: {uri} is an empty directory")
    return path


#: Fields of an MLflow model's ``MLmodel`` file that MLflow stamps anew on every save of the same
#: model (time, random ids, the run and path it was logged under): a content digest leaves them out.
MLMODEL_VOLATILE_FIELDS = ("utc_time_created", "model_uuid", "model_id", "run_id", "artifact_path")
#: The environment files MLflow writes next to an MLmodel: inferred at save time (a timeout falls
#: back to another list), and the environment is already in the cache key (code and image).
MLMODEL_ENV_FILES = ("conda.yaml", "python_env.yaml", "requirements.txt", "constraints.txt")

#: The external-data file of every ONNX model a step logs. Left unnamed, onnx names it with a
#: random UUID, so the same weights saved twice made different model.onnx bytes.
ONNX_DATA_FILE = "model.onnx.data"


def digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's relative paths and file bytes, in sorted order.

    The content that makes a model: in an MLflow model folder the ``MLmodel`` file counts without
    its volatile fields and the environment files not at all, so the same model logged twice has
    one digest (and the steps after a rebuild hit the cache).
    """
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not (p.name in MLMODEL_ENV_FILES and (p.parent / "MLmodel").is_file())
    )
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        if f.name == "MLmodel":
            h.update(_stable_mlmodel(f))
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _stable_mlmodel(path: Path) -> bytes:
    import yaml

    try:
        fields = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return path.read_bytes()  # not an MLmodel MLflow wrote: its bytes as they are
    if not isinstance(fields, dict):
        return path.read_bytes()
    stable = {k: v for k, v in fields.items() if k not in MLMODEL_VOLATILE_FIELDS}
    return yaml.safe_dump(stable, sort_keys=True).encode()


def log_onnx_model(proto: Any, **kwargs: Any) -> Any:
    """``mlflow.onnx.log_model`` of an ONNX model as ``onnx_model``, its tensors in one external-data
    file with a fixed name (ONNX_DATA_FILE), so a rebuild of the same model gives the same bytes."""
    import mlflow.onnx

    return mlflow.onnx.log_model(proto, name="onnx_model", save_as_external_data=True,
                                 all_tensors_to_one_file=True, location=ONNX_DATA_FILE, **kwargs)


def find_cached(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    """The newest finished, successful run with this cache key, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_CACHE_KEY}` = '{key}' and tags.`{TAG_STATUS}` = 'succeeded' "
            f"and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        if run.data.tags.get(TAG_CACHE_HIT) != "true":
            return run
    return None

