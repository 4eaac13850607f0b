"""Rules: the replacements that are not one element-wise activation for another.

A :class:`~actswap.registry.Target` puts a polynomial where an element-wise
activation was (ReLU -> x², GELU -> a fitted quadratic). Some sites need
something else: a softmax mixes the elements of an axis, a
``LayerNormalization`` divides by a statistic of its input, the softmax inside
``MultiHeadAttention`` is a sub-computation of a layer with weights, a max
pooling is no activation at all. One :class:`Rule` record says, for one source
of the catalog (:mod:`actswap.catalog`):

* what it matches: ``source``, the catalog record whose forms site finding
  reads; ``listed=False`` for a source whose sites are looked for only when it
  is selected (max pooling, selected by ``--pool avg``; found by
  :func:`actswap.sites.unlisted_sites`), so that reports of models that do not
  ask for it stay as they were;
* which targets use it (``targets``; None: every target);
* what it puts in: ``layer(site, node, blend)`` for a whole layer (``node``
  is the old layer's serialized ``{"class_name", "config"}``), and
  ``activation(site, owner)`` for an ``activation=`` argument (None: the rule
  has no such form);
* which sites it refuses, and why (``refuses(site)``; the output softmax, which
  the client computes after decryption);
* its HE cost: the :class:`~actswap.catalog.OwnActivation` records of what it
  puts in (``emits``), registered with the rule, read by :mod:`actswap.he`;
* what calibration it needs (``calibration``, for the docs and reports): the
  layers it puts in measure their own constants in calibration mode
  (:func:`calibrate_layers`).

The engine (:mod:`actswap.formats.keras_model`, :mod:`actswap.recover.blend`)
asks :func:`rule_for`; it never names a rule. Adding a kind of replacement is
one :func:`register_rule` call (``tests/test_rules.py`` registers a toy one).

Importing this module imports neither TensorFlow nor Keras (``actswap --help``
reads the catalog); the builders import Keras when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import catalog

LayerBuild = Callable[[Any, dict[str, Any], bool], Any]  # (site, old node, blend) -> layer
ActivationBuild = Callable[[Any, dict[str, Any]], Any]  # (site, owner config) -> activation object


@dataclass(frozen=True)
class Rule:
    """One kind of replacement for the sites of one catalog source (see the module)."""

    name: str
    source: str
    description: str
    layer: LayerBuild
    activation: ActivationBuild | None = None
    targets: frozenset[str] | None = None
    refuses: Callable[[Any], str | None] | None = None
    reason: Callable[[Any, str], str] | None = None  # (site, target name) -> the report's reason
    emits: tuple[catalog.OwnActivation, ...] = ()
    calibration: str = ""
    listed: bool = True
    # Layer classes that are a site of this rule's source when it is not listed
    # (found by walking the model, only when selected), and the form reported.
    layer_classes: tuple[str, ...] = ()
    form: str = "layer"

    def serves(self, target: str) -> bool:
        return self.targets is None or target.split(":")[0] in self.targets


RULES: dict[str, Rule] = {}  # source name -> its rule


def register_rule(rule: Rule) -> Rule:
    """Add (or replace) the rule of ``rule.source``; what it emits joins the catalog."""
    if rule.source not in catalog.RECORDS:
        raise ValueError(f"rule '{rule.name}': source '{rule.source}' is not in the catalog")
    for own in rule.emits:
        if catalog.OWN.get(own.source) is not own:
            catalog.register_own(own)
    RULES[rule.source] = rule
    return rule


def unregister_rule(source: str) -> Rule:
    """Remove the rule of ``source`` (what it emitted stays in the catalog: models
    that hold it are still recognised)."""
    return RULES.pop(source)


def rule_for(activation: str, target: str) -> Rule | None:
    """The rule that replaces sites of ``activation`` under ``target`` (None: the
    target's own element-wise builders do)."""
    rule = RULES.get(activation)
    return rule if rule is not None and rule.serves(target) else None


def refusal(activation: str, detail: str, target: Any, site: Any = None) -> str | None:
    """Why ``target`` cannot replace ``activation`` (at ``site`` when given), or None.
    A source with a rule is judged by the rule; any other by the target."""
    rule = RULES.get(activation)
    if rule is None:
        return target.refuses(activation, detail)
    if not rule.serves(target.name):
        names = ", ".join(sorted(rule.targets or ()))
        return f"{activation} is not an element-wise activation; it has a polynomial form under --to {names}"
    if site is not None and rule.refuses is not None:
        return rule.refuses(site)
    return None


def unlisted_sources(chosen: Iterable[str]) -> list[Rule]:
    return [r for name, r in RULES.items() if not r.listed and name in chosen]


def site_reason(site: Any, target: str) -> str:
    """The report's reason for a replaced site: the rule's, else "source -> target"."""
    rule = rule_for(site.activation, target)
    if rule is not None:
        return rule.reason(site, target) if rule.reason is not None else rule.name
    return f"{site.activation} -> {target}"


def put_in_by_a_rule(obj: Any) -> bool:
    """Whether ``obj`` (a layer or an ``activation=`` object) is what a rule puts in."""
    import inspect as pyinspect

    import keras

    if obj is None:
        return False
    key = obj if pyinspect.isfunction(obj) else type(obj)
    source = catalog.OWN_OBJECTS.get(keras.saving.get_registered_name(key))
    return any(own.source == source for rule in RULES.values() for own in rule.emits)


def calibrate_layers(model: Any, batches: Iterable[Any]) -> list[str]:
    """Run ``model`` on ``batches`` (input arrays) with every layer a rule put in in
    calibration mode, then set their constants from what they measured; returns
    the names of the layers calibrated. A layer in calibration mode computes
    the function it replaces, so every layer measures the statistics of the
    original model's function upstream of it, whatever order they are in."""
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if callable(getattr(layer, "finish_calibration", None))]
    if not layers:
        return []
    for layer in layers:
        layer.calibrating = True
    try:
        for x in batches:
            model(x, training=False)
    finally:
        for layer in layers:
            layer.calibrating = False
    for layer in layers:
        layer.finish_calibration()
    return [layer.name for layer in layers]


