"""Registries: the activations actswap can recognise, and the targets it can put in.

Policy lives here; the rewriting engine (:mod:`actswap.rewrite`) only asks a
target what to put at a site, and never names one. The names users see in the
CLI and in reports are the keys of these dicts.

Importing this module does not import TensorFlow; a target builds Keras
objects only when asked to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# --- Source activations ---------------------------------------------------

# Canonical name -> family. A family groups variants that a user converting
# "ReLU" cares about: a skipped member of the relu family fails --strict.
SOURCES: dict[str, str] = {}

# Spellings Keras accepts for the same function -> canonical name.
ALIASES: dict[str, str] = {"swish": "silu", "hard_swish": "hard_silu"}


def register_source(name: str, family: str | None = None) -> None:
    SOURCES[name] = family or name


for _name in ("relu", "relu6", "leaky_relu", "relu_variant"):
    register_source(_name, "relu")
for _name in (
    "elu", "selu", "celu", "gelu", "silu", "hard_silu", "sigmoid", "hard_sigmoid",
    "tanh", "hard_tanh", "softplus", "softsign", "softmax", "log_softmax", "prelu",
    "mish", "glu", "exponential", "sparse_plus", "squareplus", "tanh_shrink",
    "soft_shrink", "hard_shrink", "log_sigmoid", "sparsemax", "threshold",
):
    register_source(_name)
# Activations actswap itself puts in; recognised so that re-converting a
# converted model reports them instead of ignoring them.
register_source("square", "polynomial")

# Keras layer classes (module keras.layers) that are an activation in themselves.
ACTIVATION_LAYERS: dict[str, str] = {
    "LeakyReLU": "leaky_relu",
    "ELU": "elu",
    "PReLU": "prelu",
    "Softmax": "softmax",
}

# keras.ops operations (module keras.src.ops.*) that are activations; they
# appear in a functional graph when e.g. keras.ops.relu(x) is called on a
# KerasTensor.
OP_ACTIVATIONS: dict[str, str] = {
    "Relu": "relu", "Relu6": "relu6", "LeakyRelu": "leaky_relu", "Elu": "elu",
    "Selu": "selu", "Celu": "celu", "Gelu": "gelu", "Silu": "silu",
    "HardSilu": "hard_silu", "Sigmoid": "sigmoid", "HardSigmoid": "hard_sigmoid",
    "Tanh": "tanh", "HardTanh": "hard_tanh", "Softplus": "softplus",
    "Softsign": "softsign", "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "Glu": "glu", "SparsePlus": "sparse_plus", "Squareplus": "squareplus",
    "TanhShrink": "tanh_shrink", "SoftShrink": "soft_shrink",
    "HardShrink": "hard_shrink", "LogSigmoid": "log_sigmoid",
    "Sparsemax": "sparsemax", "Threshold": "threshold",
}


# TensorFlow op types that are activations, as they appear in graphs
# (SavedModels, frozen GraphDefs, traced functions).
TF_OP_ACTIVATIONS: dict[str, str] = {
    "Relu": "relu", "Relu6": "relu6", "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus", "Softsign": "softsign",
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "Square": "square",
}
# The reverse: source activation -> op types computing it.
TF_OPS: dict[str, tuple[str, ...]] = {}
for _op, _act in TF_OP_ACTIVATIONS.items():
    TF_OPS[_act] = TF_OPS.get(_act, ()) + (_op,)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def family(name: str) -> str | None:
    return SOURCES.get(name)


# --- Targets --------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a replaced site becomes.

    ``refuses(activation, detail)`` returns None when the target can stand in for
    that source activation, else the reason it cannot. ``layer(grad, **kw)``
    builds the layer that replaces a whole activation layer or op;
    ``activation(grad)`` builds the object that replaces an ``activation=``
    argument. Both are called lazily, so registering a target costs nothing.
    """

    name: str
    description: str
    refuses: Callable[[str, str], str | None]
    layer: Callable[..., Any]
    activation: Callable[[Any], Any]
    # tensor(x, grad, custom_gradient_ok) -> the target applied to a graph tensor.
    tensor: Callable[[Any, Any, bool], Any]
    # The single TF op type that computes the target, for frozen GraphDefs.
    graph_op: str


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(
            f"unknown target '{name}'; available targets: {', '.join(sorted(TARGETS))}"
        ) from None


def _square_refuses(activation: str, detail: str) -> str | None:
    if activation == "relu":
        return None
    shown = f"{activation} ({detail})" if detail else activation
    if family(activation) == "relu":
        return f"{shown} is not plain ReLU"
    return f"{shown} is not ReLU-like"


def _square_layer(grad: Any, **kwargs: Any) -> Any:
    from .activations import Square

    return Square(grad=grad, **kwargs)


def _square_activation(grad: Any) -> Any:
    from .activations import SquareActivation

    return SquareActivation(grad=grad)


def _square_tensor(x: Any, grad: Any, custom_gradient_ok: bool) -> Any:
    from . import activations

    if custom_gradient_ok:
        return activations.square_op(x, grad)
    if not isinstance(grad, str):
        raise UserError(
            "a user gradient function needs tf.custom_gradient, which TF cannot reload inside "
            "tf.cond/tf.while_loop; use --grad exact or clip:C for this model"
        )
    return activations.square_op_without_custom_gradient(x, grad)


register_target(
    Target(
        name="square",
        description="x*x with a custom gradient (exact or clip:C)",
        refuses=_square_refuses,
        layer=_square_layer,
        activation=_square_activation,
        tensor=_square_tensor,
        graph_op="Square",
    )
)

# Registered Keras names of actswap's own objects -> the source name they report as.
OWN_OBJECTS: dict[str, str] = {
    "actswap>square": "square",
    "actswap>SquareActivation": "square",
    "actswap>Square": "square",
}
