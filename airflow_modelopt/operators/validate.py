"""The ``validate`` step's operator (re-exported by ``airflow_modelopt.operators``).

Airflow side: imports the specs (pydantic only), never a model framework.
"""

from __future__ import annotations

from airflow_modelopt.operators.base import ModelOptOperator
from airflow_modelopt.specs.validate import ValidateEquivalenceSpec


class ValidateEquivalenceOperator(ModelOptOperator):
    """Run a reference and a candidate model (any two of: PyTorch .pt2 / TorchScript, ONNX, TFLite,
    SavedModel / Keras, TensorRT engine) on the same evaluation data and gate the candidate.

    Layout (NCHW <-> NHWC) and int8/uint8 I/O are converted from each model's recorded signature
    (``modelopt_signature.json``). Measures per output the max / mean absolute error, max relative
    error and cosine similarity; for classifiers the top-1 agreement and, with labels, both
    accuracies and the drop. Gates (each optional): ``atol``/``rtol``, ``min_cosine``,
    ``min_top1_agreement``, ``max_accuracy_drop`` (default 0.02); NaN or inf in the candidate's
    outputs always fails. The report (JSON, Markdown table, error-distribution PNG) and every
    measured value go to MLflow whatever the verdict; the verdict and the values go to XCom. A
    failed gate fails the task without retry, naming the gate, its threshold and the value.

    In docker/kubernetes modes pass ``image=`` an image holding both models' runtimes (the default
    is the ``base`` image, ONNX Runtime only).
    """

    spec_class = ValidateEquivalenceSpec


__all__ = ["ValidateEquivalenceOperator"]