# --- the built-in rules ------------------------------------------------------------

APPROX_TARGETS = frozenset({"approx", "quad"})
# c of s·(x + c)²: MPCFormer's "2Quad" constant; scores above -c keep their order.
SOFTMAX_SHIFT = 5.0


def _config(node: dict[str, Any]) -> dict[str, Any]:
    return dict(node["config"])


def _average_pooling(site: Any, node: dict[str, Any], blend: bool) -> Any:
    import keras

    cls = getattr(keras.layers, POOL_SWAPS[node["class_name"]])
    keys = ("name", "pool_size", "strides", "padding", "data_format", "keepdims", "trainable", "dtype")
    return cls(**{k: v for k, v in node["config"].items() if k in keys})


def _pool_reason(site: Any, target: str) -> str:
    return f"{site.layer} -> {POOL_SWAPS[site.layer]} (--pool avg)"


# Max pooling is not an activation, but HE cannot compute a maximum either;
# --pool avg swaps it for average pooling (same window, strides, padding).
POOL_SWAPS: dict[str, str] = {
    "MaxPooling1D": "AveragePooling1D", "MaxPooling2D": "AveragePooling2D",
    "MaxPooling3D": "AveragePooling3D", "GlobalMaxPooling1D": "GlobalAveragePooling1D",
    "GlobalMaxPooling2D": "GlobalAveragePooling2D", "GlobalMaxPooling3D": "GlobalAveragePooling3D",
}


def _softmax_axis(node: dict[str, Any]) -> Any:
    axis = node["config"].get("axis", -1)
    return tuple(axis) if isinstance(axis, list) else axis


def _softmax_layer(site: Any, node: dict[str, Any], blend: bool) -> Any:
    from .transformer import PolySoftmax

    cfg = node["config"]
    kwargs = {k: cfg[k] for k in ("name", "trainable", "dtype") if k in cfg}
    return PolySoftmax(axis=_softmax_axis(node), shift=SOFTMAX_SHIFT, blend=blend, **kwargs)


def _softmax_activation(site: Any, owner: dict[str, Any]) -> Any:
    from .transformer import PolySoftmaxActivation

    n = owner.get("units") or owner.get("filters")
    if not n:
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"'{site.path}': softmax as the activation of {site.layer}, whose width is unknown; "
            "make it a Softmax layer"
        )
    return PolySoftmaxActivation(shift=SOFTMAX_SHIFT, scale=1.0 / (n * SOFTMAX_SHIFT**2))


def _output_softmax(site: Any) -> str | None:
    if getattr(site, "at_output", False):
        return "output softmax: client-side (the client decrypts the logits and applies it)"
    return None


def _layernorm(site: Any, node: dict[str, Any], blend: bool) -> Any:
    from .normalization import PolyLayerNormalization

    return PolyLayerNormalization.from_config({**_config(node), "coefficients": [1.0], "blend": blend})


def _rmsnorm(site: Any, node: dict[str, Any], blend: bool) -> Any:
    from .normalization import PolyRMSNormalization

    return PolyRMSNormalization.from_config({**_config(node), "coefficients": [1.0], "blend": blend})


def _attention(site: Any, node: dict[str, Any], blend: bool) -> Any:
    from .transformer import PolyAttention, PolyMultiHeadAttention

    cls = PolyAttention if node["class_name"] == "Attention" else PolyMultiHeadAttention
    return cls.from_config({**_config(node), "blend": blend})


