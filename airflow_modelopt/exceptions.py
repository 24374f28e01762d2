"""Errors shared by both sides.

Each error maps to one exit code of the container entry point, so the Airflow side can tell a
user error (do not retry) from a failed run (retry may help) without parsing messages.
"""

from __future__ import annotations


class ModelOptError(Exception):
    """Base class for every error this package raises on purpose."""

    exit_code = 1
    retryable = True


class SpecError(ModelOptError, ValueError):
    """The step spec is invalid: a field is missing, of the wrong type or out of range."""

    exit_code = 2
    retryable = False


class InputError(ModelOptError):
    """An input named by the spec is missing, unreadable or does not fit the model."""

    exit_code = 2
    retryable = False


class GateFailed(ModelOptError):
    """The step ran, but its result failed a quality gate (validation, accuracy)."""

    exit_code = 3
    retryable = False


class ConversionFailed(ModelOptError):
    """A converter or exporter refused the model (an unsupported op, a shape it cannot trace).

    Deterministic for the same model and options, so not retried."""

    exit_code = 5
    retryable = False


class UnsupportedHere(ModelOptError):
    """This worker cannot run the step at all (no GPU, a framework that is not installed).

    Retrying on the same kind of worker cannot help; the branch fails with the reason."""

    exit_code = 6
    retryable = False


class TrackingUnavailable(ModelOptError):
    """The MLflow tracking server could not be reached after retries."""

    exit_code = 4
    retryable = True


class StepFailed(ModelOptError):
    """The step's own work failed (converter error, runtime crash, numerical mismatch)."""

    exit_code = 1
    retryable = True


EXIT_OK = 0
EXIT_FAILED = StepFailed.exit_code
EXIT_BAD_INPUT = SpecError.exit_code
EXIT_GATE_FAILED = GateFailed.exit_code
EXIT_TRACKING_UNAVAILABLE = TrackingUnavailable.exit_code
EXIT_CONVERSION_FAILED = ConversionFailed.exit_code
EXIT_UNSUPPORTED_HERE = UnsupportedHere.exit_code

#: Exit codes after which retrying the same spec cannot help.
NON_RETRYABLE_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_CONVERSION_FAILED, EXIT_UNSUPPORTED_HERE})
