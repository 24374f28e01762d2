"""The Airflow UI for real: `modelopt_optimize` triggered through its trigger form in headless Chromium.

A user opens the DAG, clicks Trigger, fills the form rendered from the DAG's Params and submits;
the run must succeed and promote in the MLflow Model Registry. The Params render as: plain inputs
for the URIs and the name, a multi-select of the known targets for ``targets`` (an array with
``examples``; ``values_display`` labels each with what it produces), a toggle for ``force`` and
react-select dropdowns for the enum strings. A name outside the list cannot be picked in the
form; the API still refuses it (``items.enum``) from any other client.

Screenshots of each step are in the test's tmp_path (``failure.png`` when a test fails).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_modelopt.targets import TARGETS
from tests.e2e.conftest import AirflowUI

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page
try:
    from playwright.sync_api import expect
except ImportError:  # the tier then skips, or fails under MODELOPT_REQUIRE_E2E=1 (see conftest)
    expect = None

DAG_ID = "modelopt_optimize"
RUN_TIMEOUT = 600.0  # the onnx_fp32 branch takes about a minute or two on two busy cores


def shot(page: Page, tmp_path: Path, name: str, readme: str | None = None) -> None:
    """A full-page screenshot in the test's tmp_path; with ``readme`` and $MODELOPT_SCREENSHOTS_DIR
    set (scripts/screenshots.py sets it), the visible part also as ``<readme>.png`` there."""
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    folder = os.environ.get("MODELOPT_SCREENSHOTS_DIR")
    if readme and folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{readme}.png"))


def open_trigger_form(page: Page, ui: AirflowUI) -> Locator:
    page.goto(f"{ui.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Trigger Dag - {DAG_ID}")
    expect(dialog.locator("#element_model_uri")).to_be_visible()
    return dialog


def fill(dialog: Locator, **values: str) -> None:
    for name, value in values.items():
        dialog.locator(f"#element_{name}").fill(value)


def target_label(target: str) -> str:
    from airflow_modelopt.targets import TARGET_DESCRIPTIONS

    return f"{target}: {TARGET_DESCRIPTIONS[target]}"


def set_targets(page: Page, dialog: Locator, targets: list[str]) -> None:
    """The targets Param is a multi-select: empty it, then pick each target from its list."""
    box = dialog.locator("#element_targets")
    combobox = box.get_by_role("combobox")
    combobox.click()
    for _ in range(len(TARGETS)):  # Backspace in the empty input removes the last chosen target
        combobox.press("Backspace")
    for target in targets:
        combobox.fill(target)
        page.get_by_role("option", name=target_label(target), exact=True).click()
    combobox.press("Tab")  # leave the field (Escape would close the whole dialog once the menu is shut)
    for target in targets:
        expect(box).to_contain_text(target_label(target))


def choose(page: Page, dialog: Locator, name: str, option: str, label: str | None = None) -> None:
    """Pick an option of an enum Param's dropdown (a react-select combobox), shown as ``label``."""
    dialog.locator(f"#element_{name} [role=combobox]").click()
    page.get_by_role("option", name=label or option, exact=True).click()
    expect(dialog.locator(f"input[name=element_{name}]")).to_have_value(option)


def submit(page: Page, dialog: Locator) -> Any:
    """Click Trigger; returns the API's answer to the POST the form sends."""
    button = dialog.get_by_test_id("trigger-dag-submit")
    expect(button).to_be_enabled()
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/api/v2/dags/{DAG_ID}/dagRuns")
    ) as answer:
        button.click()
    return answer.value


def test_form_offers_the_known_targets_and_the_api_refuses_others(airflow_ui: AirflowUI, page: Page,
                                                                 tmp_path: Path) -> None:
    """Targets is a multi-select listing every known target with what it produces; a name outside
    the list finds no option. A client that bypasses the form (the REST API, ``-c`` JSON) gets a
    400 naming the param, the wrong value and the allowed ones, and no DAG run is created."""
    dialog = open_trigger_form(page, airflow_ui)
    box = dialog.locator("#element_targets")
    combobox = box.get_by_role("combobox")
    combobox.click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    offered = options.all_inner_texts()
    # The defaults (three targets) are already chosen; the rest are offered, each with its description.
    assert {target_label(t) for t in TARGETS} - {target_label(t) for t in ("onnx_fp32", "onnx_int8_static", "tflite_int8")} \
        == set(offered), offered
    shot(page, tmp_path, "targets-open", readme="trigger-form-targets")
    combobox.fill("onnx_fp64")
    expect(page.get_by_role("option")).to_have_count(0)
    page.keyboard.press("Escape")

    runs_before = len(airflow_ui.dag_runs(DAG_ID))
    status, body = airflow_ui.api("POST", f"dags/{DAG_ID}/dagRuns", {
        "logical_date": None, "conf": {"model_uri": "/m.pt2", "calibration_data_uri": "/c.npz",
                                       "eval_data_uri": "/e.npz", "targets": ["onnx_fp32", "onnx_fp64"]}})
    assert status == 400, body
    assert "targets" in str(body) and "'onnx_fp64' is not one of" in str(body) and "onnx_int8_static" in str(body)
    assert len(airflow_ui.dag_runs(DAG_ID)) == runs_before, "a refused trigger still created a DAG run"


