"""Jinja helpers that wire one step's result into the next step's fields."""

from __future__ import annotations


def artifact(task_id: str, name: str) -> str:
    """Template for an artifact URI from an upstream step's result (pulled from XCom at run time).

    ``TorchToOnnxOperator(model_uri=artifact("train", "model_pt2"), ...)``
    """
    return f"{{{{ ti.xcom_pull(task_ids={task_id!r})['artifacts'][{name!r}] }}}}"


def metric(task_id: str, name: str) -> str:
    """Template for a metric of an upstream step's result."""
    return f"{{{{ ti.xcom_pull(task_ids={task_id!r})['metrics'][{name!r}] }}}}"
