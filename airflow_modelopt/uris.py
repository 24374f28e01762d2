"""Artifact URIs a spec may name, checked the same way on both sides.

Steps never share a local disk: inputs and outputs are MLflow URIs (``runs:/``, ``models:/``,
``mlflow-artifacts:/``). Plain paths and ``file://`` URIs are accepted for local use.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

#: Schemes a step can read from, in the order the error message lists them.
SUPPORTED_SCHEMES = ("runs", "models", "mlflow-artifacts", "file")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def uri_scheme(uri: str) -> str:
    """Return the URI's scheme, or ``""`` for a plain filesystem path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def check_artifact_uri(uri: str) -> str:
    """Return ``uri`` unchanged if a step can read it, else raise ``ValueError`` saying why."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("must be a non-empty path or URI")
    uri = uri.strip()
    scheme = uri_scheme(uri)
    if scheme and scheme not in SUPPORTED_SCHEMES:
        allowed = ", ".join(f"{s}:/" for s in SUPPORTED_SCHEMES)
        raise ValueError(
            f"unknown URI scheme {scheme!r} in {uri!r}; expected a plain path or one of {allowed}"
        )
    if scheme == "runs" and not re.match(r"^runs:/[^/]+(/.*)?$", uri):
        raise ValueError(f"{uri!r} is not a runs URI; expected runs:/<run_id>/<artifact path>")
    if scheme == "models" and not re.match(r"^models:/[^/].*$", uri):
        raise ValueError(
            f"{uri!r} is not a models URI; expected models:/<name>/<version>, models:/<name>@<alias> "
            "or models:/<model_id>"
        )
    if scheme in ("runs", "models", "mlflow-artifacts"):
        path = unquote(uri.split(":", 1)[1].split("?", 1)[0].split("#", 1)[0]).replace("\\", "/")
        if any(part in (".", "..") for part in path.split("/")):
            raise ValueError(
                f"{uri!r} has a '.' or '..' path segment; an artifact URI must name a path inside its run or model"
            )
    return uri


def check_experiment_name(name: str) -> str:
    """Return ``name`` if it is a usable MLflow experiment name, else raise ``ValueError``. Artifact
    folders are named after experiments, so no path segment may be '.' or '..'."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("must be a non-empty experiment name")
    if len(name) > 500:
        raise ValueError(f"is {len(name)} characters long; at most 500")
    if any(part.strip() in (".", "..") for part in name.replace("\\", "/").split("/")):
        raise ValueError(f"{name!r} has a '.' or '..' path segment; experiment names become artifact folders")
    if any(ord(c) < 32 for c in name):
        raise ValueError(f"{name!r} holds control characters")
    return name


def logged_model_id(uri: str) -> str | None:
    """The id in an MLflow 3 logged model's URI ``models:/<model id>`` (one path segment); None for
    any other URI, ``models:/<name>/<version>`` and ``models:/<name>@<alias>`` included."""
    if not uri.startswith("models:/"):
        return None
    ident = uri[len("models:/"):].strip("/")
    return ident if ident and all(c.isalnum() or c in "_-" for c in ident) else None


def is_remote(uri: str) -> bool:
    """True when the URI lives in MLflow rather than on this machine's disk."""
    return uri_scheme(uri) in ("runs", "models", "mlflow-artifacts")


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri, user, password)``: an http(s) URI's ``user:password@`` part taken out (both
    percent-decoded; None where absent), so the URI can be logged and the credentials kept apart."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    return (urlunsplit(parts._replace(netloc=host)), unquote(user) or None,
            unquote(password) if has_password else None)
