"""Scheduled: retrain the example digits CNN on real data, then optimize it.

# [START modelopt_retrain_and_optimize]
Train (scikit-learn's digits, logged to MLflow with its accuracy), then the same optimization
task group as ``modelopt_optimize``: every requested target is built, validated against the new
model on the evaluation split, benchmarked, and the passing ones are promoted in the MLflow
Model Registry. Steps run in ``[modelopt] execution_mode`` unless the run's param says otherwise.
# [END modelopt_retrain_and_optimize]
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_modelopt.operators import TrainExampleModelOperator, artifact
from airflow_modelopt.pipelines import (
    form_param,
    optimization_pipeline,
    pipeline_form_params,
    pipeline_param_arguments,
)
from airflow_modelopt.targets import TARGET_DESCRIPTIONS

#: The pipeline's run-time choices in the trigger form, passed on to it as templates.
PIPELINE_PARAMS = pipeline_form_params(targets_description="Deployables to build from the retrained model (pick one or more)")
TARGET_TABLE = "\n".join(f"| `{t}` | {d} |" for t, d in TARGET_DESCRIPTIONS.items())

DOC_MD = f"""
### Retrain the example model, then optimize it

Weekly, or on *Trigger*: trains the example digits CNN (scikit-learn's digits, 8x8 images) and
logs it to MLflow (`train` task: `model/model.pt2` and the `data/{{train,calibration,eval}}.npz`
splits), then runs the same optimization groups as `modelopt_optimize` on it: one group per target
(its builds, `validate`, `benchmark`) and `promote`, which registers the passing candidates as
versions of the registered model (default `digits-cnn`, as `make demo` uses).

Every form field has a default: *Trigger* runs it as is. Each step task has an **MLflow run**
link; in MLflow (switch its UI to *Model training*) the experiment is
`modelopt_retrain_and_optimize`. The `train` run's URIs are what `modelopt_optimize` takes
(`runs:/<train run id>/model/model.pt2`, `runs:/<train run id>/data/calibration.npz`,
`runs:/<train run id>/data/eval.npz`).

| target | produces |
| --- | --- |
{TARGET_TABLE}
"""

with DAG(
    dag_id="modelopt_retrain_and_optimize",
    description="Retrain the example digits CNN weekly and build, validate, benchmark and promote its deployables.",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["modelopt", "example"],
    doc_md=DOC_MD,
    params={
        "epochs": form_param(15, type="integer", minimum=1, maximum=500, title="Epochs",
                             description="Training epochs"),
        **PIPELINE_PARAMS,
    },
) as dag:
    train = TrainExampleModelOperator(task_id="train", epochs="{{ params.epochs }}",
                                      execution_mode="{{ params.execution_mode }}", force="{{ params.force }}")

    optimize = optimization_pipeline(
        model_uri=artifact("train", "model_pt2"),
        calibration_data_uri=artifact("train", "calibration_data"),
        eval_data_uri=artifact("train", "eval_data"),
        train_data_uri=artifact("train", "train_data"),
        **pipeline_param_arguments(PIPELINE_PARAMS),
    )
    train >> optimize
