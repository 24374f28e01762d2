"""torch_to_onnx against a real MLflow server over HTTP, in local mode (the entry point as a
subprocess): each accepted input kind, the checks at other batch sizes, and bad input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MlflowServer, free_port, run_step

EXPERIMENT = {"context": {"experiment_name": "tests-torch-to-onnx"}}


def _download(uri: str, server: MlflowServer, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(server.uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def test_onnx_folder_in_mlflow_matches_torch_at_batch_1_and_7(mlflow_server, example_model, example_onnx, tmp_path):
    import onnxruntime as ort
    import torch

    folder = _download(example_onnx["artifacts"]["onnx_model"], mlflow_server, tmp_path / "onnx")
    assert (folder / "MLmodel").is_file() and "onnx" in (folder / "MLmodel").read_text()
    graph = folder / "model.onnx"
    assert graph.is_file()
    assert len(list(folder.glob("*.onnx*"))) >= 1
    pt2 = _download(example_model["artifacts"]["model_pt2"], mlflow_server, tmp_path / "pt2")
    module = torch.export.load(str(pt2)).module()
    data = np.load(_download(example_model["artifacts"]["eval_data"], mlflow_server, tmp_path / "data"))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for batch in (1, 7):
        x = data["x"][:batch]
        got = session.run(None, {input_name: x})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 10)
        assert np.max(np.abs(got - want)) < 1e-4
    metrics = example_onnx["metrics"]
    assert metrics["max_abs_error_batch_1"] < 1e-4 and metrics["max_abs_error_batch_7"] < 1e-4
    assert metrics["data_samples"] == len(data["y"])
    assert metrics["onnx_node_count"] > 0 and metrics["onnx_param_count"] > 30_000
    assert example_onnx["info"]["op_histogram"]["Conv"] == 2


def test_run_is_nested_under_its_parent_with_stats(mlflow_server, example_onnx):
    client = mlflow_server.client()
    run = client.get_run(example_onnx["mlflow_run_id"])
    assert run.data.tags["modelopt.status"] == "succeeded"
    assert run.data.tags["modelopt.cache_key"] == example_onnx["cache_key"]
    assert run.data.tags["modelopt.execution_mode"] == "local"
    assert run.data.metrics["max_abs_error"] == pytest.approx(example_onnx["metrics"]["max_abs_error"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "onnx_graph_stats.json" in names and "modelopt" in names


def test_mlflow_pytorch_model_uri_and_torchscript_are_accepted(mlflow_server, example_model, tmp_path):
    import torch

    from airflow_modelopt.container.examples.digits import DigitsCNN

    by_uri = run_step("torch_to_onnx", {**EXPERIMENT, "model_uri": example_model["artifacts"]["pytorch_model"],
                                        "data_uri": example_model["artifacts"]["eval_data"]}, mlflow_server.env())
    assert by_uri.returncode == 0, by_uri.output[-2000:]
    assert by_uri.result["info"]["source_kind"] == "mlflow_pytorch"
    assert by_uri.result["metrics"]["max_abs_error"] < 1e-4

    scripted = tmp_path / "digits.ts"
    torch.jit.script(DigitsCNN().eval()).save(str(scripted))
    ts = run_step("torch_to_onnx", {**EXPERIMENT, "model_uri": str(scripted), "input_shapes": {"x": [2, 1, 8, 8]}},
                  mlflow_server.env())
    assert ts.returncode == 0, ts.output[-2000:]
    assert ts.result["info"]["source_kind"] == "torchscript"
    assert ts.result["info"]["signature"]["inputs"][0]["shape"][0] == "batch"


def test_second_identical_run_is_a_cache_hit_and_force_rebuilds(mlflow_server, example_model):
    spec = {"model_uri": example_model["artifacts"]["model_pt2"], "input_shapes": {"x": [2, 1, 8, 8]},
            "context": {"experiment_name": "tests-cache"}}
    first = run_step("torch_to_onnx", spec, mlflow_server.env())
    assert first.returncode == 0 and not first.result["cache_hit"]
    started = time.monotonic()
    second = run_step("torch_to_onnx", spec, mlflow_server.env())
    assert second.returncode == 0 and second.result["cache_hit"], second.output[-1500:]
    assert second.result["cached_from_run_id"] == first.result["mlflow_run_id"]
    assert second.result["artifacts"] == first.result["artifacts"]
    assert "Cache hit" in second.output
    print(f"cached re-run took {time.monotonic() - started:.1f} s")
    forced = run_step("torch_to_onnx", {**spec, "context": {**spec["context"], "force": True}}, mlflow_server.env())
    assert forced.returncode == 0 and not forced.result["cache_hit"]
    assert forced.result["cache_key"] == first.result["cache_key"]


# -- batch sizes the export never saw ------------------------------------------------------------


def _save_batch_bound_models(tmp_path: Path) -> tuple[Path, Path]:
    import torch

    class Broadcast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) + torch.ones(2, 3)  # only batch 2 broadcasts

    class Reshape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).reshape(2, -1)  # bakes batch 2 into the graph

    pt2 = tmp_path / "broadcast.pt2"
    torch.export.save(torch.export.export(Broadcast(), (torch.randn(2, 4),)), str(pt2))
    ts = tmp_path / "reshape.ts"
    torch.jit.script(Reshape()).save(str(ts))
    return pt2, ts


def test_batch_bound_models_fail_naming_input_and_dimension(mlflow_server, tmp_path):
    pt2, ts = _save_batch_bound_models(tmp_path)
    shapes = {"input_shapes": {"x": [2, 4]}, **EXPERIMENT}
    refused = run_step("torch_to_onnx", {"model_uri": str(pt2), **shapes}, mlflow_server.env())
    assert refused.returncode == 5, refused.output[-2000:]
    assert "input 'x' dimension 0 cannot be exported" in refused.output
    failed_at_7 = run_step("torch_to_onnx", {"model_uri": str(ts), **shapes}, mlflow_server.env())
    assert failed_at_7.returncode == 3, failed_at_7.output[-2000:]
    assert "ONNX Runtime failed at batch size 1: input 'x' dimension 0 = 1 (the export example used 2)" in failed_at_7.output


# -- bad input: one clear error, nothing partial ---------------------------------------------------


def _succeeded_runs(server: MlflowServer, experiment: str) -> list:
    client = server.client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`modelopt.status` = 'succeeded'")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "does not exist"),
        ("corrupt", "is not a loadable PyTorch model (corrupt or unsupported)"),
        ("directory", "is a directory, not a model file"),
        ("empty", "is an empty file"),
        ("wrong_key", "the model has input 'x' but the data artifact has arrays ['images', 'y']"),
        ("wrong_shape", "data_uri: sample inputs {'x': [2, 64]} do not fit the model"),
        ("missing_run", "model_uri: cannot read runs:/0123456789abcdef0123456789abcdef/model.pt2"),
    ],
)
def test_bad_input_gives_one_clear_error(mlflow_server, example_model, tmp_path, case, expected):
    experiment = f"tests-bad-input-{case}"
    model = example_model["artifacts"]["model_pt2"]
    spec = {"model_uri": model, "data_uri": example_model["artifacts"]["eval_data"],
            "context": {"experiment_name": experiment}}
    if case == "missing":
        spec["model_uri"] = str(tmp_path / "nope.pt2")
    elif case == "corrupt":
        (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04 not really a zip")
        spec["model_uri"] = str(tmp_path / "bad.pt2")
    elif case == "directory":
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "readme.txt").write_text("no model here")
        spec["model_uri"] = str(tmp_path / "models")
    elif case == "empty":
        (tmp_path / "empty.pt2").write_bytes(b"")
        spec["model_uri"] = str(tmp_path / "empty.pt2")
    elif case == "wrong_key":
        np.savez(tmp_path / "d.npz", images=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4))
        spec["data_uri"] = str(tmp_path / "d.npz")
    elif case == "wrong_shape":
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32))
        spec["data_uri"] = str(tmp_path / "d.npz")
    elif case == "missing_run":
        spec["model_uri"] = "runs:/0123456789abcdef0123456789abcdef/model.pt2"
    run = run_step("torch_to_onnx", spec, mlflow_server.env())
    assert run.returncode == 2, run.output[-2000:]
    errors = [line for line in run.output.splitlines() if line.startswith("modelopt: error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert _succeeded_runs(mlflow_server, experiment) == []


def test_failed_run_keeps_no_model(mlflow_server, tmp_path):
    """A step that fails after its run started leaves a FAILED run without a logged model."""
    (tmp_path / "bad.pt2").write_bytes(b"garbage")
    run = run_step("torch_to_onnx", {"model_uri": str(tmp_path / "bad.pt2"), "input_shapes": {"x": [2, 1, 8, 8]},
                                     "context": {"experiment_name": "tests-failed-run"}}, mlflow_server.env())
    assert run.returncode == 2
    client = mlflow_server.client()
    exp = client.get_experiment_by_name("tests-failed-run")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`modelopt.role` = 'step'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["modelopt.status"] == "failed"
    assert "not a loadable PyTorch model" in runs[0].data.tags["modelopt.error"]
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id) if a.path != "modelopt"] == []


def test_opset_out_of_range_is_refused_before_anything_runs(mlflow_server, example_model):
    run = run_step("torch_to_onnx", {"model_uri": example_model["artifacts"]["model_pt2"], "opset": 12,
                                     "input_shapes": {"x": [2, 1, 8, 8]}}, mlflow_server.env())
    assert run.returncode == 2
    assert "opset: Input should be greater than or equal to 17 (got 12)" in run.output
    assert "MLflow run" not in run.output


def test_unreachable_mlflow_is_retried_then_named(tmp_path):
    port = free_port()
    started = time.monotonic()
    run = run_step("torch_to_onnx", {"model_uri": "runs:/abc/model.pt2", "input_shapes": {"x": [2, 1, 8, 8]}},
                   {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MODELOPT_MLFLOW_CONNECT_RETRIES": "3"})
    assert run.returncode == 4, run.output[-2000:]
    assert f"MLflow tracking server at http://127.0.0.1:{port} is unreachable after 3 attempts" in run.output
    assert run.output.count("not reachable") == 2  # two retries logged, with backoff between
    assert time.monotonic() - started >= 3  # 1 s + 2 s of backoff
