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
from airflow_modelopt.pipelines import form_param, optimization_pipeline
from airflow_modelopt.targets import TARGET_DESCRIPTIONS, TARGETS

TARGET_CHOICES = {t: f"{t}: {TARGET_DESCRIPTIONS[t]}" for t in TARGETS}
EXECUTION_MODES = {"": "default ([modelopt] execution_mode)", "local": "local (subprocess on the worker)",
                   "docker": "docker (one image per step)", "kubernetes": "kubernetes (one pod per step)"}
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
        "targets": form_param(
            ["onnx_fp32", "onnx_int8_static", "tflite_int8"], type="array", title="Targets",
            items={"type": "string", "enum": list(TARGETS)}, minItems=1, uniqueItems=True,
            examples=list(TARGETS), values_display=TARGET_CHOICES,
            description="Deployables to build from the retrained model (pick one or more)",
        ),
        "registered_model_name": form_param(
            "digits-cnn", type="string", minLength=1, title="Registered model name",
            description="MLflow registered model the passing candidates join",
        ),
        "max_accuracy_drop": form_param(
            0.02, type="number", minimum=0, maximum=1, title="Max accuracy drop",
            description="Gate: candidate accuracy may fall at most this much (0.02 = 2 points)",
        ),
        "execution_mode": form_param(
            "", type=["null", "string"], enum=["", "local", "docker", "kubernetes"],
            values_display=EXECUTION_MODES, title="Execution mode",
            description="Where steps run; the default is the deployment's [modelopt] execution_mode",
        ),
        "force": form_param(False, type=["null", "boolean"], title="Force rebuild",
                            description="Rebuild even when a cached MLflow run matches"),
    },
) as dag:
    common = {"execution_mode": "{{ params.execution_mode }}", "force": "{{ params.force }}"}

    train = TrainExampleModelOperator(task_id="train", epochs="{{ params.epochs }}", **common)

    optimize = optimization_pipeline(
        model_uri=artifact("train", "model_pt2"),
        calibration_data_uri=artifact("train", "calibration_data"),
        eval_data_uri=artifact("train", "eval_data"),
        train_data_uri=artifact("train", "train_data"),
        targets="{{ params.targets }}",
        registered_model_name="{{ params.registered_model_name }}",
        max_accuracy_drop="{{ params.max_accuracy_drop }}",
        **common,
    )
    train >> optimize
