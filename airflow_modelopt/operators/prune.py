"""PruneOperator (re-exported by ``airflow_modelopt.operators``). Imports no ML framework."""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.prune import PruneSpec


class PruneOperator(ModelOptOperator):
    """Prune a PyTorch or Keras model and log the pruned model with what it reached.

    PyTorch (a torch.export ExportedProgram ``.pt2``, or an MLflow pytorch model):

    - ``method="unstructured"``: global L1 magnitude pruning of every Conv/Linear weight
      (``torch.nn.utils.prune.global_unstructured``), made permanent after the optional
      fine-tune. Zeros shrink the gzipped model, not the dense FLOPs.
    - ``method="structured"``: removes ``sparsity`` of the channels of every Conv/Linear layer
      with torch-pruning's dependency graph, so residual additions and concatenations stay
      consistent; layers producing the model's outputs (and ``ignored_layers``) keep their
      channels. Parameters, FLOPs and bytes really drop.
    - Optional fine-tune on ``train_data_uri`` (cross-entropy, Adam) for ``fine_tune_epochs``.
    - Output ``model_pt2``: an ExportedProgram with a dynamic batch dimension, which
      ``TorchToOnnxOperator`` and the other steps take. TorchScript input is refused.

    Keras (``.keras``/``.h5`` file, SavedModel, MLflow tensorflow model): TFMOT
    ``prune_low_magnitude`` with a PolynomialDecay schedule (``initial_sparsity`` to ``sparsity``
    between ``begin_step`` and ``end_step``, every ``frequency`` steps) while fine-tuning on
    ``train_data_uri`` (required), then ``strip_pruning``. Output ``keras_model`` in the source's
    format. Keras-only options given for a PyTorch model, or PyTorch-only ones (``method=
    "structured"``, ``round_to``) for a Keras model, fail the task naming the option (exit 2).

    Metrics: ``sparsity`` (measured zeros over prunable weights, not the request),
    ``params_*``, ``flops_*`` (one sample, multiply-accumulates plus bias/normalization ops),
    ``bytes_*`` and ``gzip_bytes_*`` (of the model in its output format), ``accuracy_*`` on
    ``eval_data_uri`` (each with ``_before``, ``_after`` and ``_ratio``). ``max_accuracy_drop``
    turns the accuracy drop into a gate (exit 3, nothing logged as output).

    Image: the torch image by default; a declared Keras model (``framework="keras"``, or a
    model_uri ending in ``.keras``/``.h5``/``.hdf5``) runs in the ``tensorflow`` family image
    (``PruneSpec.resolved_image_family``). For a Keras SavedModel or an MLflow tensorflow model
    with ``framework="auto"``, set ``framework="keras"`` or ``image``.
    """

    spec_class = PruneSpec
