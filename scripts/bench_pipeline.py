"""What a modelopt_optimize run costs beyond its steps' work: the floor Airflow itself imposes on the
same task graph, a cold run, and a fully cached re-run, side by side on this machine.

* **floor**: the same task graph of no-op Python tasks, two ways. *graph*: every task of
  ``modelopt_optimize``, with its dependencies and trigger rule, the branch following the same
  targets as the cold run, so Airflow creates, schedules and skips the same task instances
  (checked: the floor run's task states must equal the cold run's). *executed*: only the tasks the
  cold run executed (the stricter yardstick: Airflow's cost of the unselected targets' task
  instances counts as overhead). Ratios are printed against both.
* **cold**: ``modelopt_optimize`` on the example digits CNN (trained first by ``train_example``), local
  mode, against a real ``mlflow server`` on loopback.
* **cached**: the same DAG and conf again: every step finds its cache entry, on the Airflow worker
  without starting a step process (``operators/worker_cache.py``) where it can be decided there
  (the table's "on the worker" count); promotion is never cached and runs its step (under ``dags
  test`` forked from the warm interpreter, ``operators/warm_start.py``, which the second task starts).

Each is run under ``airflow dags test`` (one process, tasks in turn) and, with ``--scheduler``, under
a real scheduler with the LocalExecutor (``parallelism`` 4, tasks in their own processes, triggered
over the REST API; the e2e tier's Airflow stack). Step compute is the sum of the step runs' MLflow
durations (start to end of each ``airflow-modelopt run``'s run). Prints one table, the seconds
Airflow recorded for each task in each run (where the time over the floor sits), the ratios issue 12
holds the pipeline to (cached <= 1.3x floor; cold <= compute + 1.3x floor), and the command. The floors
and the cached re-run are each run ``--repeats`` times (3), alternating, and their medians compared:
on a shared 2-core machine one run's ratio moves by 0.1x from run to run.

    .venv/bin/python scripts/bench_pipeline.py [--targets onnx_fp32 onnx_int8_static] [--scheduler] [--repeats 3]

The runs use a copy of the package and the DAG taken when the script starts (``<work>/src``, first on
``PYTHONPATH``, every process started in ``<work>``): the cache key covers the container side's code,
so an edit of the checkout while the script runs would otherwise turn the cached re-run cold (the
table's "steps (cached)" column shows whether it was).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from _bench_common import mlflow_server, run_step

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOOR_DAG = '''"""No-op twins of modelopt_optimize's task graph (scripts/bench_pipeline.py writes them)."""
import json
from datetime import datetime
from pathlib import Path

from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import DAG

GRAPH = json.loads((Path(__file__).with_name("floor_graph.json")).read_text())


def _id(task_id):
    return task_id.replace(".", "__")


def _noop():
    return None


