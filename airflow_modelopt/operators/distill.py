"""DistillOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.distill import DistillSpec


class DistillOperator(ModelOptOperator):
    """Distil a PyTorch teacher into a smaller student and log the student as a ``.pt2``.

    - Teacher: ``model_uri`` (torch.export ``.pt2`` or MLflow pytorch model).
    - Student: ``student="package.module:Name"`` (an ``nn.Module`` subclass installed in the image,
      built with ``student_kwargs``), or the teacher narrowed to ``width_factor`` of its channels
      (torch-pruning's dependency graph; default 0.5, about a quarter of the parameters).
    - Loss: ``alpha`` x temperature-scaled KL on the logits + ``1 - alpha`` x cross-entropy on the
      labels of ``train_data_uri``; Adam, cosine learning-rate schedule, early stop on the accuracy
      on ``eval_data_uri`` (best epoch kept).
    - Optional intermediate-feature matching: ``feature_layers`` (module paths of the teacher such as
      ``["layers.0", "layers.2"]``, or ``"auto"``: the outputs of its top-level blocks) with
      ``feature_weight`` > 0 adds that weight x a normalised MSE between the student's and the
      teacher's features (1x1 projections, dropped after training, where the narrowed student has
      fewer channels). Off by default: in the runs measured so far it did not beat logits-only KD
      (README, "PyTorch-native int8 and distillation").
    - Logs per epoch (``train_loss``, ``eval_accuracy``, ``learning_rate``, ``feature_loss`` when
      matching features; step = epoch), a
      ``training_curve`` PNG, and ``model_pt2`` (dynamic batch), which ``TorchToOnnxOperator``
      takes. Metrics: ``teacher_params``, ``student_params``, ``param_ratio``,
      ``teacher_accuracy``, ``student_accuracy``, ``accuracy_drop``, ``best_epoch``;
      ``max_accuracy_drop`` gates (exit 3).
    """

    spec_class = DistillSpec
