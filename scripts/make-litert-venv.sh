#!/usr/bin/env bash
# Creates (or brings up to date) the separate venv the tflite_quantize step's PyTorch path runs in.
#
#   scripts/make-litert-venv.sh [VENV]        default VENV: <repo>/.venv-litert
#
# Why a second venv: litert-torch (PyTorch -> TFLite without TensorFlow) pulls jax and transformers
# and caps pydantic below what Airflow needs, so it cannot live beside Airflow in .venv. Local mode
# runs the step in it with `python=<VENV>/bin/python` on the operator or `[modelopt] local_python`;
# tests/integration/test_tflite_quantize.py uses it when it exists and skips the PyTorch path if not.
#
# Idempotent: a stamp in the venv records what was installed; a second run with the same package
# list and the same sources is a no-op. Needs PyPI (or a mirror) and Python 3.11.
# Environment: PYTHON (interpreter to make the venv from; default: the base interpreter of .venv,
# else python3.11, else python3), FORCE=1 to reinstall.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-litert}"

# torch is pinned exactly: a looser pin lets pip fetch a multi-GB CUDA build.
PACKAGES=(
  "torch==2.13.0"
  "litert-torch==0.10.*"
  "ai-edge-litert>=2.3,<2.4"
  "mlflow-skinny>=3.1,<4"
  "pandas>=2.0"
  "onnx>=1.17"
  "onnxruntime>=1.20"
  "numpy>=1.26,<3"
  "scikit-learn>=1.4"
)

die() { echo "make-litert-venv: error: $*" >&2; exit 1; }
log() { printf '==> %s\n' "$*"; }

if [ -z "${PYTHON:-}" ]; then
  if [ -f "$ROOT/.venv/pyvenv.cfg" ]; then
    home="$(sed -n 's/^home *= *//p' "$ROOT/.venv/pyvenv.cfg")"
    [ -x "$home/python3" ] && PYTHON="$home/python3"
  fi
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
fi
[ -n "$PYTHON" ] || die "no python3 found (set PYTHON=/path/to/python3.11)"
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$pyver" = "3.11" ] || [ "$pyver" = "3.12" ] || die "$PYTHON is Python $pyver; litert-torch needs 3.11 or 3.12"

# What the venv should hold: the package list and the project's dependency metadata.
want="$( { printf '%s\n' "${PACKAGES[@]}"; "$PYTHON" --version; sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.modelopt-litert-stamp"
if [ "${FORCE:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c 'import litert_torch, ai_edge_litert, airflow_modelopt' 2>/dev/null; then
  log "$VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV from $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$stamp"
log "installing ${PACKAGES[*]}"
"$VENV/bin/python" -m pip install --progress-bar off "${PACKAGES[@]}"
# The project itself, editable and without its dependencies (pydantic and numpy come with the above).
log "installing airflow-modelopt (editable) from $ROOT"
"$VENV/bin/python" -m pip install --progress-bar off --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'EOF'
import importlib, sys
for name in ("torch", "litert_torch", "ai_edge_litert.interpreter", "mlflow", "onnx", "onnxruntime", "sklearn",
             "pydantic", "airflow_modelopt.container.steps.tflite_quantize"):
    importlib.import_module(name)
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert "cpu" in torch.__version__ or not torch.cuda.is_available(), "a CUDA torch build was installed"
try:
    import airflow  # noqa: F401
    sys.exit("Airflow must not be installed in the litert venv")
except ImportError:
    pass
print("litert venv OK: torch", torch.__version__)
EOF
echo "$want" >"$stamp"
log "done: run steps there with python=$VENV/bin/python (or [modelopt] local_python)"
