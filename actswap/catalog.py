"""The catalog: every activation actswap recognises, and what it puts in, one record each.

A source activation is one :class:`Source` record: its canonical name and
family, the other spellings Keras accepts, every form it takes in a model
(Keras layer classes, ``keras.ops`` operation classes, TensorFlow graph op
types, ``tf_keras`` TFOpLambda symbols), its NumPy reference (what ``--to
approx`` fits) and whether it is element-wise. What actswap puts in (its
own layers and activation objects) is one :class:`OwnActivation` record:
the layer classes, Keras registered names and HE cost of one kind of
replacement; a :class:`~actswap.registry.Target` names the one it builds.

Everything else reads the records through the views below (site finding in
:mod:`actswap.classify`, graph sites in :mod:`actswap.formats.tf_graphs`, the scan's
precision note, the HE report and compiler in :mod:`actswap.he`), so adding
an activation is one :func:`register_source` call.

Invariants:

* every view is a function of the registered records only: :func:`_rebuild`
  refills each one in place (callers may hold the dict objects) after every
  registration, so no view ever shows a form of a record that is gone;
* one form belongs to one source: registering a record whose form another
  record already claims raises ``ValueError`` and changes nothing;
* importing this module imports neither TensorFlow, Keras nor NumPy
  (``actswap --help`` reads it); the NumPy references import NumPy when
  first called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class _NumPy:
    """``numpy``, imported on first attribute use (see the module's invariants)."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)


np: Any = _NumPy()

# Families whose members are not activations to convert (``--from all`` skips them).
POLYNOMIAL_FAMILY = "polynomial"  # actswap's own output
POOL_FAMILY = "pool"  # max pooling (--pool avg)
POOL_SOURCE = "max_pool"
BLEND_FAMILY = "blend"  # a site on its way to a polynomial (actswap.recover)
NOT_CONVERTED_FAMILIES = frozenset({POLYNOMIAL_FAMILY, POOL_FAMILY, BLEND_FAMILY})

# reference(x, params): the activation on a float64 array; ``params`` are the
# site's detail as strings ("negative_slope" -> "0.1").
Reference = Callable[[Any, Mapping[str, str]], Any]


@dataclass(frozen=True)
class Source:
    """One source activation and every form it takes in a model.

    ``family`` groups variants (a skipped member of the relu family fails
    ``--strict``); None means the name itself. ``keras_layers`` are layer
    classes (``keras.layers`` and ``tf_keras.layers``) that are the activation
    in themselves; ``tf_keras_layers`` are such classes of ``tf_keras`` only.
    ``keras_ops`` are ``keras.src.ops`` operation classes (``keras.ops.relu(x)``
    on a KerasTensor); ``tf_ops`` TensorFlow op types in graphs;
    ``tf_keras_symbols`` the TensorFlow symbols a Keras 2 ``TFOpLambda``
    names (``"nn.relu"``). ``reference`` is None when there is nothing to fit.
    ``elementwise`` is False for activations a per-element polynomial cannot
    stand in for: they mix elements (softmax), split their input (glu) or
    carry weights (prelu). A source that is no activation at all (a
    normalisation, the softmax inside attention, max pooling) is replaced by a
    rule of :mod:`actswap.rules`."""

    name: str
    family: str | None = None
    aliases: tuple[str, ...] = ()
    keras_layers: tuple[str, ...] = ()
    tf_keras_layers: tuple[str, ...] = ()
    keras_ops: tuple[str, ...] = ()
    tf_ops: tuple[str, ...] = ()
    tf_keras_symbols: tuple[str, ...] = ()
    reference: Reference | None = None
    elementwise: bool = True
    # detail(config) -> the site's detail, for layers whose config says more
    # than their class (LayerNormalization(rms_scaling=True)); None: none.
    detail: Callable[[Mapping[str, Any]], str] | None = None

    @property
    def group(self) -> str:
        return self.family or self.name


def polynomial_cost(coefficients: tuple[float, ...]) -> tuple[int, int]:
    """(ct_ct, ct_pt) multiplications of a polynomial with ascending ``coefficients``:
    ceil(log2 degree) levels of ciphertext products (one per doubling of the
    degree), and one ciphertext x plaintext product when a coefficient is
    other than 0 or 1. The counting rule of :mod:`actswap.he.readiness`."""
    degree = len(coefficients) - 1
    ct_ct = math.ceil(math.log2(degree)) if degree > 1 else 0
    scaled = any(c not in (0.0, 1.0) for c in coefficients)
    return ct_ct, 1 if scaled else 0


@dataclass(frozen=True)
class OwnActivation:
    """One kind of activation actswap puts into a model (and recognises there).

    ``source`` is the source name it reports as (a registered :class:`Source`);
    ``layer_classes`` its layer class names; ``registered_names`` the Keras 3
    registered names of its layer and activation objects (``"actswap>Square"``).
    ``he_cost(obj)`` is the (ct_ct, ct_pt) cost of one such object, a layer or
    an ``activation=`` value; None when it is not a polynomial (then the HE
    modules treat it as a non-polynomial site)."""

    source: str
    layer_classes: tuple[str, ...]
    registered_names: tuple[str, ...]
    he_cost: Callable[[Any], tuple[int, int]] | None = None


# --- the views --------------------------------------------------------------------

RECORDS: dict[str, Source] = {}  # canonical name -> record
OWN: dict[str, OwnActivation] = {}  # source name -> what actswap puts in

SOURCES: dict[str, str] = {}  # canonical name -> family
ALIASES: dict[str, str] = {}  # other spelling -> canonical name
ACTIVATION_LAYERS: dict[str, str] = {}  # Keras 3 layer class -> name
TF_KERAS_ACTIVATION_LAYERS: dict[str, str] = {}  # tf_keras layer class -> name
OP_ACTIVATIONS: dict[str, str] = {}  # keras.ops operation class -> name
TF_OP_ACTIVATIONS: dict[str, str] = {}  # TensorFlow op type -> name
TF_OPS: dict[str, tuple[str, ...]] = {}  # name -> its TensorFlow op types
TF_KERAS_SYMBOLS: dict[str, str] = {}  # TFOpLambda symbol -> name
OWN_OBJECTS: dict[str, str] = {}  # registered name of an own object -> source name
OWN_LAYERS: dict[str, str] = {}  # own layer class -> source name
_VIEWS: dict[str, dict[str, Any]] = {
    "SOURCES": SOURCES, "ALIASES": ALIASES, "ACTIVATION_LAYERS": ACTIVATION_LAYERS,
    "TF_KERAS_ACTIVATION_LAYERS": TF_KERAS_ACTIVATION_LAYERS, "OP_ACTIVATIONS": OP_ACTIVATIONS,
    "TF_OP_ACTIVATIONS": TF_OP_ACTIVATIONS, "TF_OPS": TF_OPS, "TF_KERAS_SYMBOLS": TF_KERAS_SYMBOLS,
    "OWN_OBJECTS": OWN_OBJECTS, "OWN_LAYERS": OWN_LAYERS,
}


def _views(records: Mapping[str, Source], own: Mapping[str, OwnActivation]) -> dict[str, dict[str, Any]]:
    """Every view computed from ``records`` and ``own``; ValueError if a form is claimed twice."""
    out: dict[str, dict[str, Any]] = {name: {} for name in _VIEWS}

    def put(view: str, key: str, name: str) -> None:
        claimed = out[view].get(key)
        if claimed is not None and claimed != name:
            raise ValueError(f"{view}: '{key}' is already '{claimed}', cannot also be '{name}'")
        out[view][key] = name

    for r in records.values():
        out["SOURCES"][r.name] = r.group
        for alias in r.aliases:
            put("ALIASES", alias, r.name)
        for cls in r.keras_layers:
            put("ACTIVATION_LAYERS", cls, r.name)
        for cls in r.keras_layers + r.tf_keras_layers:
            put("TF_KERAS_ACTIVATION_LAYERS", cls, r.name)
        for cls in r.keras_ops:
            put("OP_ACTIVATIONS", cls, r.name)
        for op in r.tf_ops:
            put("TF_OP_ACTIVATIONS", op, r.name)
        if r.tf_ops:
            out["TF_OPS"][r.name] = r.tf_ops
        for symbol in r.tf_keras_symbols:
            put("TF_KERAS_SYMBOLS", symbol, r.name)
    for o in own.values():
        if o.source not in records:
            raise ValueError(f"own activation '{o.source}' reports as a source that is not registered")
        for reg in o.registered_names:
            put("OWN_OBJECTS", reg, o.source)
        for cls in o.layer_classes:
            put("OWN_LAYERS", cls, o.source)
    return out


def _rebuild(records: dict[str, Source], own: dict[str, OwnActivation]) -> None:
    """Make ``records``/``own`` the catalog and refill every view in place; if
    they are inconsistent, raise ValueError and leave the catalog as it was."""
    views = _views(records, own)  # raises before anything changes
    RECORDS.clear()
    RECORDS.update(records)
    OWN.clear()
    OWN.update(own)
    for name, view in _VIEWS.items():
        view.clear()
        view.update(views[name])


def register_source(record: Source) -> Source:
    """Add (or replace, by name) a source activation; every view follows."""
    _rebuild({**RECORDS, record.name: record}, dict(OWN))
    return record


def unregister_source(name: str) -> Source:
    """Remove a source activation (and what actswap puts in that reports as it)."""
    records = dict(RECORDS)
    record = records.pop(name)
    _rebuild(records, {k: v for k, v in OWN.items() if v.source != name})
    return record


def register_own(own: OwnActivation) -> OwnActivation:
    """Add (or replace) one kind of activation actswap puts in; its source must be registered."""
    _rebuild(dict(RECORDS), {**OWN, own.source: own})
    return own


# --- questions the rest of actswap asks -----------------------------------------


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def family(name: str) -> str | None:
    return SOURCES.get(name)


def is_polynomial(name: str) -> bool:
    """Whether a site reporting as ``name`` already computes a polynomial."""
    own = OWN.get(name)
    return own is not None and own.he_cost is not None


def is_elementwise(name: str) -> bool:
    """Whether a per-element polynomial can stand in for ``name`` (unknown names: yes)."""
    record = RECORDS.get(name)
    return record is None or record.elementwise


def detail_of(name: str, config: Mapping[str, Any]) -> str | None:
    """The detail of a layer that is a site of ``name`` when its record reads one
    from the config (None: the record has no such reader)."""
    record = RECORDS.get(name)
    return record.detail(config) if record is not None and record.detail is not None else None


def reference_function(activation: str, detail: str) -> Callable[[Any], Any] | None:
    """The NumPy reference of ``activation`` at a site with ``detail``
    (``"negative_slope=0.1"``), as a function of an array; None: none to fit."""
    record = RECORDS.get(activation)
    if record is None or record.reference is None:
        return None
    params = dict(p.split("=", 1) for p in detail.split(", ") if "=" in p) if detail else {}
    ref = record.reference
    return lambda x: ref(x, params)


def is_converted_tf_op(op: str) -> bool:
    """Whether a TensorFlow op of this type is one a conversion replaces with a
    polynomial: an element-wise source activation (not already a polynomial)."""
    name = TF_OP_ACTIVATIONS.get(op)
    return name is not None and SOURCES[name] not in NOT_CONVERTED_FAMILIES and RECORDS[name].elementwise


# --- the built-in records --------------------------------------------------------------


def _erf(x: Any) -> Any:
    return np.vectorize(math.erf)(x)


def _hard_sigmoid(x: Any) -> Any:
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def _leaky_relu(x: Any, p: Mapping[str, str]) -> Any:
    return np.where(x > 0, x, x * float(p.get("negative_slope", p.get("alpha", 0.2))))


def _square_cost(obj: Any) -> tuple[int, int]:
    # s·x²: one ct_ct, and one ct_pt when s != 1 (the ``square`` function has no scale).
    return polynomial_cost((0.0, 0.0, float(getattr(obj, "scale", 1.0))))


def _poly_cost(obj: Any) -> tuple[int, int]:
    return polynomial_cost(tuple(float(c) for c in obj.coefficients))


_BUILT_IN = (
    Source("relu", "relu", keras_ops=("Relu",), tf_ops=("Relu",), tf_keras_symbols=("nn.relu",),
           reference=lambda x, p: np.maximum(x, 0.0)),
    Source("relu6", "relu", keras_ops=("Relu6",), tf_ops=("Relu6",), tf_keras_symbols=("nn.relu6",),
           reference=lambda x, p: np.clip(x, 0.0, 6.0)),
    Source("leaky_relu", "relu", keras_layers=("LeakyReLU",), keras_ops=("LeakyRelu",),
           tf_ops=("LeakyRelu",), tf_keras_symbols=("nn.leaky_relu",), reference=_leaky_relu),
    # A ReLU layer/op with a threshold or several parameters at once (see classify.relu_variant).
    Source("relu_variant", "relu", tf_keras_layers=("ThresholdedReLU",)),
    Source("elu", keras_layers=("ELU",), keras_ops=("Elu",), tf_ops=("Elu",), tf_keras_symbols=("nn.elu",),
           reference=lambda x, p: np.where(x > 0, x, np.expm1(x))),
    Source("selu", keras_ops=("Selu",), tf_ops=("Selu",), tf_keras_symbols=("nn.selu",),
           reference=lambda x, p: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x))),
    Source("celu", keras_ops=("Celu",)),
    Source("gelu", keras_ops=("Gelu",), tf_keras_symbols=("nn.gelu",),
           reference=lambda x, p: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))),
    Source("silu", aliases=("swish",), keras_ops=("Silu",), tf_keras_symbols=("nn.silu", "nn.swish"),
           reference=lambda x, p: x / (1.0 + np.exp(-x))),
    Source("hard_silu", aliases=("hard_swish",), keras_ops=("HardSilu",),
           reference=lambda x, p: x * _hard_sigmoid(x)),
    Source("sigmoid", keras_ops=("Sigmoid",), tf_ops=("Sigmoid",),
           tf_keras_symbols=("math.sigmoid", "nn.sigmoid", "sigmoid"),
           reference=lambda x, p: 1.0 / (1.0 + np.exp(-x))),
    Source("hard_sigmoid", keras_ops=("HardSigmoid",), reference=lambda x, p: _hard_sigmoid(x)),
    Source("tanh", keras_ops=("Tanh",), tf_ops=("Tanh",), tf_keras_symbols=("math.tanh", "nn.tanh", "tanh"),
           reference=lambda x, p: np.tanh(x)),
    Source("hard_tanh", keras_ops=("HardTanh",)),
    Source("softplus", keras_ops=("Softplus",), tf_ops=("Softplus",),
           tf_keras_symbols=("math.softplus", "nn.softplus"), reference=lambda x, p: np.logaddexp(0.0, x)),
    Source("softsign", keras_ops=("Softsign",), tf_ops=("Softsign",),
           reference=lambda x, p: x / (1.0 + np.abs(x))),
    Source("softmax", keras_layers=("Softmax",), keras_ops=("Softmax",), tf_ops=("Softmax",),
           tf_keras_symbols=("nn.softmax", "math.softmax"), elementwise=False),
    Source("log_softmax", keras_ops=("LogSoftmax",), tf_ops=("LogSoftmax",), elementwise=False),
    Source("prelu", keras_layers=("PReLU",), elementwise=False),
    Source("mish"),
    Source("glu", keras_ops=("Glu",), elementwise=False),
    Source("exponential"),
    Source("sparse_plus", keras_ops=("SparsePlus",)),
    Source("squareplus", keras_ops=("Squareplus",)),
    Source("tanh_shrink", keras_ops=("TanhShrink",)),
    Source("soft_shrink", keras_ops=("SoftShrink",)),
    Source("hard_shrink", keras_ops=("HardShrink",)),
    Source("log_sigmoid", keras_ops=("LogSigmoid",)),
    Source("sparsemax", keras_ops=("Sparsemax",), elementwise=False),
    Source("threshold", keras_ops=("Threshold",)),
    # Max pooling is not an activation, but HE cannot compute a maximum either;
    # --pool avg swaps it for average pooling (registry.POOL_SWAPS).
    Source(POOL_SOURCE, POOL_FAMILY),
    # Transformer blocks: replaced by the rules of actswap.rules (--to approx),
    # not by a per-element polynomial.
    Source("layernorm", aliases=("layer_norm",), keras_layers=("LayerNormalization",), elementwise=False,
           detail=lambda c: "rms_scaling=True" if c.get("rms_scaling") else ""),
    Source("rmsnorm", aliases=("rms_norm",), keras_layers=("RMSNormalization",), elementwise=False),
    Source("attention_softmax", aliases=("attention",), keras_layers=("MultiHeadAttention", "Attention"),
           elementwise=False, detail=lambda c: "score_mode=concat" if c.get("score_mode") == "concat" else ""),
    # What actswap itself puts in: recognised so that re-converting a converted
    # model reports them instead of ignoring them. ``Square`` is also the op
    # --to square leaves in a frozen GraphDef.
    Source("square", POLYNOMIAL_FAMILY, tf_ops=("Square",)),
    Source("poly", POLYNOMIAL_FAMILY),
    Source("blend", BLEND_FAMILY),
    Source("poly_softmax", POLYNOMIAL_FAMILY),
    Source("poly_layernorm", POLYNOMIAL_FAMILY),
    Source("poly_rmsnorm", POLYNOMIAL_FAMILY),
    Source("poly_attention", POLYNOMIAL_FAMILY),
)
_BUILT_IN_OWN = (
    OwnActivation("square", ("Square",), ("actswap>square", "actswap>SquareActivation", "actswap>Square"),
                  _square_cost),
    OwnActivation("poly", ("Polynomial",), ("actswap>PolynomialActivation", "actswap>Polynomial"), _poly_cost),
    # (1 - a)·source(x) + a·p(x): not a polynomial until recovery finalizes it.
    OwnActivation("blend", ("Blend",), ("actswap>Blend",)),
)

_rebuild({r.name: r for r in _BUILT_IN}, {o.source: o for o in _BUILT_IN_OWN})
