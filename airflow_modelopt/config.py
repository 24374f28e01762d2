"""Airflow-side configuration: the ``[modelopt]`` section.

Every option can be set in airflow.cfg or as ``AIRFLOW__MODELOPT__<OPTION>`` in the environment,
so a whole deployment switches (say, to Docker) without editing a DAG. Operator arguments win
over configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from airflow_modelopt.exceptions import SpecError
from airflow_modelopt.specs import EXECUTION_MODES, spec_class_for
from airflow_modelopt.version import __version__

SECTION = "modelopt"

#: Option -> (default, description). The provider info publishes these, so `airflow config list`
#: shows them, and `get()` falls back to them.
OPTIONS: dict[str, tuple[str, str]] = {
    "execution_mode": ("local", "Where steps run: local (a subprocess), docker or kubernetes."),
    "local_python": ("", "Python that runs steps in local mode; empty means the worker's own interpreter."),
    "warm_start": ("True", "Fork local-mode steps from a warm interpreter that has imported MLflow and the step code once per worker process (operators/warm_start.py), instead of starting a fresh Python per step; it saves a second or more per step where one process runs many tasks (airflow dags test). False: a fresh process per step."),
    "litert_python": ("", "Python with litert-torch (scripts/make-litert-venv.sh) that local-mode TFLite steps convert PyTorch models in; empty: the step's own Python, else the ONNX fallback."),
    "image_registry": ("", "Registry and namespace prefixed to image names, e.g. registry.example.com/ml."),
    "image_name_prefix": ("airflow-modelopt-", "Image name before the family: <prefix><family>, e.g. airflow-modelopt-torch."),
    "image_tag": (__version__, "Tag of every step image; defaults to the provider's version."),
    "image_overrides": ("{}", 'JSON mapping of step name to a full image reference, e.g. {"torch_to_onnx": "my/torch:1"}.'),
    "docker_url": ("unix://var/run/docker.sock", "Docker engine the docker mode talks to."),
    "docker_network_mode": ("bridge", "Network of step containers; host lets them reach a tracking server on loopback."),
    "kubernetes_namespace": ("default", "Namespace step pods run in."),
    "kubernetes_service_account": ("", "Service account of step pods (empty: the namespace default)."),
    "kubernetes_mlflow_secret": ("", "Kubernetes Secret whose keys become the pod's environment (MLflow credentials)."),
    "kubernetes_conn_id": ("kubernetes_default", "Airflow connection to the cluster step pods run in."),
    "kubernetes_in_cluster": ("", "True or False; empty lets the Kubernetes provider decide (in-cluster, else kubeconfig)."),
    "mlflow_conn_id": ("mlflow_default", "Airflow connection that names the MLflow tracking server."),
    "default_tracking_uri": ("", "Tracking URI used when the connection does not exist; empty means a SQLite store under $AIRFLOW_HOME/modelopt."),
    "mlflow_connect_retries": ("5", "Attempts a step makes to reach the tracking server, with exponential backoff, before it exits with code 4."),
    "mlflow_retry_budget": ("120", "Seconds a step keeps retrying while the tracking server does not answer, all its MLflow calls together; then it marks its run FAILED when it can and exits with code 4. Each request times out after a quarter of it (10 to 120 s)."),
    "transient_failure_retries": ("3", "Retries, with exponential backoff, of a task whose step could not reach MLflow (exit code 4) when the task sets no retries of its own; other failures keep the task's retries."),
    "trust_model_code": ("False", "Let steps unpickle objects that run code from model files (pickled .pt2 entries, MLflow pytorch models saved with pickle). Only for deployments whose model sources are trusted: whoever can trigger a DAG or publish an asset chooses the model."),
    "read_only_root_filesystem": ("True", "Run step containers (docker, kubernetes) on a read-only root with a scratch /tmp, also their HOME."),
    "kubernetes_run_as_user": ("1000", "UID (and GID, fsGroup) of step pods; the images' user is 1000. Empty: the platform assigns one (OpenShift)."),
}


def get(option: str) -> str:
    """Read ``[modelopt] option``, falling back to this package's default."""
    from airflow.configuration import conf

    default = OPTIONS[option][0]
    value = conf.get(SECTION, option, fallback=default)
    return default if value is None else str(value)


def get_int(option: str) -> int:
    """``[modelopt] option`` as an integer >= 0; raise naming the option and the bad value."""
    value = get(option).strip()
    if not value.isdigit():
        raise ValueError(f"[{SECTION}] {option} is {value!r}; expected a whole number >= 0")
    return int(value)


def get_bool(option: str) -> bool:
    """``[modelopt] option`` as a boolean (true/false, yes/no, 1/0, on/off; any case)."""
    value = get(option).strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"[{SECTION}] {option} is {value!r}; expected True or False")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def resolve_execution_mode(explicit: str | None) -> str:
    """The operator's argument if given, else configuration; raise naming the bad value.

    An empty or null param rendered into a template ("", "None") means "not given"."""
    if explicit is not None and str(explicit).strip() in ("", "None", "null"):
        explicit = None
    source = "execution_mode argument" if explicit else f"[{SECTION}] execution_mode"
    mode = (explicit or get("execution_mode")).strip().lower()
    if mode not in EXECUTION_MODES:
        raise SpecError(f"{source} is {mode!r}; expected one of {', '.join(EXECUTION_MODES)}")
    return mode


def image_for(step: str, explicit: str | None = None, family: str | None = None) -> str:
    """Image reference a step runs in: the explicit one, a per-step override, or the family image
    (``family`` as the spec resolved it from its models, else the step's default)."""
    if explicit:
        return explicit
    raw = get("image_overrides") or "{}"
    try:
        overrides: dict[str, Any] = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SpecError(f"[{SECTION}] image_overrides is not valid JSON: {exc}") from None
    if step in overrides:
        return str(overrides[step])
    family = family or spec_class_for(step).image_family
    registry = get("image_registry").strip().rstrip("/")
    name = f"{get('image_name_prefix')}{family}:{get('image_tag')}"
    return f"{registry}/{name}" if registry else name


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str
    service_account: str | None
    mlflow_secret: str | None
    in_cluster: bool | None
    conn_id: str

    @classmethod
    def from_config(cls) -> KubernetesSettings:
        return cls(
            namespace=get("kubernetes_namespace"),
            service_account=get("kubernetes_service_account") or None,
            mlflow_secret=get("kubernetes_mlflow_secret") or None,
            in_cluster=_tristate(get("kubernetes_in_cluster")),
            conn_id=get("kubernetes_conn_id"),
        )


def _tristate(value: str) -> bool | None:
    value = value.strip().lower()
    if not value:
        return None
    return value in _TRUE


def provider_config() -> dict[str, Any]:
    """The ``config`` block of the provider info, generated from OPTIONS."""
    return {
        SECTION: {
            "description": "airflow-modelopt: execution modes, images and the MLflow store.",
            "options": {
                # Airflow str.format()s provider defaults with its variables: escape braces.
                name: {"description": desc, "version_added": "0.1.0", "type": "string", "example": None,
                       "default": default.replace("{", "{{").replace("}", "}}")}
                for name, (default, desc) in OPTIONS.items()
            },
        }
    }
