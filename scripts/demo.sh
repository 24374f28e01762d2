#!/usr/bin/env bash
# The example pipeline end to end with the embedded defaults: a SQLite Airflow home under
# .demo/airflow, the local MLflow store under it, every step in local mode. Run by `make demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.demo/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__MODELOPT__EXECUTION_MODE="${AIRFLOW__MODELOPT__EXECUTION_MODE:-local}"
mkdir -p "$AIRFLOW_HOME"
log="$AIRFLOW_HOME/demo-dag-test.log"

echo "==> Airflow home $AIRFLOW_HOME (SQLite); migrating the metadata database"
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }

echo "==> airflow dags test modelopt_retrain_and_optimize: train the digits CNN, then build onnx_fp32,"
echo "    onnx_int8_static and tflite_int8, validate and benchmark each, promote the passing ones; log: $log"
started=$SECONDS
conf='{"epochs": 15, "targets": ["onnx_fp32", "onnx_int8_static", "tflite_int8"], "registered_model_name": "digits-cnn"}'
if ! airflow dags test modelopt_retrain_and_optimize -c "$conf" >"$log" 2>&1; then
  grep -E "ERROR|error:|Traceback|failed" "$log" | tail -30
  echo "demo failed; full log: $log" >&2
  exit 1
fi
grep -E "airflow_modelopt.container.runner: (Eval accuracy|Exported in|Batch [0-9]+:|Verdict|Policy)" "$log" | sed 's/.*airflow_modelopt.container.runner: /   /' | sed 's/ \[airflow.task.*//'
grep -q "DagRun Finished.*state=success\|Marking run .* successful" "$log" || { echo "the DAG run did not succeed; log: $log" >&2; exit 1; }
echo "==> DAG run finished in $((SECONDS - started)) s"
python "$ROOT/scripts/demo_summary.py" "$AIRFLOW_HOME"
