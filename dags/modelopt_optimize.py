"""Optimize a trained model: build every requested target, validate, benchmark, promote.

# [START modelopt_optimize]
Trigger it from the Airflow UI (the form below), from the CLI
(``airflow dags trigger modelopt_optimize -c '{"model_uri": "...", ...}'``), or by an update of
the Asset ``modelopt_trained_model`` whose event extra carries ``model_uri`` (and optionally
``calibration_data_uri``, ``eval_data_uri``, ``train_data_uri``): a training DAG emits it with
``outlets=[Asset("modelopt_trained_model", uri="modelopt://trained-model")]``.
# [END modelopt_optimize]
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Asset, task

from airflow_modelopt.pipelines import (
    form_param,
    optimization_pipeline,
    pipeline_form_params,
    pipeline_param_arguments,
)
from airflow_modelopt.targets import TARGET_DESCRIPTIONS

TRAINED_MODEL = Asset("modelopt_trained_model", uri="modelopt://trained-model")

#: The pipeline's run-time choices in the trigger form, passed on to it as templates.
PIPELINE_PARAMS = pipeline_form_params(
    targets_description="Deployables to build (pick one or more); each is validated and benchmarked "
                        "in its own group",
    gates={
        "min_top1_agreement": form_param(
            0.95, type="number", minimum=0, maximum=1, title="Min top-1 agreement",
            description="Gate: share of samples whose top-1 class matches the source model",
        ),
        "objective": form_param(
            "latency_p50", type="string", enum=["latency_p50", "size"], title="Objective",
            description="What the champion minimizes among passing candidates",
        ),
    },
)
TARGET_TABLE = "\n".join(f"| `{t}` | {d} |" for t, d in TARGET_DESCRIPTIONS.items())

DOC_MD = f"""
### Optimize a trained model

Builds each selected **target** from a trained model, checks it computes the same thing
(validate), measures it (benchmark) and registers the passing ones in the MLflow Model Registry
(promote: alias `<target>` on each, `champion` on the best by the objective).

**Trigger it**: *Trigger* (top right) and fill the form. Only the three URIs have no default:

* **Model URI**: a `.pt2` (torch.export) as a path or URI: `runs:/<run id>/model/model.pt2`,
  `models:/<name>/<version>`.
* **Calibration / evaluation data URIs**: `.npz` files, inputs under their input name (or `x`),
  labels under `y`: `runs:/<run id>/data/calibration.npz`, `runs:/<run id>/data/eval.npz`.

Where to get them: `make demo` trains the example digits CNN (DAG `modelopt_retrain_and_optimize`)
and logs all three on its `train` MLflow run; the demo's summary ends with the three URIs ready
to paste here (the `train` task's XCom, `artifacts`, holds them too). Your own training DAG can instead
emit the Asset `modelopt_trained_model` with those URIs in the event's extra: this DAG then runs on
its own.

Also from the CLI: `airflow dags trigger modelopt_optimize -c '{{"model_uri": "...", "calibration_data_uri": "...", "eval_data_uri": "..."}}'`.

**What you get**: in the grid, one group per target (its builds, `validate`, `benchmark`); every
step task has an **MLflow run** link, promote an **MLflow registered model** link. In MLflow,
experiment `modelopt_optimize` (switch MLflow's UI to *Model training*): one parent run per DAG
run with the candidate table and comparison plot, and the versions of the registered model.

| target | produces |
| --- | --- |
{TARGET_TABLE}
"""

with DAG(
    dag_id="modelopt_optimize",
    description="Build, validate, benchmark and promote deployables of a trained model.",
    schedule=[TRAINED_MODEL],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["modelopt"],
    doc_md=DOC_MD,
    params={
        "model_uri": form_param(
            "", type="string", title="Model URI",
            description="The trained model: .pt2 path or URI, runs:/..., or models:/<name>/<version>",
        ),
        "calibration_data_uri": form_param(
            "", type="string", title="Calibration data URI",
            description=".npz of calibration samples: inputs keyed by input name (or x), labels under y",
        ),
        "eval_data_uri": form_param(
            "", type="string", title="Evaluation data URI",
            description=".npz of evaluation samples (disjoint from calibration); labels under y give accuracy",
        ),
        "train_data_uri": form_param(
            "", type=["null", "string"], title="Training data URI (optional)",
            description=".npz the pruned target fine-tunes on: inputs, labels under y optional (without them "
            "the pruned model learns from the unpruned one by distillation); empty means the calibration split",
        ),
        **PIPELINE_PARAMS,
    },
) as dag:

    @task
    def resolve_inputs(**context) -> dict[str, str]:
        """Inputs from the run's params, or from the triggering Asset event's extra."""
        params = dict(context["params"])
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                params.update({k: v for k, v in (event.extra or {}).items() if k in params})
        missing = [k for k in ("model_uri", "calibration_data_uri", "eval_data_uri") if not params.get(k)]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: set them in the trigger form, -c JSON, or the Asset event extra")
        resolved = {k: params[k] for k in ("model_uri", "calibration_data_uri", "eval_data_uri")}
        # No training data: the pruned target fine-tunes on the calibration split (labels optional).
        resolved["train_data_uri"] = params.get("train_data_uri") or params["calibration_data_uri"]
        return resolved

    inputs = resolve_inputs()
    pipeline = optimization_pipeline(
        model_uri="{{ ti.xcom_pull(task_ids='resolve_inputs')['model_uri'] }}",
        calibration_data_uri="{{ ti.xcom_pull(task_ids='resolve_inputs')['calibration_data_uri'] }}",
        eval_data_uri="{{ ti.xcom_pull(task_ids='resolve_inputs')['eval_data_uri'] }}",
        train_data_uri="{{ ti.xcom_pull(task_ids='resolve_inputs')['train_data_uri'] }}",
        **pipeline_param_arguments(PIPELINE_PARAMS),
    )
    inputs >> pipeline
