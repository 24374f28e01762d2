"""airflow-modelopt: turn trained models into validated, measured, registered deployables.

Importing this package is cheap on purpose: the Airflow side must parse DAGs fast, and the
container side must not need Airflow. Operators live in ``airflow_modelopt.operators``.
"""

from __future__ import annotations

from airflow_modelopt.version import __version__

__all__ = ["__version__", "get_provider_info"]


def get_provider_info() -> dict:
    """Provider metadata read by Airflow's ProvidersManager (``airflow providers list``)."""
    from airflow_modelopt.config import provider_config
    from airflow_modelopt.specs import StepSpec

    # One name per step in every layer: the operator of step <name> lives in operators/<name>.py.
    operator_modules = [f"airflow_modelopt.operators.{name}" for name in sorted(StepSpec.registry)]

    return {
        "package-name": "airflow-modelopt",
        "name": "Model optimization (airflow-modelopt)",
        "description": "Operators that export, compress, validate, benchmark and promote ML models, "
        "each step in its own container image, tracked in MLflow.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "airflow-modelopt",
                "external-doc-url": "https://github.com/airflow-modelopt/airflow-modelopt",
                "tags": ["software"],
            }
        ],
        "operators": [
            {"integration-name": "airflow-modelopt", "python-modules": operator_modules}
        ],
        "hooks": [{"integration-name": "airflow-modelopt", "python-modules": ["airflow_modelopt.hooks.mlflow"]}],
        # Buttons on a step task's page: its MLflow run; on promote, the registered model too.
        "extra-links": ["airflow_modelopt.operators.links.MlflowRunLink",
                        "airflow_modelopt.operators.links.MlflowRegisteredModelLink"],
        "connection-types": [
            {"hook-class-name": "airflow_modelopt.hooks.mlflow.MlflowHook", "connection-type": "mlflow"}
        ],
        "config": provider_config(),
    }
