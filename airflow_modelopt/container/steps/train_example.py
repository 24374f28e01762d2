"""Step train_example: train the digits CNN and log model and data splits to MLflow.

Outputs: ``model_pt2`` (torch.export ExportedProgram, dynamic batch), ``pytorch_model`` (MLflow
pytorch flavor), and ``train_data`` / ``calibration_data`` / ``eval_data`` (.npz: ``x`` inputs,
``y`` labels; disjoint).
"""

from __future__ import annotations

import time

import numpy as np

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.specs import TrainExampleSpec


def run(spec: TrainExampleSpec, ctx: StepContext) -> StepOutput:
    import mlflow
    import torch

    from airflow_modelopt.container.examples.digits import DigitsCNN, accuracy, load_splits, train

    torch.manual_seed(spec.seed)
    splits = load_splits(spec.seed, spec.calibration_size, spec.eval_size)
    data_dir = ctx.workdir / "data"
    data_dir.mkdir()
    for name, (x, y) in splits.items():
        np.savez(data_dir / f"{name}.npz", x=x, y=y)
    ctx.log.info("Digits splits: %s", {k: len(v[1]) for k, v in splits.items()})

    model = DigitsCNN()
    started = time.monotonic()
    losses = train(model, *splits["train"], epochs=spec.epochs, lr=spec.learning_rate,
                   batch_size=spec.batch_size, seed=spec.seed, logger=ctx.log)
    train_time = time.monotonic() - started
    metrics = {
        "train_loss": losses[-1],
        "train_accuracy": accuracy(model, *splits["train"]),
        "eval_accuracy": accuracy(model, *splits["eval"]),
        "train_time_s": train_time,
        "param_count": float(sum(p.numel() for p in model.parameters())),
    }
    for epoch, loss in enumerate(losses):
        ctx.client.log_metric(ctx.run_id, "epoch_loss", loss, step=epoch)
    ctx.log.info("Eval accuracy %.4f after %d epochs (%.1f s)", metrics["eval_accuracy"], spec.epochs, train_time)

    example = torch.from_numpy(splits["eval"][0][:2])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    model_dir = ctx.workdir / "model"
    model_dir.mkdir()
    torch.export.save(program, model_dir / "model.pt2")

    # MLflow's pt2 format (torch.export, dynamic batch from an example of batch 2): no pickle.
    info = mlflow.pytorch.log_model(model, name="pytorch_model", input_example=example.numpy(),
                                    serialization_format="pt2")
    artifacts = {
        "model_pt2": ctx.log_artifact(model_dir / "model.pt2", "model"),
        "pytorch_model": info.model_uri,
    }
    for name in splits:
        artifacts[f"{name}_data"] = ctx.log_artifact(data_dir / f"{name}.npz", "data")
    return StepOutput(
        artifacts=artifacts,
        metrics=metrics,
        info={"input_names": ["x"], "input_shape": [None, 1, 8, 8], "layout": "NCHW", "classes": 10},
    )
