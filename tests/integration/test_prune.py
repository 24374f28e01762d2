"""The prune step on real models (local mode, real MLflow server): PyTorch unstructured and
structured pruning of the example digits CNN, the pruned ExportedProgram through torch_to_onnx and
ONNX Runtime, TFMOT pruning of a tf_keras digits model, and bad input refused with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MlflowServer, run_step

EXPERIMENT = {"experiment_name": "tests-prune"}


def download(uri: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def prune(server: MlflowServer, **spec: Any):
    return run_step("prune", {**spec, "context": {**EXPERIMENT, **spec.pop("context", {})}}, server.env())


def weight_zeros(program_path: Path) -> tuple[int, int]:
    """Zeros and total over the Conv/Linear weights of a saved ExportedProgram."""
    import torch

    state = torch.export.load(str(program_path)).state_dict
    weights = [t for name, t in state.items() if name.endswith("weight") and t.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def eval_arrays(example_model: dict[str, Any], tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(download(example_model["artifacts"]["eval_data"], tmp_path / "eval")) as data:
        return data["x"], data["y"]


# -- PyTorch ----------------------------------------------------------------------------------


def test_unstructured_half_sparsity_keeps_accuracy_after_a_short_fine_tune(mlflow_server, example_model, tmp_path,
                                                                         monkeypatch):
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    art = example_model["artifacts"]
    run = prune(mlflow_server, model_uri=art["model_pt2"], train_data_uri=art["train_data"],
                eval_data_uri=art["eval_data"], method="unstructured", sparsity=0.5, fine_tune_epochs=1)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["sparsity"] >= 0.49
    assert m["accuracy_before"] - m["accuracy_after"] <= 0.02, m
    assert m["gzip_bytes_after"] < 0.8 * m["gzip_bytes_before"]  # zeros compress
    assert m["params_after"] == m["params_before"]  # unstructured: same dense shapes

    # The logged ExportedProgram itself is sparse, keeps a dynamic batch and scores as reported.
    pt2 = download(run.result["artifacts"]["model_pt2"], tmp_path / "pruned")
    zeros, total = weight_zeros(pt2)
    assert zeros / total >= 0.49
    x, y = eval_arrays(example_model, tmp_path)
    module = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).numpy()
        assert module(torch.from_numpy(x[:3])).shape == (3, 10)
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(m["accuracy_after"])


def test_structured_half_channels_shrinks_the_network_and_exports_to_onnx(mlflow_server, example_model, tmp_path,
                                                                        monkeypatch):
    import onnxruntime as ort
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    art = example_model["artifacts"]
    # The MLflow pytorch model (pt2 serialization) as input, fine-tuned for three epochs.
    run = prune(mlflow_server, model_uri=art["pytorch_model"], train_data_uri=art["train_data"],
                eval_data_uri=art["eval_data"], method="structured", sparsity=0.5, fine_tune_epochs=3)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["params_after"] < 0.5 * m["params_before"], m
    assert m["flops_after"] < 0.5 * m["flops_before"], m
    assert m["bytes_after"] < m["bytes_before"]
    assert m["channel_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert m["accuracy_pruned_before_fine_tune"] < m["accuracy_after"]  # the fine-tune recovers accuracy
    assert m["accuracy_after"] >= m["accuracy_before"] - 0.03, m
    assert run.result["info"]["kept_layers"] == ["classifier.3"]  # the 10 logits stay

    onnx_run = run_step("torch_to_onnx", {"model_uri": run.result["artifacts"]["model_pt2"],
                                          "data_uri": art["eval_data"], "context": EXPERIMENT}, mlflow_server.env())
    assert onnx_run.returncode == 0, onnx_run.output[-3000:]
    assert onnx_run.result["metrics"]["onnx_param_count"] == pytest.approx(m["params_after"], abs=4)

    x, y = eval_arrays(example_model, tmp_path)
    pt2 = download(run.result["artifacts"]["model_pt2"], tmp_path / "pruned")
    with torch.no_grad():
        expected = torch.export.load(str(pt2)).module()(torch.from_numpy(x)).numpy()
    onnx_dir = download(onnx_run.result["artifacts"]["onnx_model"], tmp_path / "onnx")
    session = ort.InferenceSession(str(next(onnx_dir.rglob("model.onnx"))), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert float((got.argmax(1) == y).mean()) == pytest.approx(m["accuracy_after"])


def residual_concat_cnn() -> Any:
    """BatchNorm, an identity residual, a 1x1-conv shortcut and a channel concatenation."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1))
            self.shortcut = nn.Conv2d(16, 32, 1, stride=2)
            self.side = nn.Conv2d(16, 8, 3, stride=2, padding=1)
            self.head = nn.Linear(40, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.stem(x)
            a = torch.relu(self.block(a) + a)  # identity residual: stem and block share channels
            b = torch.relu(self.down(a) + self.shortcut(a))  # projection residual
            c = torch.cat([b, self.side(a)], dim=1)  # concatenation: 32 + 8 channels
            return self.head(c.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net()
    for m in net.modules():  # non-trivial statistics, so BatchNorm really has to follow its conv
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_structured_pruning_keeps_residual_and_concatenated_channels_consistent(mlflow_server, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(residual_concat_cnn(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    source = tmp_path / "resnet_like.pt2"
    torch.export.save(program, str(source))
    # No data: example inputs come from the program's own input shapes.
    run = prune(mlflow_server, model_uri=str(source), method="structured", sparsity=0.5, round_to=4)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["params_after"] < 0.5 * m["params_before"] and m["flops_after"] < 0.5 * m["flops_before"], m

    report = json.loads(download(run.result["artifacts"]["prune_report"], tmp_path / "report").read_text())
    out = {name: layer["shape_after"][0] for name, layer in report["layers"].items()}
    assert out["stem.0"] == out["block.0"] < 16  # the identity residual adds them: pruned together
    assert out["down.3"] == out["shortcut"] < 32  # the projection residual likewise
    assert report["layers"]["head"]["shape_after"] == [10, out["down.3"] + out["side"]]  # follows the concat
    assert all(n % 4 == 0 for name, n in out.items() if name != "head")  # round_to

    pruned = torch.export.load(str(download(run.result["artifacts"]["model_pt2"], tmp_path / "pruned"))).module()
    with torch.no_grad():
        assert pruned(torch.randn(5, 3, 16, 16)).shape == (5, 10)


# -- Keras ------------------------------------------------------------------------------------

KERAS_TRAINER = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tf_keras as keras
    from sklearn.datasets import load_digits

    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # NHWC
    y = digits.target.astype("int64")
    order = np.random.default_rng(0).permutation(len(x))
    ev, tr = order[:400], order[400:]
    np.savez(os.path.join(out, "train.npz"), x=x[tr], y=y[tr])
    np.savez(os.path.join(out, "eval.npz"), x=x[ev], y=y[ev])
    model = keras.Sequential([
        keras.layers.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x[tr], y[tr], epochs=6, batch_size=64, verbose=0)
    os.makedirs(os.path.join(out, "folder"))
    model.save(os.path.join(out, "folder", "model.keras"))
    model.save(os.path.join(out, "model.keras"))
""")


@pytest.fixture(scope="module")
def keras_digits(tmp_path_factory) -> Path:
    """A tf_keras digits CNN (softmax output) trained for a few seconds, with NHWC .npz splits."""
    out = tmp_path_factory.mktemp("keras-digits")
    proc = subprocess.run([sys.executable, "-c", KERAS_TRAINER, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def keras_kernel_zeros(keras_file: Path) -> tuple[int, int]:
    """Zeros and total over the Conv/Dense kernels stored in a .keras archive (read with h5py)."""
    import io

    import h5py

    zeros = total = 0
    with zipfile.ZipFile(keras_file) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as h5:
        def visit(name: str, obj: Any) -> None:
            nonlocal zeros, total
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 2:  # kernels; biases are 1-D
                values = obj[()]
                zeros += int((values == 0).sum())
                total += values.size
        h5.visititems(visit)
    return zeros, total


def test_keras_polynomial_decay_reaches_half_sparsity_and_shrinks_gzip(mlflow_server, keras_digits, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    run = prune(mlflow_server, model_uri=str(keras_digits / "model.keras"),
                train_data_uri=str(keras_digits / "train.npz"), eval_data_uri=str(keras_digits / "eval.npz"),
                sparsity=0.5, initial_sparsity=0.1, begin_step=0, end_step=40, frequency=10, fine_tune_epochs=3)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["sparsity"] >= 0.45
    assert m["gzip_bytes_after"] < 0.8 * m["gzip_bytes_before"], m
    assert m["accuracy_after"] >= m["accuracy_before"] - 0.03, m
    assert m["flops_before"] == m["flops_after"] > 0
    assert run.result["info"]["schedule"]["end_step"] == 40

    keras_file = download(run.result["artifacts"]["keras_model"], tmp_path / "pruned")
    assert keras_file.suffix == ".keras"
    zeros, total = keras_kernel_zeros(keras_file)
    assert total == m["prunable_weights"] and zeros / total >= 0.45  # stripped: plain kernels, half zero


# -- bad input --------------------------------------------------------------------------------


def assert_refused(run, *fragments: str) -> None:
    assert run.returncode == 2, run.output[-3000:]
    error = [line for line in run.output.splitlines() if "error" in line.lower()]
    for fragment in fragments:
        assert fragment in run.output, (fragment, error[-5:])


def no_successful_prune_run(server: MlflowServer, experiment: str) -> bool:
    client = server.client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return True
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`modelopt.step` = 'prune'")
    return all(r.data.tags.get("modelopt.status") != "succeeded" for r in runs)


def test_sparsity_outside_zero_one_is_refused_naming_the_field(mlflow_server, example_model):
    run = prune(mlflow_server, model_uri=example_model["artifacts"]["model_pt2"], sparsity=1.0)
    assert_refused(run, "sparsity: Input should be less than 1 (got 1.0)")


def test_keras_only_option_for_a_pytorch_model_is_refused_after_looking_at_it(mlflow_server, example_model):
    # A models:/ URI says nothing about the framework: the step finds out and refuses.
    experiment = "tests-prune-bad-keras-option"
    run = prune(mlflow_server, model_uri=example_model["artifacts"]["pytorch_model"], begin_step=10,
                context={"experiment_name": experiment})
    assert_refused(run, "begin_step: a Keras-only option", "model_uri is a PyTorch model")
    assert no_successful_prune_run(mlflow_server, experiment)


def test_pytorch_only_option_for_a_keras_model_is_refused(mlflow_server, keras_digits):
    experiment = "tests-prune-bad-torch-option"
    run = prune(mlflow_server, model_uri=str(keras_digits / "folder"), train_data_uri=str(keras_digits / "train.npz"),
                method="structured", context={"experiment_name": experiment})
    assert_refused(run, "method: 'structured'", "PyTorch-only but model_uri is a Keras model")
    assert no_successful_prune_run(mlflow_server, experiment)


def test_torchscript_is_refused_naming_model_uri(mlflow_server, tmp_path):
    import torch

    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    path = tmp_path / "model.bin"  # no telling suffix: found out from the archive's contents
    torch.jit.save(scripted, str(path))
    run = prune(mlflow_server, model_uri=str(path))
    assert_refused(run, "model_uri:", "is TorchScript, which the prune step does not support")


def test_nchw_data_for_an_nhwc_keras_model_is_refused_naming_the_field(mlflow_server, example_model, keras_digits):
    run = prune(mlflow_server, model_uri=str(keras_digits / "model.keras"),
                train_data_uri=example_model["artifacts"]["train_data"], sparsity=0.5)
    assert_refused(run, "train_data_uri: samples for input", "have shape [1, 8, 8] but the Keras model expects [8, 8, 1]")


def test_unlabelled_training_data_without_distillation_is_refused(mlflow_server, example_model, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    x, _ = eval_arrays(example_model, tmp_path)
    unlabelled = tmp_path / "inputs_only.npz"
    np.savez(unlabelled, x=x)
    run = prune(mlflow_server, model_uri=example_model["artifacts"]["model_pt2"], train_data_uri=str(unlabelled),
                fine_tune_epochs=1, distill=False)
    assert_refused(run, "train_data_uri: has no labels under 'y' and distill is false")


def test_unlabelled_training_data_fine_tunes_by_distillation(mlflow_server, example_model, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    art = example_model["artifacts"]
    with np.load(download(art["calibration_data"], tmp_path / "cal")) as data:
        np.savez(tmp_path / "calibration_x.npz", x=data["x"])
    run = prune(mlflow_server, model_uri=art["model_pt2"], train_data_uri=str(tmp_path / "calibration_x.npz"),
                eval_data_uri=art["eval_data"], method="structured", sparsity=0.5, fine_tune_epochs=20,
                learning_rate=0.003, max_accuracy_drop=0.02)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert run.result["info"]["fine_tune_signal"] == "distillation"
    assert m["accuracy_pruned_before_fine_tune"] < m["accuracy_after"] - 0.1  # distillation recovers accuracy
    assert m["accuracy_drop"] <= 0.02 and m["params_after"] < 0.5 * m["params_before"], m
    tags = mlflow_server.client().get_run(run.result["mlflow_run_id"]).data.tags
    assert tags["modelopt.prune.fine_tune_signal"] == "distillation"


# -- transformers, several inputs, dense outputs (the zoo's models) ---------------------------


def zoo_model(name: str, tmp_path: Path, epochs: int | None = None, fine_tune_samples: int = 400) -> dict[str, Any]:
    """A trained zoo model saved as .pt2, its train / eval splits as .npz (inputs, plus 'y' when the
    entry has class labels; the first ``fine_tune_samples`` of the training split, which keeps the
    prune step's fine-tune short), and the trained module for reference outputs."""
    import dataclasses

    from airflow_modelopt.container.examples.zoo import ZOO

    entry = ZOO[name] if epochs is None else dataclasses.replace(ZOO[name], epochs=epochs)
    data = entry.splits()
    model = entry.build()
    entry.train(model, data["train"])
    paths = {"pt2": str(entry.export(model, data["eval"], tmp_path / f"{name}.pt2"))}
    for split in ("train", "eval"):
        arrays = entry.inputs(data[split])
        if "y" in data[split]:
            arrays["y"] = data[split]["y"]
        if split == "train":
            arrays = {k: v[:fine_tune_samples] for k, v in arrays.items()}
        np.savez(tmp_path / f"{split}.npz", **arrays)
        paths[split] = str(tmp_path / f"{split}.npz")
    return {"entry": entry, "model": model, "data": data, "paths": paths}


def pruned_outputs(run, zoo: dict[str, Any], tmp_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(unpruned, pruned) outputs on the eval split; the pruned .pt2 run with a batch other than traced."""
    import torch

    pruned = torch.export.load(str(download(run.result["artifacts"]["model_pt2"], tmp_path / "pruned"))).module()
    entry, ev = zoo["entry"], zoo["data"]["eval"]
    with torch.no_grad():
        got = pruned(*(torch.from_numpy(ev[n]) for n in entry.input_names))
    got = [o.numpy() for o in (got if isinstance(got, (tuple, list)) else (got,))]
    return entry.predict(zoo["model"], ev), got


def test_structured_pruning_of_a_transformer_encoder_prunes_the_feed_forward_and_keeps_attention(
        mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    zoo = zoo_model("bert_tiny", tmp_path, epochs=12)
    run = prune(mlflow_server, model_uri=zoo["paths"]["pt2"], train_data_uri=zoo["paths"]["train"],
                eval_data_uri=zoo["paths"]["eval"], method="structured", sparsity=0.5, fine_tune_epochs=4,
                learning_rate=0.003, batch_size=64)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["params_after"] < 0.85 * m["params_before"], m
    assert m["accuracy_drop"] <= 0.05, m

    report = json.loads(download(run.result["artifacts"]["prune_report"], tmp_path / "report").read_text())
    shapes = {name: (layer["shape_before"], layer["shape_after"]) for name, layer in report["layers"].items()}
    for i in (0, 1):  # the feed-forward's hidden width is pruned, consistently in both of its layers
        ff1, ff2 = shapes[f"encoder.layers.{i}.linear1"], shapes[f"encoder.layers.{i}.linear2"]
        assert ff1[1][0] == 32 < ff1[0][0] == 64 and ff2[1] == [32, 32], shapes
        assert shapes[f"encoder.layers.{i}.self_attn.out_proj"][1] == [32, 32]  # attention's width kept
    kept_why = report["kept_layers_why"]
    in_proj = [n for n, (before, _) in shapes.items() if before[0] == 96]  # q, k, v projections
    assert len(in_proj) == 2 and all(n in kept_why and shapes[n][1] == [96, 32] for n in in_proj), kept_why
    assert "constant" in kept_why["encoder.layers.0.self_attn.out_proj"]
    assert kept_why["fc"] == "produces a model output"

    ref, got = pruned_outputs(run, zoo, tmp_path)
    assert got[0].shape == ref[0].shape
    assert float((got[0].argmax(1) == ref[0].argmax(1)).mean()) >= 0.85


def test_structured_pruning_of_a_two_input_model_follows_the_flattened_concatenation(
        mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    zoo = zoo_model("two_io", tmp_path)
    run = prune(mlflow_server, model_uri=zoo["paths"]["pt2"], train_data_uri=zoo["paths"]["train"],
                eval_data_uri=zoo["paths"]["eval"], method="structured", sparsity=0.5, fine_tune_epochs=6,
                learning_rate=0.003, batch_size=64)
    assert run.returncode == 0, run.output[-3000:]
    m = run.result["metrics"]
    assert m["params_after"] < 0.5 * m["params_before"] and m["accuracy_drop"] <= 0.05, m
    report = json.loads(download(run.result["artifacts"]["prune_report"], tmp_path / "report").read_text())
    after = {name: layer["shape_after"] for name, layer in report["layers"].items()}
    # The trunk reads the conv's channels flattened (4x4 each) and then the profile's features.
    assert after["trunk.0"][1] == after["conv.0"][0] * 16 + after["prof.0"][0] < 16 * 16 + 16, after

    ref, got = pruned_outputs(run, zoo, tmp_path)
    assert [g.shape for g in got] == [r.shape for r in ref] == [(300, 10), (300, 2)]
    assert float((got[0].argmax(1) == ref[0].argmax(1)).mean()) >= 0.9
    assert float((got[1].argmax(1) == ref[1].argmax(1)).mean()) >= 0.8


def test_eval_data_without_labels_measures_agreement_with_the_unpruned_segmenter(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    zoo = zoo_model("unet", tmp_path, epochs=4)  # masks are y_mask: eval.npz has only 'x'
    assert set(np.load(zoo["paths"]["eval"]).files) == {"x"}
    run = prune(mlflow_server, model_uri=zoo["paths"]["pt2"], train_data_uri=zoo["paths"]["train"],
                eval_data_uri=zoo["paths"]["eval"], method="structured", sparsity=0.5, fine_tune_epochs=3,
                learning_rate=0.003, batch_size=64, max_accuracy_drop=0.5)
    assert run.returncode == 0, run.output[-3000:]
    m, info = run.result["metrics"], run.result["info"]
    assert info["eval_measure"] == "agreement" and info["fine_tune_signal"] == "distillation"
    assert "accuracy_after" not in m and m["params_after"] < 0.5 * m["params_before"], m
    ref, got = pruned_outputs(run, zoo, tmp_path)
    per_pixel = float((got[0].argmax(1) == ref[0].argmax(1)).mean())
    assert per_pixel == pytest.approx(m["agreement_after"], abs=1e-6) and per_pixel >= 0.9, m
    # The gate reads 1 - agreement when there are no labels.
    strict = prune(mlflow_server, model_uri=zoo["paths"]["pt2"], eval_data_uri=zoo["paths"]["eval"],
                   method="structured", sparsity=0.5, fine_tune_epochs=0, max_accuracy_drop=0.0)
    assert strict.returncode != 0 and "1 - agreement" in strict.output, strict.output[-2000:]
