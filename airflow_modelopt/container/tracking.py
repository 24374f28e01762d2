"""Container side: reaching MLflow, reading inputs by URI, and the per-DAG-run parent run.

Credentials come from the process environment (MLFLOW_TRACKING_TOKEN, or _USERNAME and
_PASSWORD), where the launcher put them for this process only, or from the tracking URI's
``user:password@`` part, which ``configure`` moves into that environment before anything uses or
logs the URI; nothing here prints them.

Every MLflow request of a step shares one retry budget (``RetryBudget``): once the server stops
answering (refused or timed-out connections, 5xx answers), the step's requests keep retrying for at
most ``MODELOPT_MLFLOW_RETRY_BUDGET`` seconds in all, however many calls the step makes meanwhile;
then they fail at once and the runner exits with code 4 (TrackingUnavailable). An answer from the
server ends the outage and renews the budget.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The tag names, the result artifact and the content digest are shared with the Airflow side's
# cache lookup (airflow_modelopt/caching.py); the container side's modules keep reading them here.
from airflow_modelopt.caching import (  # noqa: F401 - re-exported for the container side
    MLMODEL_ENV_FILES,
    MLMODEL_VOLATILE_FIELDS,
    PARENT_TAG,
    RESULT_ARTIFACT,
    TAG_CACHE_HIT,
    TAG_CACHE_KEY,
    TAG_CACHE_LOOKUP,
    TAG_CACHED_FROM,
    TAG_CODE_DIGEST,
    TAG_DAG_ID,
    TAG_ERROR,
    TAG_IMAGE,
    TAG_IMAGE_DIGEST,
    TAG_LOGICAL_DATE,
    TAG_MODE,
    TAG_ROLE,
    TAG_RUN_ID,
    TAG_STATUS,
    TAG_STEP,
    TAG_TASK_ID,
    TAG_TRY,
    TAG_VERDICT,
    cached_filter,
    digest,
    digest_record,
)
from airflow_modelopt.exceptions import InputError, SpecError, TrackingUnavailable
from airflow_modelopt.uris import is_remote, split_credentials, uri_scheme

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from airflow_modelopt.specs import RunContext

log = logging.getLogger("airflow_modelopt.container.tracking")


def redact(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def tracking_uri() -> str:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


#: Environment variable (set by the operator from ``[modelopt] mlflow_retry_budget``) and default.
RETRY_BUDGET_ENV = "MODELOPT_MLFLOW_RETRY_BUDGET"
DEFAULT_RETRY_BUDGET_S = 120.0
#: Seconds the bookkeeping after SIGTERM may spend on MLflow: inside the grace period an
#: orchestrator gives before it kills (docker stop: 10 s).
WIND_DOWN_S = 5.0


class RetryBudget:
    """How long this process keeps retrying MLflow requests while the server does not answer.

    One per process (``BUDGET``), shared by every request of every call: an outage starts at the
    first failed attempt and ends at the next answer; requests give up once it has lasted
    ``seconds``, or once ``wind_down``'s deadline has passed.
    """

    def __init__(self, seconds: float = DEFAULT_RETRY_BUDGET_S) -> None:
        self.seconds = seconds
        self.outage_since: float | None = None
        self.last_error = ""
        self.deadline: float | None = None

    def failed(self, error: object) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        self.last_error = str(error)[:500]

    def answered(self) -> None:
        self.outage_since = None

    @property
    def in_outage(self) -> bool:
        """The last request got no answer (the server is unreachable or failing)."""
        return self.outage_since is not None

    def outage_s(self) -> float:
        return 0.0 if self.outage_since is None else time.monotonic() - self.outage_since

    def remaining(self) -> float:
        """Seconds a failing request may still retry."""
        ends = [t for t in (self.deadline,) if t is not None]
        if self.outage_since is not None:
            ends.append(self.outage_since + self.seconds)
        return max(0.0, min(ends) - time.monotonic()) if ends else math.inf

    def wind_down(self, seconds: float = WIND_DOWN_S) -> None:
        """From now on, a failing request gives up after ``seconds`` (the last calls of a dying step)."""
        self.deadline = time.monotonic() + seconds
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(seconds)))


BUDGET = RetryBudget()


def _budgeted_retry_class() -> type:
    from urllib3.exceptions import MaxRetryError, ResponseError
    from urllib3.util.retry import Retry

    class BudgetedRetry(Retry):
        """urllib3's retry policy (as MLflow configured it), cut short when ``BUDGET`` is spent."""

        def increment(self, method: Any = None, url: Any = None, response: Any = None, error: Any = None,
                      _pool: Any = None, _stacktrace: Any = None) -> Any:
            BUDGET.failed(error or (f"HTTP {response.status}" if response is not None else "no answer"))
            retry = super().increment(method, url, response, error, _pool, _stacktrace)
            if BUDGET.remaining() <= 0:
                reason = error or ResponseError(f"HTTP {getattr(response, 'status', '?')}")
                raise MaxRetryError(_pool, url, reason) from reason  # type: ignore[arg-type]
            return retry

        def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
            retry = super().is_retry(method, status_code, has_retry_after)
            if not retry:
                BUDGET.answered()
            return retry

        def get_backoff_time(self) -> float:
            return min(super().get_backoff_time(), BUDGET.remaining())

        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else min(after, BUDGET.remaining())

    return BudgetedRetry


