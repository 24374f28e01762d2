#!/usr/bin/env bash
# Cold vs cached modelopt_optimize on the example model, three targets, local mode, embedded store.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="${MEASURE_DIR:-/tmp/modelopt-measure}"
rm -rf "$D" && mkdir -p "$D/airflow/modelopt"
export AIRFLOW_HOME=$D/airflow AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags AIRFLOW__CORE__LOAD_EXAMPLES=False
export PATH=$ROOT/.venv/bin:$PATH
airflow db migrate > $D/migrate.log 2>&1
export MLFLOW_TRACKING_URI=sqlite:///$D/airflow/modelopt/mlflow.db MODELOPT_ARTIFACT_ROOT=$D/airflow/modelopt/artifacts
airflow-modelopt run train_example --spec '{"context": {"experiment_name": "modelopt_optimize"}}' 2>/dev/null | tail -1 > $D/train.json
unset MLFLOW_TRACKING_URI MODELOPT_ARTIFACT_ROOT
conf=$(python3 -c "
import json; a=json.load(open('$D/train.json'))['artifacts']
print(json.dumps({'model_uri': a['model_pt2'], 'calibration_data_uri': a['calibration_data'], 'eval_data_uri': a['eval_data'],
 'targets': ['onnx_fp32', 'onnx_int8_static', 'tflite_int8'], 'registered_model_name': 'digits-measure'}))")
for attempt in cold cached; do
  start=$(date +%s.%N)
  airflow dags test modelopt_optimize -c "$conf" > $D/$attempt.log 2>&1
  end=$(date +%s.%N)
  echo "$attempt wall_s $(python3 -c "print(round($end - $start, 1))")"
done
# Sum of step compute (MLflow run durations) against the wall time, per DAG run:
"$ROOT/.venv/bin/python" - "$D" <<'PY'
import sys
from mlflow import MlflowClient
c = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/airflow/modelopt/mlflow.db")
exp = c.get_experiment_by_name("modelopt_optimize")
for p in c.search_runs([exp.experiment_id], "tags.`modelopt.role` = 'dag_run'", order_by=["attributes.start_time ASC"]):
    kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")
    total = sum((k.info.end_time - k.info.start_time) / 1000 for k in kids if k.info.end_time)
    hits = sum(k.data.tags.get("modelopt.cache_hit") == "true" for k in kids)
    span = (max(k.info.end_time for k in kids) - min(k.info.start_time for k in kids)) / 1000
    print(f"{p.data.tags['airflow.run_id']}: {len(kids)} steps, {hits} cache hits, "
          f"step compute {total:.1f} s, first start to last end {span:.1f} s")
PY
