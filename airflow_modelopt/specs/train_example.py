"""Spec of the example model's training step."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from airflow_modelopt.specs.base import StepSpec


class TrainExampleSpec(StepSpec):
    """Train the example CNN on scikit-learn's digits (shipped with scikit-learn, no download)."""

    image_family: ClassVar[str] = "torch"

    step: Literal["train_example"] = "train_example"
    epochs: int = Field(15, ge=1, le=500, description="Training epochs")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Adam learning rate")
    batch_size: int = Field(64, ge=1, le=4096, description="Training batch size")
    seed: int = Field(0, ge=0, description="Seed for the split, the initial weights and the batches")
    calibration_size: int = Field(200, ge=1, description="Samples in the calibration split")
    eval_size: int = Field(400, ge=1, description="Samples in the evaluation split")