def test_form_defaults_leave_only_the_inputs_to_fill(airflow_ui: AirflowUI, page: Page, tmp_path: Path) -> None:
    """With the model and data URIs filled and every other Param at its default, Trigger is enabled:
    `execution_mode` defaults to the configured mode (its option says so), the optional toggle
    carries no required marker, and the registered model is the demo's."""
    dialog = open_trigger_form(page, airflow_ui)
    for target in ("onnx_fp32", "onnx_int8_static", "tflite_int8"):
        expect(dialog.locator("#element_targets")).to_contain_text(target_label(target))
    expect(dialog.locator("#element_execution_mode")).to_contain_text("default ([modelopt] execution_mode)")
    expect(dialog.locator("#element_registered_model_name")).to_have_value("digits-cnn")
    # The form marks a required Param with "*" after its title; Force rebuild is optional.
    expect(dialog.get_by_text("Force rebuild", exact=True)).to_be_visible()
    expect(dialog.get_by_text("Model URI *", exact=True)).to_be_visible()
    expect(dialog.get_by_text("Force rebuild *", exact=True)).to_have_count(0)
    fill(dialog, model_uri="/nonexistent/model.pt2", calibration_data_uri="/nonexistent/calibration.npz",
         eval_data_uri="/nonexistent/eval.npz")
    dialog.locator("#element_eval_data_uri").blur()
    shot(page, tmp_path, "defaults")
    # The form's rule: a Param whose schema type does not include "null" is required, and "" or
    # None counts as missing. Name the defaults that fall foul of it if Trigger stays disabled.
    _, details = airflow_ui.api("GET", f"dags/{DAG_ID}/details")
    blocking = {name: p["value"] for name, p in details["params"].items()
                if p["value"] in ("", None) and "null" not in _types(p["schema"].get("type"))
                and name not in ("model_uri", "calibration_data_uri", "eval_data_uri")}
    expect(dialog.get_by_test_id("trigger-dag-submit"),
           f"Trigger stays disabled with the default Params: the form treats {blocking} as required and empty "
           f"(give such a Param type=['null', 'string'] or a non-empty default)").to_be_enabled(timeout=5_000)


def _types(schema_type: Any) -> list[str]:
    return list(schema_type) if isinstance(schema_type, list) else [schema_type]


