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

from airflow.sdk import DAG, Asset, Param, task

from airflow_modelopt.pipelines import optimization_pipeline
from airflow_modelopt.targets import TARGETS

TRAINED_MODEL = Asset("modelopt_trained_model", uri="modelopt://trained-model")

with DAG(
    dag_id="modelopt_optimize",
    description="Build, validate, benchmark and promote deployables of a trained model.",
    schedule=[TRAINED_MODEL],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["modelopt"],
    params={
        "model_uri": Param(
            "", type="string", title="Model URI",
            description="The trained model: .pt2 path or URI, runs:/..., or models:/<name>/<version>",
        ),
        "calibration_data_uri": Param(
            "", type="string", title="Calibration data URI",
            description=".npz of calibration samples: inputs keyed by input name (or x), labels under y",
        ),
        "eval_data_uri": Param(
            "", type="string", title="Evaluation data URI",
            description=".npz of evaluation samples (disjoint from calibration); labels under y give accuracy",
        ),
        "train_data_uri": Param(
            "", type=["null", "string"], title="Training data URI (optional)",
            description=".npz the pruned target fine-tunes on: inputs, labels under y optional (without them "
            "the pruned model learns from the unpruned one by distillation); empty means the calibration split",
        ),
        "targets": Param(
            ["onnx_fp32", "onnx_int8_static", "tflite_int8"], type="array", title="Targets",
            items={"type": "string", "enum": list(TARGETS)}, minItems=1,
            description="Deployables to build; each is validated and benchmarked in its own branch",
        ),
        "registered_model_name": Param(
            "digits-optimized", type="string", minLength=1, maxLength=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
            title="Registered model name", description="MLflow registered model the passing candidates join",
        ),
        "max_accuracy_drop": Param(0.02, type="number", minimum=0, maximum=1, title="Max accuracy drop",
                                   description="Gate: candidate accuracy may fall at most this much (0.02 = 2 points)"),
        "min_top1_agreement": Param(0.95, type="number", minimum=0, maximum=1, title="Min top-1 agreement",
                                    description="Gate: share of samples whose top-1 class matches the source model"),
        "objective": Param("latency_p50", type="string", enum=["latency_p50", "size"], title="Objective",
                           description="What the champion minimizes among passing candidates"),
        "execution_mode": Param("", type=["null", "string"], enum=["", "local", "docker", "kubernetes"], title="Execution mode",
                                description="Where steps run; empty means [modelopt] execution_mode"),
        "force": Param(False, type="boolean", title="Force",
                       description="Rebuild even when a finished MLflow run with the same cache key exists"),
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
        targets="{{ params.targets }}",
        registered_model_name="{{ params.registered_model_name }}",
        max_accuracy_drop="{{ params.max_accuracy_drop }}",
        min_top1_agreement="{{ params.min_top1_agreement }}",
        objective="{{ params.objective }}",
        execution_mode="{{ params.execution_mode }}",
        force="{{ params.force }}",
    )
    inputs >> pipeline
