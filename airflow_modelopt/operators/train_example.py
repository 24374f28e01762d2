"""The ``train_example`` step's operator (re-exported by ``airflow_modelopt.operators``).

Airflow side: imports the specs (pydantic only), never a model framework.
"""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.train_example import TrainExampleSpec


class TrainExampleModelOperator(ModelOptOperator):
    """Train the example digits CNN (scikit-learn's digits, no download) and log it to MLflow as an
    ExportedProgram (.pt2) and an MLflow pytorch model, with train/calibration/eval .npz splits."""

    spec_class = TrainExampleSpec


__all__ = ["TrainExampleModelOperator"]
