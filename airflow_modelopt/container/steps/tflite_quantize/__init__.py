"""Step tflite_quantize: a PyTorch, ONNX or TensorFlow/Keras model -> TFLite, optionally quantized.

1. Detect the source (``source_format`` auto; ``source.py``): a torch.export ``.pt2`` or MLflow
   pytorch model takes litert-torch (``torch_path.py``; inputs stay NCHW); an ONNX model takes
   onnx2tf (``tf_paths.py``; channel-first inputs become NHWC); a SavedModel or Keras model takes
   TFLiteConverter (``tf_paths.py``). The path is tagged on the run (``modelopt.tflite.path``) and
   returned in ``info``.
2. Check the calibration data against the model's inputs (names, ranks, static dimensions, not
   empty) before converting anything (``common.py``).
3. Convert and quantize: fp32, fp16, dynamic-range int8, or full int8 calibrated on the
   calibration data with int8/uint8/float32 I/O.
4. Read the flatbuffer (``flatbuffer.py``): ops left in float, Flex and custom ops; full int8 must
   leave no op in float (``check.py``) but an input-side table lookup (EMBEDDING_LOOKUP/GATHER of a
   constant table by the integer input ids, read only by QUANTIZE: where token ids enter the integer
   graph), which is reported (``float_input_lookups``) and tagged (``modelopt.tflite.float_input_ops``).
   The ONNX path lowers exact GELU to TFLite's GELU builtin and other Erf to builtins unless Flex ops
   are allowed (``onnx_rewrite.py``; tagged ``modelopt.tflite.lowered_ops``).
5. Write ``model.tflite`` and ``modelopt_signature.json`` (input/output names, shapes, dtypes,
   layouts, int8 quantization parameters), load them through the runtimes layer, run source and
   TFLite model on calibration samples and log their agreement (``check.py``).
6. Log the folder as artifact ``tflite_model``, and ``tflite_report.json``.

With ``fallback_model_uri`` (the pipeline gives its PyTorch model as ``model_uri`` and its ONNX
export as the fallback), steps 1-5 run for ``model_uri`` first; when its converter is not installed
or fails on the model, they run again for the fallback, in the same step run (``attempts.py``).
litert-torch runs in this Python when it has it, else in the one ``MODELOPT_LITERT_PYTHON`` names
(local mode: ``[modelopt] litert_python``; ``worker.py``). The converter that made the model and
its version are tagged (``modelopt.tflite.converter``) and logged as params, and why the first
one failed is tagged (``modelopt.tflite.fallback_reason``).
"""

from __future__ import annotations

from airflow_modelopt.container.context import StepContext, StepOutput
from airflow_modelopt.container.signature import SIGNATURE_FILE
from airflow_modelopt.container.steps.tflite_quantize.attempts import ARTIFACT, MODEL_FILE, Built, convert_with_fallback
from airflow_modelopt.container.steps.tflite_quantize.check import agreement, build_signature, run_tflite
from airflow_modelopt.container.steps.tflite_quantize.source import detect_source
from airflow_modelopt.specs.tflite_quantize import TFLiteQuantizeSpec

TAG_PATH = "modelopt.tflite.path"
TAG_MODE = "modelopt.tflite.mode"
TAG_CONVERTER = "modelopt.tflite.converter"
TAG_FALLBACK = "modelopt.tflite.fallback_reason"
TAG_FLOAT_INPUT = "modelopt.tflite.float_input_ops"
TAG_LOWERED = "modelopt.tflite.lowered_ops"


def run(spec: TFLiteQuantizeSpec, ctx: StepContext) -> StepOutput:
    ctx.client.set_tag(ctx.run_id, TAG_MODE, spec.mode)

    def failed_first(path_name: str, reason: str) -> None:
        # Tagged as soon as the first converter failed: a fallback that fails too leaves it on the run.
        ctx.client.set_tag(ctx.run_id, TAG_FALLBACK, f"{path_name}: {reason}"[:5000])

    built: Built = convert_with_fallback(spec, ctx.inputs, ctx.workdir, ctx.log, on_failure=failed_first)
    info = built.info
    ctx.client.set_tag(ctx.run_id, TAG_PATH, info["conversion_path"])
    ctx.client.set_tag(ctx.run_id, TAG_CONVERTER, f"{info['converter']} {info['converter_version']}")
    ctx.log_params({"tflite_converter": info["converter"], "tflite_converter_version": info["converter_version"],
                    "tflite_source": info["converted_from"]})

    if info.get("float_input_lookups"):
        # int8's one allowed float op (check.py): an input-side table lookup, quantized right after
        ctx.client.set_tag(ctx.run_id, TAG_FLOAT_INPUT, "; ".join(
            f"{op} x{n}: a constant float table looked up by the integer input ids, its output quantized at once "
            "(the integer-only equivalent of a quantized float input)" for op, n in info["float_input_lookups"].items()))
    if info.get("lowered_ops"):  # ops the ONNX path lowered to TFLite builtins before onnx2tf (onnx_rewrite.py)
        ctx.client.set_tag(ctx.run_id, TAG_LOWERED, ", ".join(f"{k}={v}" for k, v in info["lowered_ops"].items()))

    from airflow_modelopt.container.pyfunc import log_step_deployable

    artifacts = log_step_deployable(ctx, built.out_dir, "tflite", ARTIFACT, data=built.calibration)
    ctx.log_dict(info, "tflite_report.json")
    return StepOutput(artifacts=artifacts, metrics=built.metrics, info=info)


__all__ = ["ARTIFACT", "MODEL_FILE", "SIGNATURE_FILE", "agreement", "build_signature", "detect_source", "run", "run_tflite"]
