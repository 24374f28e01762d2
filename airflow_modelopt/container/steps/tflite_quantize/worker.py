"""``python -m airflow_modelopt.container.steps.tflite_quantize.worker``: one conversion in this Python.

The tflite_quantize step starts it in the Python ``MODELOPT_LITERT_PYTHON`` names when its own has no
litert-torch (local mode with the venv of ``scripts/make-litert-venv.sh``). Reads a JSON request on
stdin (the spec, local model and calibration paths, a work folder), runs ``attempts.convert_one``
(no MLflow: the calling step logs), and prints one JSON line: the folder, metrics and info, or the
error's class, exit code and message. Logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s [litert worker] %(message)s")
    log = logging.getLogger("airflow_modelopt.container.steps.tflite_quantize")
    request = json.loads(sys.stdin.read())
    reply: dict[str, Any]
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # converters print; the reply line is the only stdout
    try:
        from airflow_modelopt.container.steps.tflite_quantize.attempts import convert_one, save_calibration
        from airflow_modelopt.exceptions import ModelOptError
        from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

        spec = TFLiteQuantizeSpec.model_validate(request["spec"])
        workdir = Path(request["workdir"])
        calibration = Path(request["calibration_path"]) if request.get("calibration_path") else None
        from airflow_modelopt.container import trust

        try:
            with trust.policy(spec.context.trust_model_code):  # the calling step's policy, as in its own process
                built = convert_one(spec, Path(request["model_path"]), calibration, workdir, log)
            reply = {"ok": True, "out_dir": str(built.out_dir), "metrics": built.metrics, "info": built.info,
                     "calibration_file": save_calibration(built.calibration, workdir)}
        except ModelOptError as exc:
            reply = {"ok": False, "error": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}
    except ImportError as exc:
        reply = {"ok": False, "error": "ImportError", "message": f"the litert-torch Python {sys.executable} lacks a "
                 f"package: {exc}"}
    except Exception as exc:  # noqa: BLE001 - reported to the calling step, which decides
        reply = {"ok": False, "error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"}
    finally:
        sys.stdout = real_stdout
    print(json.dumps(reply, default=float), flush=True)
    return 0 if reply["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
