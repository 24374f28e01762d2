"""The Airflow UI for real: `modelopt_optimize` triggered through its trigger form in headless Chromium.

A user opens the DAG, clicks Trigger, fills the form rendered from the DAG's Params and submits;
the run must succeed and promote in the MLflow Model Registry. The Params render as: plain inputs
for the URIs and the name, a textarea with one value per line for ``targets`` (an array of
strings; its enum lives under ``items``, so the form shows no multi-select) and react-select
dropdowns for the enum strings. The UI validates only presence client side; the enum of
``targets`` is enforced by the API on submit, and the dialog shows its message.

Screenshots of each step are in the test's tmp_path (``failure.png`` when a test fails).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.conftest import AirflowUI

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page
try:
    from playwright.sync_api import expect
except ImportError:  # the tier then skips, or fails under MODELOPT_REQUIRE_E2E=1 (see conftest)
    expect = None

DAG_ID = "modelopt_optimize"
RUN_TIMEOUT = 600.0  # the onnx_fp32 branch takes about a minute or two on two busy cores


def shot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


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


def set_targets(dialog: Locator, targets: list[str]) -> None:
    """The array-of-enum Param is a textarea: one target per line."""
    dialog.locator("#element_targets").fill("\n".join(targets))


def choose(page: Page, dialog: Locator, name: str, option: str) -> None:
    """Pick an option of an enum Param's dropdown (a react-select combobox)."""
    dialog.locator(f"#element_{name} [role=combobox]").click()
    page.get_by_role("option", name=option, exact=True).click()
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


def test_form_refuses_an_unknown_target_with_a_message_naming_it(airflow_ui: AirflowUI, page: Page,
                                                                 tmp_path: Path) -> None:
    """`onnx_fp64` typed into Targets: the API answers 400, the dialog says which param and value
    are wrong and what is allowed, and no DAG run is created. (The form itself does not check
    enums of array items, so the refusal comes from the API's Param validation, shown in the UI.)"""
    runs_before = len(airflow_ui.dag_runs(DAG_ID))
    dialog = open_trigger_form(page, airflow_ui)
    fill(dialog, model_uri="/nonexistent/model.pt2", calibration_data_uri="/nonexistent/calibration.npz",
         eval_data_uri="/nonexistent/eval.npz", registered_model_name=f"e2e-refused-{uuid.uuid4().hex[:8]}")
    set_targets(dialog, ["onnx_fp32", "onnx_fp64"])
    choose(page, dialog, "execution_mode", "local")  # as a user choosing the mode would
    answer = submit(page, dialog)
    assert answer.status == 400, answer.text()

    message = dialog.get_by_text("Invalid input for param targets")
    expect(message).to_be_visible()
    expect(message).to_contain_text("'onnx_fp64' is not one of")
    expect(message).to_contain_text("onnx_int8_static")  # the allowed values are listed
    expect(dialog).to_be_visible()  # the form stays open for a correction
    message.scroll_into_view_if_needed()
    shot(page, tmp_path, "refused")
    assert len(airflow_ui.dag_runs(DAG_ID)) == runs_before, "a refused trigger still created a DAG run"


def test_form_defaults_leave_only_the_inputs_to_fill(airflow_ui: AirflowUI, page: Page, tmp_path: Path) -> None:
    """With the model and data URIs filled and every other Param at its default, Trigger is enabled:
    `execution_mode` defaults to the configured mode, so the user must not have to pick one."""
    dialog = open_trigger_form(page, airflow_ui)
    expect(dialog.locator("#element_targets")).to_have_value("onnx_fp32\nonnx_int8_static\ntflite_int8")
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
    succeed, then find the new version in the MLflow registry with aliases onnx_fp32 and champion."""
    artifacts = example_model["artifacts"]
    name = f"e2e-digits-{uuid.uuid4().hex[:8]}"
    dialog = open_trigger_form(page, airflow_ui)
    shot(page, tmp_path, "01-form")
    fill(dialog, model_uri=artifacts["model_pt2"], calibration_data_uri=artifacts["calibration_data"],
         eval_data_uri=artifacts["eval_data"], registered_model_name=name)
    set_targets(dialog, ["onnx_fp32"])
    choose(page, dialog, "execution_mode", "local")  # as a user choosing the mode would
    shot(page, tmp_path, "02-filled")
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

    client = mlflow_server.client()
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [(v.version, v.tags) for v in versions]
    version = versions[0]
    assert run_id in version.tags.values(), f"version {version.version} does not name the DAG run: {version.tags}"
    assert "onnx_fp32" in version.tags.values(), version.tags
    for alias in ("onnx_fp32", "champion"):
        assert client.get_model_version_by_alias(name, alias).version == version.version, alias
    assert set(client.get_registered_model(name).aliases) == {"onnx_fp32", "champion"}
