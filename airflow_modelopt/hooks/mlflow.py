"""Airflow connection to an MLflow tracking server.

The hook turns a connection into the environment a step process needs: ``MLFLOW_TRACKING_URI``
(plain) and the credentials (secret). The operator hands credentials to each step process on
its own (``private_environment`` in Docker, a Kubernetes Secret in pods, the child's env in
local mode); nothing here writes to ``os.environ`` or logs a credential.

Accepted connections:

* ``AIRFLOW_CONN_MLFLOW_DEFAULT='http://127.0.0.1:5000'`` (or https, with a path)
* user and password: ``https://user:password@mlflow.example.com``
* a token: password without login, or extra ``{"token": "..."}``
* any tracking URI MLflow understands: extra ``{"tracking_uri": "sqlite:////data/mlflow.db"}``

Credentials written into a tracking URI (extra ``tracking_uri``, ``[modelopt] default_tracking_uri``:
``http://user:password@host``) are taken out of it into the secret environment, so the URI that is
logged and passed in plain environment never carries them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook

from airflow_modelopt import config
from airflow_modelopt.uris import split_credentials


@dataclass(frozen=True)
class TrackingConfig:
    """Where steps log to. ``secret_env`` must never be logged or put in XCom."""

    tracking_uri: str
    public_env: dict[str, str]
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    source: str = ""

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://", "databricks"))


def default_local_store() -> TrackingConfig:
    """The embedded default: a SQLite tracking store and artifact folder under $AIRFLOW_HOME."""
    configured = config.get("default_tracking_uri").strip()
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    root = os.path.join(home, "modelopt")
    uri, secret = _without_credentials(configured or f"sqlite:///{os.path.join(root, 'mlflow.db')}")
    env = {"MLFLOW_TRACKING_URI": uri}
    if not configured:
        os.makedirs(root, exist_ok=True)
        env["MODELOPT_ARTIFACT_ROOT"] = os.path.join(root, "artifacts")
    return TrackingConfig(uri, env, secret, source="embedded default (local store)")


def _without_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """The URI without its ``user:password@`` part, and that part as MLflow's credential variables."""
    uri, user, password = split_credentials(uri)
    secret = {}
    if user is not None:
        secret["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        secret["MLFLOW_TRACKING_PASSWORD"] = password
    return uri, secret


class MlflowHook(BaseHook):
    """Reads an MLflow connection; see the module docstring for the forms it accepts."""

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": [],
            "relabeling": {"host": "Tracking server host", "password": "Password or token"},
            "placeholders": {
                "host": "mlflow.example.com",
                "schema": "https",
                "extra": '{"token": "...", "tracking_uri": "(optional, overrides host)", '
                         '"ui_url": "(optional: the MLflow UI as people reach it, for task links)"}',
            },
        }

    def tracking_config(self, *, fallback_to_local: bool = True) -> TrackingConfig:
        """Build the tracking environment; without the connection, the embedded local store."""
        try:
            conn = self.get_connection(self.mlflow_conn_id)
        except Exception as exc:  # AirflowNotFoundException, and the SDK's own variant
            if not fallback_to_local or "not defined" not in str(exc) and "NotFound" not in type(exc).__name__:
                raise
            self.log.info("Connection %r not defined; using the embedded local MLflow store", self.mlflow_conn_id)
            return default_local_store()
        return self.config_from_connection(conn)

    @staticmethod
    def config_from_connection(conn: Any) -> TrackingConfig:
        extra = conn.extra_dejson or {}
        uri = extra.get("tracking_uri")
        if not uri:
            scheme = (conn.conn_type or "http").lower()
            if scheme not in ("http", "https"):
                scheme = str(extra.get("scheme") or conn.schema or "http").lower()
                if scheme not in ("http", "https"):
                    scheme = "http"
                path = ""
            else:
                path = conn.schema or ""
            if not conn.host:
                raise ValueError(
                    f"MLflow connection {conn.conn_id!r} has no host; set host (and port), or extra "
                    "tracking_uri"
                )
            port = f":{conn.port}" if conn.port else ""
            path = f"/{path.strip('/')}" if path.strip("/") else ""
            uri = f"{scheme}://{conn.host}{port}{path}"
        uri, secret = _without_credentials(uri)
        token = extra.get("token")
        if conn.login and conn.password:
            secret["MLFLOW_TRACKING_USERNAME"] = conn.login
            secret["MLFLOW_TRACKING_PASSWORD"] = conn.password
        elif conn.password and not token:
            token = conn.password
        if token:
            secret["MLFLOW_TRACKING_TOKEN"] = str(token)
        public = {"MLFLOW_TRACKING_URI": uri}
        if extra.get("insecure_tls"):
            public["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
        return TrackingConfig(uri, public, secret, source=f"connection {conn.conn_id!r}")
