"""The blended model: each site ``(1 - a)·source(x) + a·p(x)``, and the two ends of
a recovery -- :func:`blend_model` (a = 0: the original function) and
:func:`finalize` (a = 1: the polynomial model, a converted model like any
other). For x², ``p`` is the shifted square ``s·(x + b)²`` fitted by
:func:`fit_squares`, finalized as ``s·x²`` with ``b`` folded into the layer
before it (:mod:`actswap.recover.shifts`).

Invariant: the models passed in are not modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras

from .. import registry
from ..activations import Polynomial, Square
from ..report import REPLACED, SKIPPED
from ..rewrite import rewrite
from ..sites import find_sites
from .blend_layer import SQUARE, Blend

def _in_blend_mode(obj: Any) -> bool:
    """A layer a rule put in (:mod:`actswap.rules`), built to blend from the
    function it replaces to its polynomial: it has a ``factor`` like a Blend."""
    return getattr(obj, "actswap_blend_capable", False) and getattr(obj, "blend", False)


def blends(model: Any) -> list[Any]:
    """Every Blend in ``model`` (as a layer or as another layer's activation), and
    every rule layer in blend mode, once: each has a ``factor`` and a ``peak``."""
    found: dict[int, Any] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for candidate in (layer, getattr(layer, "activation", None)):
            if isinstance(candidate, Blend) or _in_blend_mode(candidate):
                found.setdefault(id(candidate), candidate)
    return list(found.values())


def rule_layers_of(converted: Any) -> dict[str, dict[str, Any]]:
    """Layer name -> what a rule put there, serialized: the layer (a polynomial
    softmax, LayerNormalization or attention), or the ``activation=`` object of
    the layer (a polynomial softmax of a Dense); for :func:`blend_model`."""
    from .. import rules

    out: dict[str, dict[str, Any]] = {}
    for layer in converted._flatten_layers(include_self=False, recursive=True):
        if getattr(layer, "actswap_blend_capable", False):
            out.setdefault(layer.name, keras.saving.serialize_keras_object(layer))
        elif rules.put_in_by_a_rule(getattr(layer, "activation", None)):
            out.setdefault(layer.name, keras.saving.serialize_keras_object(layer.activation))
    return out


def _source_value(site: Any) -> Any:
    # The activation a site computes, by the name keras.activations.get knows;
    # variants with arguments (ReLU(max_value=...)) have no such name.
    if site.detail:
        raise ValueError(f"'{site.path}': {site.activation}({site.detail}) cannot be blended")
    return site.activation


def polynomials_of(converted: Any) -> dict[str, tuple[float, ...]]:
    """Layer name -> the polynomial a converted model has there (x² is (0, 0, 1),
    a scaled square ``s·x²`` is (0, 0, s)). Keyed by name: Keras keeps layer
    names unique within a model."""
    from ..activations import SquareActivation, square

    out: dict[str, tuple[float, ...]] = {}
    for layer in converted._flatten_layers(include_self=False, recursive=True):
        for obj in (layer, getattr(layer, "activation", None)):
            if isinstance(obj, (Square, SquareActivation)):
                out.setdefault(layer.name, (0.0, 0.0, obj.scale))
            elif obj is square:
                out.setdefault(layer.name, SQUARE)
            elif isinstance(obj, Polynomial) or type(obj).__name__ == "PolynomialActivation":
                out.setdefault(layer.name, tuple(obj.coefficients))
    return out


def blend_model(
    original: Any, to: Any = "square", sources: Iterable[str] = ("relu",),
    polynomials: dict[str, tuple[float, ...]] | None = None,
    squares: dict[str, tuple[float, float]] | None = None,
    rule_layers: dict[str, dict[str, Any]] | None = None,
    **target_options: Any,
) -> Any:
    """``original`` with each selected site (that ``to`` accepts) as a Blend at factor 0.
    With ``polynomials`` (from :func:`polynomials_of` a converted model), exactly
    those sites blend towards exactly those polynomials. ``squares`` (layer name
    -> (scale, shift)): those x² sites blend towards ``scale·(x + shift)²``
    (:func:`fit_squares`). ``rule_layers`` (from :func:`rule_layers_of`): those
    sites become the same layers in blend mode (a softmax, LayerNormalization
    or attention moving to its polynomial form), weights copied."""
    target = registry.get_target(to, **target_options)
    chosen = registry.as_sources(sources)
    rule_layers = rule_layers or {}
    sites = find_sites(original)
    for s in sites:
        if s.path.split("/")[-1] in rule_layers:
            ok = True
        elif polynomials is not None:
            ok = s.path.split("/")[-1] in polynomials
        else:
            ok = s.activation in chosen and target.refuses(s.activation, s.detail) is None
        s.action = REPLACED if ok else SKIPPED
    if polynomials is not None:
        def coefficients(site: Any) -> tuple[float, ...]:
            return polynomials[site.path.split("/")[-1]]
    elif target.coefficients is None:
        def coefficients(site: Any) -> tuple[float, ...]:
            return SQUARE
    else:
        coefficients = target.coefficients

    def blend(site: Any, **kwargs: Any) -> Blend:
        c = tuple(coefficients(site))
        name = site.path.split("/")[-1]
        if _monomial(c):
            scale, shift = (squares or {}).get(name, (c[2], 0.0))
            return Blend(_source_value(site), SQUARE, scale=scale, shift=shift, **kwargs)
        return Blend(_source_value(site), c, **kwargs)

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        ruled = rule_layers.get(site.path.split("/")[-1])
        if ruled is not None:
            return _with_blend(ruled, True)
        return blend(site, name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        ruled = rule_layers.get(site.path.split("/")[-1])
        if ruled is not None:  # an activation= softmax has no weight to blend with: swapped at once
            return keras.saving.deserialize_keras_object(ruled, safe_mode=True)
        return blend(site)

    return rewrite(original, sites, make_layer, make_activation)


def _with_blend(node: dict[str, Any], blend: bool) -> Any:
    """The serialized rule layer ``node`` rebuilt with its blend mode set (safe mode)."""
    return keras.saving.deserialize_keras_object({**node, "config": {**node["config"], "blend": blend}},
                                                 safe_mode=True)


def _monomial(c: tuple[float, ...]) -> bool:
    """s·x² with s > 0 (a square, scaled or not)."""
    return len(c) == 3 and c[0] == 0.0 and c[1] == 0.0 and c[2] > 0


def fit_squares(original: Any, polynomials: dict[str, tuple[float, ...]], x: Any) -> dict[str, tuple[float, float]]:
    """Range-aware start for the x² sites of ``polynomials``: per site, the
    shifted square ``s·(z + b)²`` that is the least-squares quadratic to the
    source activation on the site's measured input range [-R, R] (``original``
    run on inputs ``x``), when ``b`` can be folded into the layer producing z
    (:func:`actswap.recover.shifts.producers`); elsewhere ``b = 0`` and ``s`` is that
    quadratic's x² coefficient. Layer name -> (s, b)."""
    from ..calibrate import calibrate
    from .shifts import producers

    foldable = producers(original)
    sites = [s for s in find_sites(original) if s.path.split("/")[-1] in polynomials
             and _monomial(tuple(polynomials[s.path.split("/")[-1]]))]
    ranges = calibrate(original, sites, x)
    out: dict[str, tuple[float, float]] = {}
    for s in sites:
        r = ranges.get(s.path)
        name = s.path.split("/")[-1]
        if r is None or s.detail:
            continue
        bound = max(abs(r.min), abs(r.max), 1e-3)
        c0, c1, c2 = registry.fit_coefficients(s.activation, s.detail, 2, (-bound, bound))
        if c2 <= 0:
            continue
        top_level = s.path == name  # producers() looks at the top-level graph only
        out[name] = (c2, c1 / (2.0 * c2) if top_level and name in foldable else 0.0)
    return out


