"""Registries: the targets actswap can put in, and the policy of which sites they take.

The activations actswap recognises are the records of :mod:`actswap.catalog`;
the tables this module always had (``SOURCES``, ``TF_OP_ACTIVATIONS`` ...) are
its views, re-exported. Policy lives here; the rewriting engine
(:mod:`actswap.rewrite`) only asks a target what to put at a site, and never
names one. The names users see in the CLI and in reports are the keys of these
dicts.

Importing this module does not import TensorFlow; a target builds Keras
objects only when asked to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import catalog, rules

# The source activations and their forms are records of :mod:`actswap.catalog`;
# these names are its views, the same dict objects (kept in step in place), so
# ``registry.TF_OP_ACTIVATIONS`` and the rest read as they always did.
from .catalog import (  # noqa: F401  (re-exported)
    ACTIVATION_LAYERS,
    ALIASES,
    OP_ACTIVATIONS,
    OWN_LAYERS,
    OWN_OBJECTS,
    SOURCES,
    TF_KERAS_ACTIVATION_LAYERS,
    TF_KERAS_SYMBOLS,
    TF_OP_ACTIVATIONS,
    TF_OPS,
    Source,
    canonical,
    detail_of,
    family,
    register_source,
    unregister_source,
)
from .catalog import reference_function as _source_function  # fitplot's name for it
from .errors import UserError

# --- Pooling ----------------------------------------------------------------

# Max pooling -> average pooling is a rule of :mod:`actswap.rules` (``--pool avg``).
POOL_SWAPS = rules.POOL_SWAPS
POOL_SOURCE = catalog.POOL_SOURCE


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
    # What the target puts in: its layer classes, registered names and HE
    # cost (a record of the catalog, registered with the target).
    emits: catalog.OwnActivation | None = None


TARGETS: dict[str, Target] = {}
# Parameterised targets: "name:args" -> factory(args, options) -> Target.
TARGET_FACTORIES: dict[str, Callable[[str, dict[str, Any]], Target]] = {}


def register_target(target: Target) -> Target:
    """Add a target; what it emits joins the catalog, so site finding and the
    HE modules recognise it in the models it writes."""
    if target.emits is not None and catalog.OWN.get(target.emits.source) is not target.emits:
        catalog.register_own(target.emits)
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
    from . import tf_ops

    if custom_gradient_ok:
        return tf_ops.square_op(x, grad)
    _no_custom_gradient_function(grad)
    return tf_ops.square_op_without_custom_gradient(x, grad)


register_target(
    Target(
        name="square",
        description="x*x with a custom gradient (exact or clip:C)",
        refuses=_square_refuses,
        layer=_square_layer,
        activation=_square_activation,
        tensor=_square_tensor,
        graph_op="Square",
        emits=catalog.OWN["square"],
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
        from . import tf_ops

        if trainable:
            raise UserError(
                f"--to {name} with trainable coefficients needs a Keras model; a graph has no "
                "place for new variables"
            )
        if custom_gradient_ok:
            return tf_ops.poly_op(x, coefficients_for(site), grad)
        _no_custom_gradient_function(grad)
        return tf_ops.poly_op_without_custom_gradient(x, coefficients_for(site), grad)

    return Target(name, description, refuses, layer, activation, tensor, None, coefficients_for,
                  emits=catalog.OWN["poly"])


def _known(activation: str, detail: str) -> str | None:
    if activation.startswith("custom"):
        return "unrecognised custom activation"
    if not catalog.is_elementwise(activation):
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
    """Refuse (UserError) explicitly chosen sources the target can never replace
    (a source with a rule is judged by its rule)."""
    for name in sorted(sources):
        reason = rules.refusal(name, "", target)
        if reason is not None:
            raise UserError(f"--from {name} --to {target.name}: {reason}")


def resolve_sources(spec: str) -> frozenset[str]:
    """``--from`` names (comma-separated) or ``all`` (every non-polynomial source)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return frozenset(n for n, fam in SOURCES.items() if fam not in catalog.NOT_CONVERTED_FAMILIES)
    unknown = [
        n for n in names
        if canonical(n) not in SOURCES or SOURCES[canonical(n)] in catalog.NOT_CONVERTED_FAMILIES
    ]
    if unknown or not names:
        raise UserError(
            f"unknown source activation(s) {', '.join(unknown) or repr(spec)} for --from; "
            f"use 'all' or names from: {', '.join(n for n, f in SOURCES.items() if f != catalog.POLYNOMIAL_FAMILY)}"
        )
    return frozenset(canonical(n) for n in names)


def as_sources(sources: Iterable[str] | str) -> frozenset[str]:
    """The API's ``sources``: names, or one string as ``--from`` takes it
    (``"all"``, ``"gelu,softmax"``); a string is never read letter by letter."""
    if isinstance(sources, str):
        return resolve_sources(sources)
    return frozenset(sources)


def float16_overflow(target: str) -> str:
    """How the target put in overflows float16, for warnings: "x² ... once |x| > 255"
    for the square, the polynomial's outputs otherwise."""
    if target == "square":
        return "x² overflows float16 once |x| > 255 (65504 is its largest value)"
    return "the polynomial overflows float16 once its outputs pass 65504, its largest value"
