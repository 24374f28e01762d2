"""Whether this step may run code that ships inside a model file.

A ``.pt2`` archive, an MLflow pytorch model and other pickled artifacts can carry Python objects
whose unpickling runs arbitrary code. Model URIs come from whoever can trigger a DAG or publish an
asset, so by default loaders refuse anything but plain tensors and graphs (``runtimes/torch_backend``
unpickles with torch's weights-only unpickler and refuses other pickles). A deployment that trusts
its sources opts in with ``[modelopt] trust_model_code = True`` or an operator's
``trust_model_code=True``; the runner sets the policy for the step from the spec's run context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_allowed = False

#: How a refusal tells the user to opt in: the operator argument and the deployment-wide option.
OPT_IN = "trust_model_code=True on the operator, or [modelopt] trust_model_code = True for trusted sources"


def model_code_allowed() -> bool:
    return _allowed


@contextmanager
def policy(allow_model_code: bool) -> Iterator[None]:
    """Set the policy for the duration of one step."""
    global _allowed
    previous, _allowed = _allowed, bool(allow_model_code)
    try:
        yield
    finally:
        _allowed = previous


__all__ = ["OPT_IN", "model_code_allowed", "policy"]