def _attention_refuses(site: Any) -> str | None:
    if "score_mode=concat" in site.detail:
        return "Attention(score_mode='concat'): its scores pass through tanh, which no polynomial form here replaces"
    return None


def _cost_softmax(obj: Any) -> tuple[int, int]:
    # s·(x + c)²: one product of ciphertexts, one by the constant s.
    return 1, 1


def _cost_layernorm(obj: Any) -> tuple[int, int]:
    # Fixed normalisation: (x - mean(x))·c·gamma is one affine map. With a
    # polynomial q of the variance: the variance (1 ct_ct, its mean 1 ct_pt),
    # q (its own cost), the product with x - mean (1 ct_ct), gamma (1 ct_pt).
    c = tuple(float(v) for v in getattr(obj, "coefficients", (1.0,)))
    if len(c) == 1:
        return 0, 1
    q_ct, q_pt = catalog.polynomial_cost(c)
    return 2 + q_ct, 2 + q_pt


def _cost_attention(obj: Any) -> tuple[int, int]:
    return sum(p[1] for p in attention_parts(obj)), sum(p[2] for p in attention_parts(obj))


def attention_parts(obj: Any = None) -> list[tuple[str, int, int]]:
    """(part, ct_ct, ct_pt) along the longest chain of a (polynomial) multi-head
    attention, for the HE report: the query projection, QKᵀ (a product of two
    ciphertexts), the polynomial softmax s·(x + c)², the weights times V, the
    output projection. (1/sqrt(key_dim) folds into the query projection.)"""
    polynomial = obj is None or getattr(obj, "actswap_blend_capable", False)
    softmax = "softmax s·(x + c)²" if polynomial else "softmax"
    if type(obj).__name__ in ("Attention", "PolyAttention"):  # no projections; its scale is a weight
        return [("QKᵀ", 1, 1 if getattr(obj, "use_scale", False) else 0), (softmax, 1, 1), ("weights × V", 1, 0)]
    return [("query projection", 0, 1), ("QKᵀ", 1, 0), (softmax, 1, 1),
            ("weights × V", 1, 0), ("output projection", 0, 1)]


_POLY_SOFTMAX = catalog.OwnActivation(
    "poly_softmax", ("PolySoftmax",), ("actswap>PolySoftmax", "actswap>PolySoftmaxActivation"), _cost_softmax)
_POLY_LAYERNORM = catalog.OwnActivation(
    "poly_layernorm", ("PolyLayerNormalization",), ("actswap>PolyLayerNormalization",), _cost_layernorm)
_POLY_RMSNORM = catalog.OwnActivation(
    "poly_rmsnorm", ("PolyRMSNormalization",), ("actswap>PolyRMSNormalization",), _cost_layernorm)
_POLY_ATTENTION = catalog.OwnActivation(
    "poly_attention", ("PolyMultiHeadAttention", "PolyAttention"),
    ("actswap>PolyMultiHeadAttention", "actswap>PolyAttention"), _cost_attention)

register_rule(Rule(
    "max_pool -> average pool", catalog.POOL_SOURCE, "average pooling, same window (--pool avg)",
    _average_pooling, reason=_pool_reason, listed=False, layer_classes=tuple(POOL_SWAPS), form="pooling layer",
))
register_rule(Rule(
    "softmax -> shifted square", "softmax",
    "s·(x + c)², s normalising by a calibrated constant instead of dividing by the sum",
    _softmax_layer, _softmax_activation, APPROX_TARGETS, _output_softmax, emits=(_POLY_SOFTMAX,),
    calibration="s = 1 / mean over the data of the sum of (x + c)² along the axis",
))
register_rule(Rule(
    "layernorm -> fixed normalisation", "layernorm",
    "(x - mean(x))·c·gamma + beta, c = 1/sqrt(the variance measured on data + epsilon)",
    _layernorm, None, APPROX_TARGETS, emits=(_POLY_LAYERNORM,),
    calibration="c = 1/sqrt(mean variance over the data + epsilon)",
))
register_rule(Rule(
    "rmsnorm -> fixed normalisation", "rmsnorm",
    "x·c·scale, c = 1/sqrt(the mean square measured on data + epsilon)",
    _rmsnorm, None, APPROX_TARGETS, emits=(_POLY_RMSNORM,),
    calibration="c = 1/sqrt(mean of mean(x²) over the data + epsilon)",
))
register_rule(Rule(
    "attention softmax -> shifted square", "attention_softmax",
    "attention weights s·(QKᵀ/sqrt(d) + c)², s a calibrated constant instead of the softmax's division",
    _attention, None, APPROX_TARGETS, _attention_refuses, emits=(_POLY_ATTENTION,),
    calibration="s = 1 / mean over the data of the sum over keys of (score + c)²",
))
