"""Where the input of a square can be shifted, exactly.

Recovery turns a ReLU site into the *shifted* square ``s·(z + b)²``: the
scale ``s`` stays at the site (x² times a constant, one ciphertext
multiplication), and the shift ``b`` is folded into the layer that produces
``z`` -- a BatchNormalization's ``beta`` or a Dense/Conv ``bias`` -- when
that layer's output reaches nothing but this site (so adding ``b`` there
changes nothing else). An ``Add`` feeding the site is looked through: ``b``
goes into one of its inputs that qualifies. With ``b`` chosen so that
``s·(z + b)²`` is the least-squares quadratic to ReLU on the site's range,
the site starts close to what the network was trained with and nearly
linear in its typical inputs, which is what keeps deep stacks of squares
from compounding magnitudes (see issue 14's benchmark).

Only top-level layers of a Functional model are looked at; a site with no
such producer gets no shift (``b = 0``).

Invariant: finding producers reads the model; :func:`fold` changes exactly
one weight of the model it is given.
"""

from __future__ import annotations

from typing import Any

import keras

from ..sites import is_graph_model


def _single_consumer(layer: Any) -> bool:
    return len(getattr(layer, "_inbound_nodes", ())) == 1 and len(getattr(layer, "_outbound_nodes", ())) == 1


def _linear(layer: Any) -> bool:
    act = getattr(layer, "activation", None)
    return act is None or getattr(act, "__name__", "") == "linear"


# Layers whose ``bias`` is added to every output unit/channel right before
# their activation (recurrent layers' biases are not: they feed gates).
_BIASED = {
    "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
}


def _bias(layer: Any) -> bool:
    return type(layer).__name__ in _BIASED and getattr(layer, "bias", None) is not None


def _producer_weight(layer: Any) -> str | None:
    """The additive per-channel weight of ``layer`` a shift can go into, if any."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return "beta" if getattr(layer, "beta", None) is not None else None
    return "bias" if _bias(layer) and _linear(layer) else None


def _foldable(layer: Any) -> tuple[str, str] | None:
    if not isinstance(layer, keras.layers.Layer) or not _single_consumer(layer):
        return None
    if isinstance(layer, keras.layers.Add):
        for t in keras.tree.flatten(layer.input):
            found = _foldable(t._keras_history[0])
            if found is not None:
                return found
        return None
    attr = _producer_weight(layer)
    return (layer.name, attr) if attr is not None else None


def producers(model: Any) -> dict[str, tuple[str, str]]:
    """Site layer name -> (producer layer name, weight name) for every top-level
    layer of a Functional ``model`` whose activation input can take a shift:
    an activation layer (``Activation``, ``ReLU``, a Blend) whose input comes
    from a foldable producer, or a layer with its own bias and an
    ``activation=`` (the shift goes into that bias)."""
    if not is_graph_model(model):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for layer in model.layers:
        if len(getattr(layer, "_inbound_nodes", ())) != 1:
            continue  # an input, or a shared layer: one shift cannot serve every call
        if type(layer).__name__ in _ACTIVATION_LAYERS:
            inputs = keras.tree.flatten(layer.input)
            found = _foldable(inputs[0]._keras_history[0]) if len(inputs) == 1 else None
            if found is not None:
                out[layer.name] = found
        elif _bias(layer) and not _linear(layer):
            out[layer.name] = (layer.name, "bias")
    return out


_ACTIVATION_LAYERS = {"Activation", "ReLU", "Blend", "Square", "Polynomial"}


def fold(model: Any, producer: tuple[str, str], shift: float) -> None:
    """Add ``shift`` to the producer's weight (every entry) in ``model``."""
    name, attr = producer
    weight = getattr(model.get_layer(name), attr)
    weight.assign(weight + keras.ops.cast(shift, weight.dtype))