def _blend_by_layer(model: Any) -> dict[str, Blend]:
    """Layer name -> the Blend it is or holds as its activation. (A Blend held as
    an activation is also a sub-layer of its owner; it is listed under the owner.)"""
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    out: dict[str, Blend] = {}
    owned = set()
    for layer in layers:
        act = getattr(layer, "activation", None)
        if isinstance(act, Blend):
            out.setdefault(layer.name, act)
            owned.add(id(act))
    for layer in layers:
        if isinstance(layer, Blend) and id(layer) not in owned:
            out.setdefault(layer.name, layer)
    return out


def finalize(blended: Any) -> Any:
    """The polynomial model: every Blend (factor 1) becomes its polynomial (x²:
    ``Square(scale=s)``, its shift folded into the layer producing its input,
    :mod:`actswap.recover.shifts`); weights kept. ``blended`` is not modified."""
    from .shifts import fold, producers

    for b in blends(blended):
        if float(b.factor.numpy()) != 1.0:
            raise ValueError(f"blend '{b.name}' is at {float(b.factor.numpy()):g}, not 1: finish the schedule first")
    sites = find_sites(blended)
    in_blend_mode = {layer.name for layer in blended._flatten_layers(include_self=False, recursive=True)
                     if _in_blend_mode(layer)}
    for s in sites:
        s.action = REPLACED if s.activation == "blend" or s.path.split("/")[-1] in in_blend_mode else SKIPPED
    by_layer = _blend_by_layer(blended)
    shifted = {name: b.shift for name, b in by_layer.items() if b.is_square and b.shift}
    where = producers(blended) if shifted else {}
    missing = sorted(set(shifted) - set(where))
    if missing:
        raise ValueError(f"blend(s) {missing} have a shift but no layer to fold it into")

    def square_scale(site: Any) -> float | None:
        b = by_layer[site.path.split("/")[-1]]
        return b.scale if b.is_square else None

    def make_layer(site: Any, node: dict[str, Any]) -> Any:
        if site.activation != "blend":  # a rule layer: the same layer without its blend
            return _with_blend(node, False)
        scale = square_scale(site)
        if scale is not None:
            return Square(scale=scale, name=node["config"]["name"])
        return Polynomial(tuple(node["config"]["coefficients"]), name=node["config"]["name"])

    def make_activation(site: Any, owner: dict[str, Any]) -> Any:
        from ..activations import PolynomialActivation, SquareActivation

        scale = square_scale(site)
        if scale is not None:
            return SquareActivation(scale=scale)
        return PolynomialActivation(tuple(owner[site.pointer[-1]]["config"]["coefficients"]))

    final = rewrite(blended, sites, make_layer, make_activation)
    for name, shift in shifted.items():
        fold(final, where[name], shift)
    return final


def reestimate_statistics(model: Any, batches: Iterable[Any]) -> int:
    """Recompute the inference statistics of ``model`` -- BatchNormalization's
    moving mean and variance -- as exact
    averages over ``batches`` (inputs only) run in training mode, instead of the
    moving averages left by training (which lag behind the weights' last steps;
    x² amplifies any lag). No weight other than those statistics changes. Returns
    the number of batches used."""
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]

    momenta = [layer.momentum for layer in layers]
    n = 0
    try:
        for n, x in enumerate(batches, start=1):
            for layer in layers:
                layer.momentum = (n - 1) / n  # running mean over the batches so far
            model(x, training=True)
    finally:
        for layer, m in zip(layers, momenta):
            layer.momentum = m
    return n


