"""FLOPs of a Keras model: multiply-accumulates plus bias adds of one sample through its Conv and
Dense layers (the ptflops convention the PyTorch path follows too)."""

from __future__ import annotations

from typing import Any


def _keras() -> Any:
    import tf_keras

    return tf_keras


def _all_layers(model: Any) -> list[Any]:
    keras = _keras()
    out = []
    for layer in model.layers:
        out.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def _prod(values: Any) -> int | None:
    total = 1
    for v in values:
        if v is None:
            return None
        total *= int(v)
    return total


def layer_flops(layer: Any) -> int:
    """Multiply-accumulates plus bias adds of one sample through a Conv or Dense layer (else 0)."""
    keras = _keras()
    layers = keras.layers
    try:
        ishape, oshape = layer.input_shape, layer.output_shape
    except (AttributeError, RuntimeError):  # a layer used several times: shapes are ambiguous
        return 0
    if isinstance(ishape, list) or isinstance(oshape, list):
        return 0
    if isinstance(layer, layers.Dense):
        lead = _prod(ishape[1:-1]) or 1
        return lead * int(ishape[-1]) * layer.units + (lead * layer.units if layer.use_bias else 0)
    convs = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.SeparableConv1D, layers.SeparableConv2D,
             layers.DepthwiseConv2D, layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    if not isinstance(layer, convs):
        return 0
    last = getattr(layer, "data_format", "channels_last") != "channels_first"
    cin = ishape[-1] if last else ishape[1]
    cout = oshape[-1] if last else oshape[1]
    out_spatial = _prod(oshape[1:-1] if last else oshape[2:])
    in_spatial = _prod(ishape[1:-1] if last else ishape[2:])
    kernel = _prod(layer.kernel_size)
    if None in (cin, cout, out_spatial, in_spatial, kernel):
        return 0
    bias = out_spatial * cout if layer.use_bias else 0
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return in_spatial * cin * cout * kernel + bias
    if isinstance(layer, layers.DepthwiseConv2D):
        return out_spatial * cin * layer.depth_multiplier * kernel + bias
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        mid = cin * layer.depth_multiplier
        return out_spatial * (mid * kernel + mid * cout) + bias
    return out_spatial * cout * kernel * cin // getattr(layer, "groups", 1) + bias


def count_flops(model: Any) -> float:
    return float(sum(layer_flops(layer) for layer in _all_layers(model)))