def install_retry_budget(seconds: float) -> bool:
    """Make every MLflow HTTP request of this process retry within ``BUDGET`` (``seconds`` long).

    MLflow builds one cached ``requests`` session per retry setting in
    ``mlflow.utils.request_utils._get_request_session``; the sessions it returns get a retry policy
    that also consults the budget. False (and a warning) when this MLflow has no such function: then
    each call retries on MLflow's own terms, bounded only by the request timeout.
    """
    BUDGET.seconds = seconds
    try:
        from mlflow.utils import request_utils

        original = request_utils._get_request_session
    except (ImportError, AttributeError):
        log.warning("this MLflow has no _get_request_session: the MLflow retry budget is not enforced")
        return False
    if getattr(original, "modelopt_budgeted", False):
        return True
    budgeted = _budgeted_retry_class()

    def get_request_session(*args: Any, **kwargs: Any) -> Any:
        session = original(*args, **kwargs)
        for adapter in session.adapters.values():
            retry = getattr(adapter, "max_retries", None)
            if retry is not None and not isinstance(retry, budgeted):
                retry = copy.copy(retry)
                retry.__class__ = budgeted  # the same settings; only the budget checks are added
                adapter.max_retries = retry
        return session

    get_request_session.modelopt_budgeted = True  # type: ignore[attr-defined]
    request_utils._get_request_session = get_request_session
    return True


def _budget_from_env() -> float:
    raw = os.environ.get(RETRY_BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_BUDGET_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise SpecError(f"{RETRY_BUDGET_ENV} is {raw!r}; expected seconds >= 0 ([modelopt] mlflow_retry_budget)")
    return seconds


def configure() -> str:
    """Set this process up to talk to MLflow and return the tracking URI, safe to log.

    Credentials in the URI (``http://user:password@host``) move to MLFLOW_TRACKING_USERNAME and
    _PASSWORD (they win over ones already there, as they would in MLflow's client) and the URI
    loses them. Requests time out after a quarter of the retry budget (at least 10 s, at most
    MLflow's 120 s; an explicit MLFLOW_HTTP_REQUEST_TIMEOUT wins), so one hung request cannot
    outlast the budget by much.
    """
    import mlflow

    budget = _budget_from_env()
    uri, user, password = split_credentials(tracking_uri())
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is None:
            log.warning("The tracking URI names user %r without a password; no credentials are sent", user)
        else:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(min(120.0, max(10.0, budget / 4)))))
    install_retry_budget(budget)
    return uri


def unavailable(uri: str, exc: BaseException) -> TrackingUnavailable:
    """The error of a step whose MLflow requests ran out of retry budget (or of MLflow's retries)."""
    return TrackingUnavailable(
        f"MLflow tracking server at {redact(uri)} stopped answering: no answer for {BUDGET.outage_s():.0f} s "
        f"(retry budget {BUDGET.seconds:.0f} s, [modelopt] mlflow_retry_budget); last error: "
        f"{BUDGET.last_error or type(exc).__name__}"
    )


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


