"""Registries: the activations actswap can recognise, and the targets it can put in.

Policy lives here; the rewriting engine (:mod:`actswap.rewrite`) only asks a
target what to put at a site, and never names one. The names users see in the
CLI and in reports are the keys of these dicts.

Importing this module does not import TensorFlow; a target builds Keras
objects only when asked to.
"""

from __future__ import annotations

import math
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
# Max pooling is not an activation, but HE cannot compute a maximum either;
# --pool avg swaps it for average pooling (same window, strides, padding).
POOL_SWAPS: dict[str, str] = {
    "MaxPooling1D": "AveragePooling1D", "MaxPooling2D": "AveragePooling2D",
    "MaxPooling3D": "AveragePooling3D", "GlobalMaxPooling1D": "GlobalAveragePooling1D",
    "GlobalMaxPooling2D": "GlobalAveragePooling2D", "GlobalMaxPooling3D": "GlobalAveragePooling3D",
}
POOL_SOURCE = "max_pool"
register_source(POOL_SOURCE, "pool")
# Activations actswap itself puts in; recognised so that re-converting a
# converted model reports them instead of ignoring them.
register_source("square", "polynomial")
register_source("poly", "polynomial")
# A site on its way from its source activation to a polynomial (actswap.recover).
register_source("blend", "blend")

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
    that source activation, else the reason it cannot. The builders get the
    site (a fitted target depends on the activation it replaces):
    ``layer(grad, site, **kw)`` builds the layer that replaces a whole
    activation layer or op, ``activation(grad, site)`` the object that replaces
    an ``activation=`` argument, ``tensor(x, grad, custom_gradient_ok, site)``
    the target applied to a graph tensor. All are called lazily, so
    registering a target costs nothing.
    """

    name: str
    description: str
    refuses: Callable[[str, str], str | None]
    layer: Callable[..., Any]
    activation: Callable[..., Any]
    tensor: Callable[..., Any]
    # The single TF op type that computes the target, for frozen GraphDefs
    # (None: the target needs more than one op there).
    graph_op: str | None
    # coefficients(site) -> ascending polynomial coefficients put at the site
    # (reported); None for targets that are not fixed polynomials.
    coefficients: Callable[[Any], tuple[float, ...]] | None = None


TARGETS: dict[str, Target] = {}
# Parameterised targets: "name:args" -> factory(args, options) -> Target.
TARGET_FACTORIES: dict[str, Callable[[str, dict[str, Any]], Target]] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def target_names() -> list[str]:
    return sorted(TARGETS) + [f"{n}:..." if n == "poly" else n for n in sorted(TARGET_FACTORIES)]


def get_target(spec: "str | Target", **options: Any) -> Target:
    """A target by its CLI spelling: ``square``, ``poly:c0,c1,...``, ``approx``
    (options ``degree``, ``interval``); a Target is returned as it is."""
    if isinstance(spec, Target):
        return spec
    if spec in TARGETS:
        return TARGETS[spec]
    name, _, args = spec.partition(":")
    if name in TARGET_FACTORIES:
        return TARGET_FACTORIES[name](args, options)
    raise UserError(f"unknown target '{spec}'; available targets: {', '.join(target_names())}")


def _no_custom_gradient_function(grad: Any) -> None:
    if not isinstance(grad, str):
        raise UserError(
            "a user gradient function needs tf.custom_gradient, which TF cannot reload inside "
            "tf.cond/tf.while_loop; use --grad exact or clip:C for this model"
        )


def _square_refuses(activation: str, detail: str) -> str | None:
    if activation == "relu":
        return None
    shown = f"{activation} ({detail})" if detail else activation
    if family(activation) == "relu":
        return f"{shown} is not plain ReLU"
    return f"{shown} is not ReLU-like (x² fits only ReLU; use --to approx)"


def _square_layer(grad: Any, site: Any = None, **kwargs: Any) -> Any:
    from .activations import Square

    return Square(grad=grad, **kwargs)


def _square_activation(grad: Any, site: Any = None, **_: Any) -> Any:
    from .activations import SquareActivation

    return SquareActivation(grad=grad)


def _square_tensor(x: Any, grad: Any, custom_gradient_ok: bool, site: Any = None) -> Any:
    from . import activations

    if custom_gradient_ok:
        return activations.square_op(x, grad)
    _no_custom_gradient_function(grad)
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


def polynomial_target(name: str, description: str, coefficients_for: Callable[[Any], tuple[float, ...]],
                      refuses: Callable[[str, str], str | None], *, trainable: bool = False,
                      per_channel: bool = False) -> Target:
    """A target that puts a polynomial at each site, ``coefficients_for(site)``;
    with ``trainable`` those are its initial values, a weight of the model
    (one set per site, or per channel of the last axis with ``per_channel``)."""

    def layer(grad: Any, site: Any = None, **kwargs: Any) -> Any:
        from .activations import Polynomial

        return Polynomial(
            coefficients_for(site), grad=grad, trainable_coefficients=trainable, per_channel=per_channel,
            **kwargs,
        )

    def activation(grad: Any, site: Any = None, channels: int | None = None) -> Any:
        from .activations import Polynomial, PolynomialActivation

        if not trainable:
            return PolynomialActivation(coefficients_for(site), grad=grad)
        if per_channel and not channels:
            raise UserError(f"--per-channel: cannot tell the channel count at '{getattr(site, 'path', '?')}'")
        # A layer as the activation, so that the coefficients are weights of the model.
        return Polynomial(
            coefficients_for(site), grad=grad, trainable_coefficients=True, per_channel=per_channel,
            channels=channels if per_channel else None,
        )

    def tensor(x: Any, grad: Any, custom_gradient_ok: bool, site: Any = None) -> Any:
        from . import activations

        if trainable:
            raise UserError(
                f"--to {name} with trainable coefficients needs a Keras model; a graph has no "
                "place for new variables"
            )
        if custom_gradient_ok:
            return activations.poly_op(x, coefficients_for(site), grad)
        _no_custom_gradient_function(grad)
        return activations.poly_op_without_custom_gradient(x, coefficients_for(site), grad)

    return Target(name, description, refuses, layer, activation, tensor, None, coefficients_for)


# Activations a per-element polynomial cannot stand in for: they mix elements
# (softmax), split their input (glu) or carry weights (prelu).
NOT_ELEMENTWISE = frozenset({"softmax", "log_softmax", "sparsemax", "glu", "prelu"})


def _known(activation: str, detail: str) -> str | None:
    if activation.startswith("custom"):
        return "unrecognised custom activation"
    if activation in NOT_ELEMENTWISE:
        return f"{activation} is not an element-wise function"
    return None


def _poly_factory(args: str, options: dict[str, Any]) -> Target:
    try:
        coeffs = tuple(float(a) for a in args.split(",")) if args else ()
    except ValueError:
        coeffs = ()
    if len(coeffs) < 2 or not all(math.isfinite(c) for c in coeffs) or all(c == 0 for c in coeffs[1:]):
        raise UserError(
            f"'poly:{args}' needs coefficients c0,c1,...,cn in ascending degree, n >= 1, "
            "e.g. --to poly:0,0.5,0.25"
        )
    return polynomial_target(
        f"poly:{args}", "a fixed polynomial (ascending coefficients)", lambda site: coeffs, _known
    )


# NumPy reference implementations of source activations, for fitting.
def _source_function(activation: str, detail: str) -> Callable[[Any], Any] | None:
    import numpy as np

    params = dict(p.split("=") for p in detail.split(", ") if "=" in p) if detail else {}
    erf = np.vectorize(math.erf)
    table: dict[str, Callable[[Any], Any]] = {
        "relu": lambda x: np.maximum(x, 0.0),
        "relu6": lambda x: np.clip(x, 0.0, 6.0),
        "leaky_relu": lambda x: np.where(
            x > 0, x, x * float(params.get("negative_slope", params.get("alpha", 0.2)))
        ),
        "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
        "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
        "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
        "silu": lambda x: x / (1.0 + np.exp(-x)),
        "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
        "hard_sigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
        "hard_silu": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
        "tanh": np.tanh,
        "softplus": lambda x: np.logaddexp(0.0, x),
        "softsign": lambda x: x / (1.0 + np.abs(x)),
    }
    return table.get(activation)


APPROX_DEFAULT_INTERVAL = (-4.0, 4.0)
APPROX_DEFAULT_DEGREE = 2


def fit_coefficients(activation: str, detail: str, degree: int, interval: tuple[float, float]) -> tuple[float, ...]:
    """Least-squares fit (numpy.polynomial) of a source activation on ``interval``,
    as ascending power-basis coefficients.

    Two least-squares fits are made, on Chebyshev nodes (near-minimax for
    smooth functions, no Runge wiggle) and on a uniform grid (numpy's plain
    fit), and the one with the smaller maximum error on a dense grid is kept,
    so the result is never worse than the plain fit."""
    import numpy as np

    f = _source_function(activation, detail)
    if f is None:
        raise UserError(f"no reference function to fit for '{activation}'")
    lo, hi = interval
    n = max(2001, 8 * (degree + 1))
    k = np.arange(n)
    nodes = 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.cos(np.pi * (k + 0.5) / n)
    uniform = np.linspace(lo, hi, n)
    dense = np.linspace(lo, hi, 10 * n)
    target = f(dense)
    best = None
    for xs in (nodes, uniform):
        fit = np.polynomial.Chebyshev.fit(xs, f(xs), degree, domain=[lo, hi])
        poly = fit.convert(kind=np.polynomial.Polynomial)
        err = float(np.max(np.abs(poly(dense) - target)))
        if best is None or err < best[0]:
            best = (err, poly)
    return tuple(float(c) for c in best[1].coef)


def _approx_factory(args: str, options: dict[str, Any]) -> Target:
    degree = options.get("degree")
    degree = APPROX_DEFAULT_DEGREE if degree is None else int(degree)
    interval = tuple(options.get("interval") or APPROX_DEFAULT_INTERVAL)
    if degree < 1 or degree > 32:
        raise UserError(f"--degree must be between 1 and 32, got {degree}")
    if len(interval) != 2 or not interval[0] < interval[1]:
        raise UserError(f"--range must be LO,HI with LO < HI, got {interval}")
    cache: dict[tuple[str, str], tuple[float, ...]] = {}

    def coefficients_for(site: Any) -> tuple[float, ...]:
        # A calibrated site is fitted on its own measured interval.
        bounds = tuple(getattr(site, "fit_interval", None) or interval)
        key = (site.activation, site.detail, bounds)
        if key not in cache:
            cache[key] = fit_coefficients(site.activation, site.detail, degree, bounds)  # type: ignore[arg-type]
        return cache[key]

    def refuses(activation: str, detail: str) -> str | None:
        if _source_function(activation, detail) is None:
            return _known(activation, detail) or f"{activation} has no reference function to fit"
        return None

    trainable = bool(options.get("trainable")) or args == "quad"
    return polynomial_target(
        "quad" if args == "quad" else "approx",
        f"degree-{degree} least-squares fit on [{interval[0]:g}, {interval[1]:g}]"
        + (", trainable" if trainable else ""),
        coefficients_for, refuses, trainable=trainable, per_channel=bool(options.get("per_channel")),
    )


def _quad_factory(args: str, options: dict[str, Any]) -> Target:
    """a·x² + b·x + c, trainable, initialised to the fit of the source activation."""
    if options.get("degree") not in (None, 2):
        raise UserError("--to quad is degree 2 (a·x² + b·x + c); use --to approx --degree D --trainable")
    return _approx_factory("quad", {**options, "degree": 2, "trainable": True})


TARGET_FACTORIES["poly"] = _poly_factory
TARGET_FACTORIES["approx"] = _approx_factory
TARGET_FACTORIES["quad"] = _quad_factory


def check_pairs(sources: frozenset[str], target: Target) -> None:
    """Refuse (UserError) explicitly chosen sources the target can never replace."""
    for name in sorted(sources):
        reason = target.refuses(name, "")
        if reason is not None:
            raise UserError(f"--from {name} --to {target.name}: {reason}")


def resolve_sources(spec: str) -> frozenset[str]:
    """``--from`` names (comma-separated) or ``all`` (every non-polynomial source)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return frozenset(n for n, fam in SOURCES.items() if fam not in ("polynomial", "pool", "blend"))
    unknown = [
        n for n in names
        if canonical(n) not in SOURCES or SOURCES[canonical(n)] in ("polynomial", "pool", "blend")
    ]
    if unknown or not names:
        raise UserError(
            f"unknown source activation(s) {', '.join(unknown) or repr(spec)} for --from; "
            f"use 'all' or names from: {', '.join(n for n, f in SOURCES.items() if f != 'polynomial')}"
        )
    return frozenset(canonical(n) for n in names)


# Registered Keras names of actswap's own objects -> the source name they report as.
OWN_OBJECTS: dict[str, str] = {
    "actswap>square": "square",
    "actswap>SquareActivation": "square",
    "actswap>Square": "square",
    "actswap>PolynomialActivation": "poly",
    "actswap>Polynomial": "poly",
    "actswap>Blend": "blend",
}
