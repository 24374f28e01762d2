"""Operator extra links: from a step task to its MLflow run, from promote to the registered model.

Airflow 3 computes a link on the worker when the task ends and keeps the URL in XCom (key
``_link_<class name>``); the UI's task page shows one button per link. The URL's base is the MLflow
UI of the task's connection: its extra ``ui_url`` when set (an MLflow reached by the workers under an
in-cluster name, but by people under another), else the tracking URI when it is http(s). A local
store (``sqlite:``, a folder) has no UI to link to: the button stays disabled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: The attribute of a step operator holding its links after ``execute`` (link name -> URL).
LINKS_ATTR = "modelopt_links"


def ui_base(tracking_uri: str | None, ui_url: str | None = None) -> str | None:
    """The MLflow UI's base URL, or None when there is none to link to."""
    base = (ui_url or "").strip() or (tracking_uri or "").strip()
    if not base.startswith(("http://", "https://")):
        return None
    return base.rstrip("/")


def run_url(base: str | None, experiment_id: str | None, run_id: str | None) -> str:
    if not base or not run_id:
        return ""
    return f"{base}/#/experiments/{quote(str(experiment_id or '0'))}/runs/{quote(run_id)}"


def registered_model_url(base: str | None, name: str | None, version: int | str | None = None) -> str:
    if not base or not name:
        return ""
    url = f"{base}/#/models/{quote(name, safe='')}"
    return f"{url}/versions/{version}" if version not in (None, "") else url


def step_links(base: str | None, result: dict[str, Any]) -> dict[str, str]:
    """Link name -> URL for one step's result (the dict its task returns)."""
    links = {MlflowRunLink.name: run_url(base, result.get("experiment_id"), result.get("mlflow_run_id"))}
    info = result.get("info") or {}
    if info.get("registered_model_name"):
        links[MlflowRegisteredModelLink.name] = registered_model_url(base, info["registered_model_name"])
    return links


class _StepLink(BaseOperatorLink):
    name = ""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return (getattr(operator, LINKS_ATTR, None) or {}).get(self.name, "")


class MlflowRunLink(_StepLink):
    """The MLflow run the step logged to (its parameters, metrics, artifacts)."""

    name = "MLflow run"


class MlflowRegisteredModelLink(_StepLink):
    """The registered model the promotion moved aliases of (its versions, descriptions, aliases)."""

    name = "MLflow registered model"


__all__ = ["LINKS_ATTR", "MlflowRegisteredModelLink", "MlflowRunLink", "registered_model_url", "run_url",
           "step_links", "ui_base"]