def close_abandoned_runs(client: MlflowClient, experiment_id: str, ctx: RunContext) -> list[str]:
    """End as FAILED the runs earlier tries of this task left RUNNING (a try whose MLflow was
    unreachable at the end, or that was killed hard), naming why; return their ids."""
    if not (ctx.dag_id and ctx.run_id and ctx.task_id):
        return []
    query = (
        f"tags.`{TAG_ROLE}` = 'step' and tags.`{TAG_DAG_ID}` = '{_q(ctx.dag_id)}' "
        f"and tags.`{TAG_RUN_ID}` = '{_q(ctx.run_id)}' and tags.`{TAG_TASK_ID}` = '{_q(ctx.task_id)}' "
        "and attributes.status = 'RUNNING'"
    )
    closed = []
    for run in client.search_runs([experiment_id], filter_string=query, max_results=100):
        earlier = run.data.tags.get(TAG_TRY, "")
        if not earlier.isdigit() or int(earlier) >= ctx.try_number:
            continue
        client.set_tag(run.info.run_id, TAG_STATUS, "failed")
        client.set_tag(run.info.run_id, TAG_ERROR, (
            f"abandoned: try {earlier} ended without closing this run (MLflow was unreachable, or the "
            f"process was killed); closed by try {ctx.try_number}"))
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("Closed MLflow run %s, left RUNNING by try %s of this task, as FAILED", run.info.run_id, earlier)
        closed.append(run.info.run_id)
    return closed


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


#: The external-data file of every ONNX model a step logs. Left unnamed, onnx names it with a
#: random UUID, so the same weights saved twice made different model.onnx bytes.
ONNX_DATA_FILE = "model.onnx.data"


def log_onnx_model(proto: Any, example: Any = None, **kwargs: Any) -> Any:
    """``mlflow.onnx.log_model`` of an ONNX model as ``onnx_model``, its tensors in one external-data
    file with a fixed name (ONNX_DATA_FILE), so a rebuild of the same model gives the same bytes.

    With its tensor signature (the graph's inputs and outputs) and an input example (the first
    samples of ``example``, arrays by input name, or seeded values of the input shapes), so
    ``mlflow.pyfunc`` and ``mlflow models serve`` callers see what it takes."""
    import mlflow.onnx

    from airflow_modelopt.container.pyfunc import onnx_signature_and_example

    signature, input_example = onnx_signature_and_example(proto, example)
    kwargs.setdefault("signature", signature)
    kwargs.setdefault("input_example", input_example)
    return mlflow.onnx.log_model(proto, name="onnx_model", save_as_external_data=True,
                                 all_tensors_to_one_file=True, location=ONNX_DATA_FILE, **kwargs)


def find_cached(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    """The newest finished, successful run with this cache key, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=cached_filter(key),
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        if run.data.tags.get(TAG_CACHE_HIT) != "true":
            return run
    return None



def record_digest(client: MlflowClient, uri: str, value: str) -> bool:
    """Record where ``uri``'s content lives (its FINISHED run, or its READY logged model: see
    ``caching.digest_record``) the content digest this step computed for it, so that the Airflow
    side's cache lookup of the steps that read it later needs no download
    (``operators/worker_cache.py``). True when the record is there now.

    Finished runs and ready models are taken as final; a digest that differs from the recorded one
    (the artifact was overwritten) replaces it. Failures are logged, never raised: the record only
    saves work.
    """
    record = digest_record(uri)
    if record is None:
        return False
    kind, ident, tag = record
    try:
        if kind == "run":
            run = client.get_run(ident)
            if run.info.status != "FINISHED":
                return False
            if run.data.tags.get(tag) != value:
                client.set_tag(ident, tag, value)
            return True
        model = client.get_logged_model(ident)
        if str(getattr(model.status, "name", model.status)).upper() not in ("READY", "LOGGED_MODEL_READY"):
            return False
        if (model.tags or {}).get(tag) != value:
            client.set_logged_model_tags(ident, {tag: value})
        return True
    except Exception as exc:  # noqa: BLE001 - no permission on that run, or it is gone: no harm
        log.info("could not record the digest of %s: %s", uri, exc)
        return False