# executed: the tasks the cold run executed, default trigger rules.
with DAG("modelopt_floor", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as executed:
    ran = {t: PythonOperator(task_id=_id(t), python_callable=_noop) for t, g in GRAPH.items() if g["state"] == "success"}
    for t, op in ran.items():
        for u in GRAPH[t]["upstream"]:
            if u in ran:
                ran[u] >> op

# graph: every task, its trigger rule, the branches following what the cold run followed.
with DAG("modelopt_floor_graph", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as whole:
    ops = {}
    for t, g in GRAPH.items():
        if g["follow"] is not None:
            ops[t] = BranchPythonOperator(task_id=_id(t), trigger_rule=g["trigger_rule"],
                                          python_callable=lambda follow=tuple(_id(f) for f in g["follow"]): list(follow))
        else:
            ops[t] = PythonOperator(task_id=_id(t), trigger_rule=g["trigger_rule"], python_callable=_noop)
    for t, g in GRAPH.items():
        for u in g["upstream"]:
            ops[u] >> ops[t]
'''

FLOORS = {"floor": "modelopt_floor", "floor (graph)": "modelopt_floor_graph"}


def snapshot(work: Path) -> Path:
    """A copy of the package and the DAGs as they are now; this process and every one it starts
    import them (``PYTHONPATH``, and ``<work>`` as the current folder, which ``python -m`` puts first)."""
    src = work / "src"
    for name in ("airflow_modelopt", "dags"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.chdir(work)
    return src


def airflow_env(home: Path, dags: Path, tracking_uri: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": tracking_uri, "AIRFLOW__MODELOPT__EXECUTION_MODE": "local",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


def airflow(env: dict[str, str], *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def dags_test(env: dict[str, str], dag_id: str, conf: dict[str, Any]) -> float:
    started = time.monotonic()
    proc = airflow(env, "dags", "test", dag_id, "-c", json.dumps(conf))
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"airflow dags test {dag_id} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall


def run_graph(env: dict[str, str], dag_id: str, dag_folder: Path) -> dict[str, dict[str, Any]]:
    """Task id -> its upstream task ids, trigger rule, state in the DAG's latest run and, for a
    branch, the downstream tasks that run followed (None for other tasks)."""
    code = f"""
import json
from airflow.dag_processing.dagbag import DagBag
from airflow.models import DagRun, TaskInstance
from airflow.sdk.bases.branch import BranchMixIn
from airflow.utils.session import create_session
dag = DagBag({str(dag_folder)!r}).get_dag({dag_id!r})
with create_session() as session:
    run = session.query(DagRun).filter(DagRun.dag_id == {dag_id!r}).order_by(DagRun.start_date.desc()).first()
    tis = session.query(TaskInstance).filter(TaskInstance.dag_id == {dag_id!r}, TaskInstance.run_id == run.run_id)
    state = {{ti.task_id: str(ti.state) for ti in tis}}
print(json.dumps({{t.task_id: {{"upstream": sorted(t.upstream_task_ids), "trigger_rule": getattr(t.trigger_rule, "value", str(t.trigger_rule)),
                               "state": state.get(t.task_id, "None"),
                               "follow": sorted(d for d in t.downstream_task_ids if state.get(d) != "skipped")
                                         if isinstance(t, BranchMixIn) else None}}
                  for t in dag.tasks}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading the run's task graph failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_floor_states(env: dict[str, str], graph: dict[str, dict[str, Any]], dags: Path) -> None:
    """The whole-graph floor's latest run left every task in the state the cold run left it."""
    states = {t.replace("__", "."): g["state"] for t, g in run_graph(env, "modelopt_floor_graph", dags).items()}
    differ = {t: (g["state"], states.get(t)) for t, g in graph.items() if g["state"] != states.get(t)}
    if differ:
        raise RuntimeError(f"the whole-graph floor did not reproduce the cold run's task states: {differ}")


def task_durations(env: dict[str, str], dag_id: str) -> dict[str, float]:
    """Task id (floor ids mapped back: ``__`` -> ``.``) -> seconds Airflow recorded for it, for the
    DAG's latest run, plus ``(before the first task)``: from the run's start to its first task's."""
    code = f"""
import json
from airflow.models import DagRun, TaskInstance
from airflow.utils.session import create_session
with create_session() as session:
    run = session.query(DagRun).filter(DagRun.dag_id == {dag_id!r}).order_by(DagRun.start_date.desc()).first()
    tis = [ti for ti in session.query(TaskInstance).filter(TaskInstance.dag_id == {dag_id!r},
           TaskInstance.run_id == run.run_id) if ti.state == "success" and ti.start_date]
    out = {{ti.task_id.replace("__", "."): (ti.end_date - ti.start_date).total_seconds() for ti in tis}}
    out["(before the first task)"] = (min(ti.start_date for ti in tis) - run.start_date).total_seconds()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading task durations failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_compute(tracking_uri: str, after_ms: int, before_ms: int) -> tuple[float, int, int, int]:
    """(seconds of step runs, number of steps, cache hits, hits found on the worker without a step
    process) for step runs started in the window."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("modelopt_optimize")
    runs = client.search_runs([experiment.experiment_id], "tags.`modelopt.role` = 'step'", max_results=1000)
    window = [r for r in runs if after_ms <= r.info.start_time <= before_ms and r.info.end_time]
    total = sum((r.info.end_time - r.info.start_time) / 1000 for r in window)
    hits = sum(r.data.tags.get("modelopt.cache_hit") == "true" for r in window)
    worker = sum(r.data.tags.get("modelopt.cache_lookup") == "worker" for r in window)
    return total, len(window), hits, worker


def timed(label: str, fn: Any, tracking_uri: str, rows: list[dict[str, Any]], mode: str,
          env: dict[str, str] | None = None) -> None:
    after = int(time.time() * 1000)
    wall = fn()
    compute, steps, hits, worker = (step_compute(tracking_uri, after, int(time.time() * 1000))
                                    if label not in FLOORS else (0, 0, 0, 0))
    tasks = task_durations(env, FLOORS.get(label, "modelopt_optimize")) if env else {}
    rows.append({"mode": mode, "run": label, "wall_s": wall, "compute_s": compute, "steps": steps, "hits": hits,
                 "worker": worker, "tasks": tasks})
    print(f"  {mode:10s} {label:7s} wall {wall:6.1f} s  step compute {compute:6.1f} s  ({steps} steps, {hits} cached, "
          f"{worker} of them on the worker)", flush=True)


def scheduler_runs(env: dict[str, str], work: Path, conf: dict[str, Any], tracking_uri: str,
                   rows: list[dict[str, Any]], repeats: int) -> None:
    import secrets

    from tests.conftest import free_port
    from tests.e2e.conftest import AirflowUI

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "4",
           "AIRFLOW__CORE__AUTH_MANAGER":
               "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True", "AIRFLOW__API__BASE_URL": url,
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
           "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
           "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
           "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1", "PYTHONUNBUFFERED": "1"}
    stack = AirflowUI(url=url, home=Path(env["AIRFLOW_HOME"]), env=env)
    stack.start()
    try:
        for dag_id in (*FLOORS.values(), "modelopt_optimize"):
            stack.wait_until_ready(dag_id)
        for dag_id in (*FLOORS.values(), "modelopt_optimize"):
            stack.api("PATCH", f"dags/{dag_id}", {"is_paused": False})

        def trigger(dag_id: str, body_conf: dict[str, Any]) -> float:
            """Seconds from the trigger request to the end Airflow recorded for the run (the
            polling below sees the end only every few seconds)."""
            from datetime import datetime

            started = time.time()
            status, run = stack.api("POST", f"dags/{dag_id}/dagRuns",
                                    {"logical_date": None, "conf": body_conf})
            if status not in (200, 201):
                raise RuntimeError(f"trigger {dag_id}: HTTP {status}: {run}")
            state = stack.wait_for_run(dag_id, run["dag_run_id"], timeout=3600)
            if state != "success":
                raise RuntimeError(f"{dag_id} run ended {state}:\n{stack.diagnostics()}")
            _, done = stack.api("GET", f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}")
            return datetime.fromisoformat(done["end_date"].replace("Z", "+00:00")).timestamp() - started

        for _ in range(repeats):
            for label, dag_id in FLOORS.items():
                timed(label, lambda dag_id=dag_id: trigger(dag_id, {}), tracking_uri, rows, "scheduler", env)
        # force: the dags-test runs above filled the cache; this run must build everything again.
        timed("cold", lambda: trigger("modelopt_optimize", {**conf, "registered_model_name": "bench-sched",
                                                            "force": True}),
              tracking_uri, rows, "scheduler", env)
        for _ in range(repeats):
            timed("cached", lambda: trigger("modelopt_optimize", {**conf, "registered_model_name": "bench-sched"}),
                  tracking_uri, rows, "scheduler", env)
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["onnx_fp32", "onnx_int8_static", "tflite_int8"])
    parser.add_argument("--scheduler", action="store_true", help="also run under a scheduler with LocalExecutor")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the floor and of the cached re-run, each (their medians are compared)")
    args = parser.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="modelopt-bench-pipeline-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = snapshot(work)
    load_before = os.getloadavg()[0]
    print(f"work folder {work}; code measured: {src}; targets {args.targets}", flush=True)
    with mlflow_server(work / "mlflow") as store:
        uri = store["MLFLOW_TRACKING_URI"]
        trained = run_step("train_example", {"context": {"experiment_name": "modelopt_optimize"}},
                           {**store, "MODELOPT_LOG_LEVEL": "WARNING"})["artifacts"]
        conf = {"model_uri": trained["model_pt2"], "calibration_data_uri": trained["calibration_data"],
                "eval_data_uri": trained["eval_data"], "targets": args.targets,
                "registered_model_name": "bench-dags-test"}
        dags = work / "dags"
        dags.mkdir()
        (dags / "modelopt_optimize.py").symlink_to(src / "dags" / "modelopt_optimize.py")
        home = work / "airflow"
        env = airflow_env(home, dags, uri)
        migrate = airflow(env, "db", "migrate", timeout=900)
        if migrate.returncode != 0:
            raise RuntimeError(migrate.stderr[-2000:])
        rows: list[dict[str, Any]] = []
        timed("cold", lambda: dags_test(env, "modelopt_optimize", conf), uri, rows, "dags test", env)
        graph = run_graph(env, "modelopt_optimize", src / "dags")
        (dags / "floor_graph.json").write_text(json.dumps(graph))
        (dags / "modelopt_floor.py").write_text(FLOOR_DAG)
        for i in range(args.repeats):  # alternating, so drift in the machine's speed hits all three
            timed("cached", lambda: dags_test(env, "modelopt_optimize", conf), uri, rows, "dags test", env)
            for label, dag_id in FLOORS.items():
                timed(label, lambda dag_id=dag_id: dags_test(env, dag_id, {}), uri, rows, "dags test", env)
            if i == 0:
                check_floor_states(env, graph, dags)
        if args.scheduler:
            scheduler_runs(env, work, conf, uri, rows, args.repeats)

    graph = json.loads((dags / "floor_graph.json").read_text())
    executed = sum(g["state"] == "success" for g in graph.values())
    print(f"\nmodelopt_optimize, targets {', '.join(args.targets)}: {len(graph)} tasks, {executed} executed; "
          f"this machine: {os.cpu_count()} CPUs, load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    argv = " ".join(a for a in sys.argv[1:])
    print(f"reproduce: .venv/bin/python scripts/bench_pipeline.py{' ' + argv if argv else ''}\n")
    print("| mode | run | wall s | step compute s | steps (cached, on the worker) | wall / floor (executed) "
          "| wall / floor (graph) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    def median_wall(mode: str, run: str) -> float:
        return statistics.median(x["wall_s"] for x in rows if x["mode"] == mode and x["run"] == run)

    for r in rows:
        floors = [median_wall(r["mode"], label) for label in FLOORS]
        print(f"| {r['mode']} | {r['run']} | {r['wall_s']:.1f} | {r['compute_s']:.1f} | {r['steps']} ({r['hits']}, "
              f"{r['worker']}) | " + " | ".join(f"{r['wall_s'] / f:.2f}x" for f in floors) + " |")
    print("\nSeconds Airflow recorded per task (start to end of the task instance; a step task's includes its step "
          "process):\n")
    columns = [f"{r['mode']} {r['run']}" + (f" {sum((x['mode'], x['run']) == (r['mode'], r['run']) for x in rows[:i]) + 1}"
                                             if r["run"] != "cold" and args.repeats > 1 else "")
               for i, r in enumerate(rows)]
    print("| task | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for task in dict.fromkeys(t for r in rows for t in r["tasks"]):
        print(f"| {task} | " + " | ".join(f"{r['tasks'][task]:.2f}" if task in r["tasks"] else "" for r in rows)
              + " |")
    print()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        cold = next(r for r in rows if r["mode"] == mode and r["run"] == "cold")
        cached = median_wall(mode, "cached")
        for label in FLOORS:
            floor = median_wall(mode, label)
            print(f"{mode}, against the {label}: cached re-run {cached / floor:.2f}x (medians of {args.repeats}; "
                  f"target <= 1.3x); cold run {cold['wall_s']:.1f} s vs step compute + 1.3x floor = "
                  f"{cold['compute_s'] + 1.3 * floor:.1f} s "
                  f"({'met' if cold['wall_s'] <= cold['compute_s'] + 1.3 * floor else 'not met'})")


if __name__ == "__main__":
    main()