def test_form_triggers_a_run_that_promotes_in_mlflow(airflow_ui: AirflowUI, page: Page, tmp_path: Path,
                                                     example_model: dict[str, Any], mlflow_server: Any) -> None:
    """Fill the form with the example model, target onnx_fp32 only, submit, wait for the run to
    succeed, then find the new version in the MLflow registry with aliases onnx_fp32 and champion,
    a description and a few tags; the task pages link to the MLflow runs, the DAG run's parent
    MLflow run is closed with the summary metrics."""
    artifacts = example_model["artifacts"]
    name = f"e2e-digits-{uuid.uuid4().hex[:8]}"
    dialog = open_trigger_form(page, airflow_ui)
    shot(page, tmp_path, "01-form")
    fill(dialog, model_uri=artifacts["model_pt2"], calibration_data_uri=artifacts["calibration_data"],
         eval_data_uri=artifacts["eval_data"], registered_model_name=name)
    set_targets(page, dialog, ["onnx_fp32"])
    choose(page, dialog, "execution_mode", "local", "local (subprocess on the worker)")  # as a user would
    shot(page, tmp_path, "02-filled", readme="trigger-form")
    answer = submit(page, dialog)
    assert answer.status == 200, answer.text()
    run = answer.json()
    run_id = run["dag_run_id"]
    # What the form sent: a real list for the array Param, the typed values verbatim.
    assert run["conf"]["targets"] == ["onnx_fp32"], run["conf"]
    assert run["conf"]["model_uri"] == artifacts["model_pt2"], run["conf"]
    assert run["conf"]["registered_model_name"] == name, run["conf"]
    expect(dialog).to_be_hidden()
    shot(page, tmp_path, "03-triggered")

    started = time.monotonic()
    state = airflow_ui.wait_for_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    assert state == "success", f"DAG run {run_id} ended {state} after {elapsed:.0f} s"
    print(f"DAG run {run_id} succeeded in {elapsed:.0f} s")

    # The UI shows the finished run.
    page.goto(f"{airflow_ui.url}/dags/{DAG_ID}/runs/{run_id}")
    expect(page.get_by_role("heading", name=run_id)).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    shot(page, tmp_path, "04-run-succeeded")
    # The grid reads per target: expand the groups (optimize, then every group in it).
    page.goto(f"{airflow_ui.url}/dags/{DAG_ID}/runs/{run_id}")
    # "Expand all" is disabled while every group is already open (the grid can restore open groups).
    expand = page.get_by_role("button", name="Expand all task groups")
    expect(expand).to_be_visible()
    if expand.is_enabled():
        expand.click()
    expect(page.get_by_role("link", name="validate onnx_fp32").first).to_be_visible()
    shot(page, tmp_path, "05-grid-groups", readme="dag-run-grid")

    client = mlflow_server.client()
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [(v.version, v.tags) for v in versions]
    version = versions[0]
    assert run_id in version.tags.values(), f"version {version.version} does not name the DAG run: {version.tags}"
    assert "onnx_fp32" in version.tags.values(), version.tags
    for alias in ("onnx_fp32", "champion"):
        assert client.get_model_version_by_alias(name, alias).version == version.version, alias
    assert set(client.get_registered_model(name).aliases) == {"onnx_fp32", "champion"}

    # The version explains itself in its description; tags are the few people filter on.
    assert "**onnx_fp32**: passed" in (version.description or ""), version.description
    assert "latency p50 (ms)" in version.description and "Lineage: export_onnx (torch_to_onnx)" in version.description
    assert version.tags["modelopt.target"] == "onnx_fp32" and version.tags["modelopt.verdict"] == "passed"
    assert len(version.tags) <= 16, sorted(version.tags)
    if getattr(version, "model_id", None):  # an MLflow 3 logged model carries every metric
        model = client.get_logged_model(version.model_id)
        assert {"accuracy_drop", "latency_ms_p50"} <= {m.key for m in model.metrics or []}, model.metrics

    # The DAG run's parent MLflow run ended with the outcome and the winner's figures.
    experiment = client.get_experiment_by_name(DAG_ID)
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`modelopt.role` = 'dag_run' and tags.`airflow.run_id` = '{run_id}'")
    assert len(parents) == 1, parents
    parent = parents[0]
    assert parent.info.status == "FINISHED", parent.info.status
    assert parent.data.metrics["modelopt.candidates_passed"] == 1.0
    assert parent.data.metrics["modelopt.champion_latency_ms_p50"] > 0
    assert parent.data.params["registered_model_name"] == name

    # Each step task links to its MLflow run, promote also to the registered model.
    def links(task_id: str) -> dict[str, Any]:
        status, body = airflow_ui.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/links")
        assert status == 200, body
        return body["extra_links"]

    status, xcom = airflow_ui.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/"
                                  "optimize.validate_onnx_fp32/xcomEntries/return_value?deserialize=true")
    assert status == 200, xcom
    result = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert client.get_run(result["mlflow_run_id"]).data.tags["modelopt.step"] == "validate"
    expected = f"{mlflow_server.uri}/#/experiments/{result['experiment_id']}/runs/{result['mlflow_run_id']}"
    assert links("optimize.validate_onnx_fp32") == {"MLflow run": expected}
    promote_links = links("optimize.promote")
    assert promote_links["MLflow registered model"] == f"{mlflow_server.uri}/#/models/{name}", promote_links
    # ... and the task's Details tab shows the link as a button a user can follow.
    page.goto(f"{airflow_ui.url}/dags/{DAG_ID}/runs/{run_id}/tasks/optimize.validate_onnx_fp32/details")
    button = page.get_by_role("link", name="MLflow run")
    expect(button).to_have_attribute("href", expected)
    shot(page, tmp_path, "06-task-link", readme="task-mlflow-link")
    if os.environ.get("MODELOPT_SCREENSHOTS_DIR"):  # the MLflow side, for the README only
        for path, readme, text in (
                (f"#/models/{name}", "mlflow-registered-model", name),
                (f"#/models/{name}/versions/{version.version}", "mlflow-model-version", "Lineage"),
                (f"#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}", "mlflow-parent-run",
                 parent.info.run_name or parent.info.run_id)):
            page.goto(f"{mlflow_server.uri}/{path}")
            expect(page.get_by_text(text).first).to_be_visible(timeout=60_000)  # MLflow's UI polls: no networkidle
            page.wait_for_timeout(2_000)
            shot(page, tmp_path, readme, readme=readme)
