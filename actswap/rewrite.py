"""The rewriting engine for Sequential/Functional models, of either Keras.

Mechanism only: the engine is handed sites already marked ``replaced`` and two
builders (what to put where a whole layer/op stood, what to put in an
``activation=`` argument). It never names a target.

How: ``keras.models.clone_model(recursive=True)`` rebuilds the graph, nested
models included, and its cache keeps shared layers shared. For each leaf that
holds a replaced site, the leaf's serialized config is edited at the site and
deserialized (safe mode); every other leaf is cloned from its config. Cloning
creates fresh weights, so afterwards every variable is assigned from its
original, and the result is checked.

What differs between Keras 3 and tf_keras is an :class:`Engine` record:
:data:`KERAS3` here, ``actswap.legacy``'s for tf_keras (whose ``clone_model``
is not recursive, so its ``clone`` rebuilds nested models itself).

Invariants (checked, an :class:`InvariantError` otherwise): the input model is
not modified; every weight of the input is in the result, bit-identical, in
the same order (a target may add weights of its own, e.g. trainable
coefficients, which are not copies); input and output names, shapes and
dtypes are unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from .errors import InvariantError, UnsupportedModelError
from .report import REPLACED, Site
from .sites import KERAS3 as KERAS3_FLAVOR
from .sites import Flavor, iter_nodes

LayerBuilder = Callable[[Site, dict[str, Any]], Any]
# (site, config of the layer that holds the activation= argument) -> activation
ActivationBuilder = Callable[[Site, dict[str, Any]], Any]


def target_owned(layer: Any) -> set[int]:
    """ids of the weights that target-created layers inside ``layer`` own (e.g.
    trainable polynomial coefficients): new weights, not copies of old ones.
    A target layer says so with a class attribute ``actswap_target = True``
    (all its weights), or a method ``actswap_own_weights()`` listing them (a
    layer that stands in for one with weights, such as a polynomial
    LayerNormalization, keeps the others' copies)."""
    owned: set[int] = set()
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        own = getattr(sub, "actswap_own_weights", None)
        if callable(own):
            owned.update(id(v) for v in own())
        elif getattr(sub, "actswap_target", False):
            owned.update(id(v) for v in sub.weights)
    return owned


def copied_weights(layer: Any) -> list[Any]:
    """The weights of ``layer`` that correspond to the original's, in order."""
    owned = target_owned(layer) if hasattr(layer, "_flatten_layers") else set()
    return [v for v in getattr(layer, "weights", []) if id(v) not in owned]


def _get(tree: Any, pointer: tuple[Any, ...]) -> Any:
    for key in pointer:
        tree = tree[key]
    return tree


def _put(tree: Any, pointer: tuple[Any, ...], value: Any) -> Any:
    if not pointer:
        return value
    _get(tree, pointer[:-1])[pointer[-1]] = value
    return tree


def _edited_leaf(
    leaf: Any,
    sites: list[Site],
    make_layer: LayerBuilder,
    make_activation: ActivationBuilder,
    engine: Engine,
) -> Any:
    """A new layer built from ``leaf``'s config with each site's activation replaced."""
    tree = copy.deepcopy(engine.flavor.serialize(leaf))
    # A subclassed leaf's own class may not be registered; it is the class of
    # an object already in memory, so naming it is not loading new code.
    own = {type(leaf).__name__: type(leaf)}
    at_config = engine.flavor.dialect.layer_pointer_at_config
    for site in sites:
        if not site.is_argument:
            # The site is a whole layer: replace its node (which the pointer
            # locates, or the node just above the config it locates).
            where = site.pointer[:-1] if at_config else site.pointer
            new = engine.serialize_layer(make_layer(site, _get(tree, where)))
        else:
            where = site.pointer
            owner = _get(tree, site.pointer[:-1])
            new = engine.serialize_activation(make_activation(site, owner))
        tree = _put(tree, where, new)
    return engine.deserialize(tree, own)


def _copy_weights(old: Any, new: Any, where: str, value: Callable[[Any], Any] | None = None) -> None:
    if new is old:  # a layer moved by ``rewrite(consume=True)``
        return
    ow, nw = copied_weights(old), copied_weights(new)
    if len(ow) != len(nw):
        raise InvariantError(
            f"'{where}': the rewritten layer has {len(nw)} weights, the original {len(ow)}"
        )
    for o, n in zip(ow, nw):
        if tuple(o.shape) != tuple(n.shape) or o.dtype != n.dtype:
            raise InvariantError(
                f"'{where}': weight {o.name} is {o.dtype}{tuple(o.shape)} in the original "
                f"but {n.dtype}{tuple(n.shape)} after rewriting"
            )
        n.assign(o.value if value is None else value(o))


def check_same_weights(old: Any, new: Any) -> None:
    """Raise InvariantError unless ``new`` has the same weights as ``old``, bit for bit
    (weights a target added, such as trainable coefficients, aside)."""
    ow, nw = copied_weights(old), copied_weights(new)
    if len(ow) != len(nw):
        raise InvariantError(f"weight count changed: {len(ow)} -> {len(nw)}")
    for o, n in zip(ow, nw):
        if o is n:  # moved, not copied (``rewrite(consume=True)``): the same variable
            continue
        a, b = np.asarray(o.numpy()), np.asarray(n.numpy())
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            where = getattr(o, "path", None) or o.name  # tf_keras variables have no path
            raise InvariantError(f"weight '{where}' is not bit-identical after rewriting")


def output_layer_names(model: Any) -> list[str]:
    """Names of the layers producing the outputs (what saved models key outputs by)."""
    return [t._keras_history[0].name for t in keras.tree.flatten(model.outputs)]


def _signature(model: Any) -> tuple[Any, ...]:
    def specs(tensors: Any) -> list[tuple[tuple[Any, ...], str]]:
        return [(tuple(t.shape), str(t.dtype)) for t in keras.tree.flatten(tensors)]

    # KerasTensors get fresh auto names on every rebuild; what users see (and
    # what a saved model keys its inputs and outputs by) are the layer names.
    return (
        [t._keras_history[0].name for t in keras.tree.flatten(model.inputs)],
        output_layer_names(model),
        specs(model.inputs),
        specs(model.outputs),
    )


def _clone_keras3(model: Any, clone_leaf: Callable[[Any], Any]) -> tuple[Any, dict[int, Any]]:
    """``keras.models.clone_model``, recursive; returns the clone and its cache
    (``id(old)`` -> new, for every nested model and leaf)."""
    cache: dict[int, Any] = {}
    # clone_model names new inputs after the old KerasTensors ('keras_tensor_4'
    # for an unnamed keras.Input); the saved input names are the InputLayers'.
    # (A Sequential rebuilds its InputLayer under its own name.)
    inputs = None if isinstance(model, keras.Sequential) else keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history[0].name), model.input
    )
    new_model = keras.models.clone_model(
        model, input_tensors=inputs, clone_function=clone_leaf, recursive=True, cache=cache
    )
    if not new_model.built:
        new_model.build(model.input_shape)
    return new_model, cache


@dataclass(frozen=True)
class Engine:
    """How the engine rebuilds one Keras's models; one instance per Keras.

    ``deserialize(tree, own)`` rebuilds a leaf from an edited config tree
    (``own``: the leaf's own class by name) and must not run stored code;
    ``clone(model, clone_leaf)`` rebuilds a graph model, nested ones included,
    calling ``clone_leaf`` once per leaf, and returns ``(new, cache)`` where
    ``cache`` maps ``id(old)`` to its new twin for every nested model and leaf;
    ``value(variable)`` is what ``assign`` copies from (None: ``.value``);
    ``signature(model)`` is what must not change (input/output names, shapes,
    dtypes). ``trainable_cascades``: setting a model's flag overwrites its
    layers' flags (tf_keras), so flags are set top down, along every path.
    """

    flavor: Flavor
    serialize_layer: Callable[[Any], Any]
    serialize_activation: Callable[[Any], Any]
    deserialize: Callable[[Any, dict[str, Any]], Any]
    clone: Callable[[Any, Callable[[Any], Any]], tuple[Any, dict[int, Any]]]
    signature: Callable[[Any], tuple[Any, ...]]
    value: Callable[[Any], Any] | None = None
    trainable_cascades: bool = False


KERAS3 = Engine(
    flavor=KERAS3_FLAVOR,
    serialize_layer=keras.saving.serialize_keras_object,
    serialize_activation=keras.activations.serialize,
    deserialize=lambda tree, own: keras.saving.deserialize_keras_object(
        tree, custom_objects=own, safe_mode=True
    ),
    clone=_clone_keras3,
    signature=_signature,
)


def _rewrite_subclassed(
    model: Any, sites: list[Site], make_layer: LayerBuilder, make_activation: ActivationBuilder
) -> Any:
    # Keras 3 only: tf_keras refuses subclassed models before it gets here.
    mine = [s for s in sites if s.action == REPLACED]
    if mine:
        new = _edited_leaf(model, mine, make_layer, make_activation, KERAS3)
    else:
        new = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(model),
            custom_objects={type(model).__name__: type(model)},
            safe_mode=True,
        )
    if not new.built:
        new.build_from_config(model.get_build_config())
    new.trainable = model.trainable
    _copy_weights(model, new, model.name)
    return new


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (reference counting goes on).

    A rewrite creates many long-lived objects (layers, nodes, tensors) and
    little cyclic garbage, so the collector's full passes, each a walk over
    every object in the process (the models included), are pure cost: at
    5,000 layers they made conversion superlinear (issue 8's profile). The
    collector resumes, and catches up, when the rewrite is done.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def rewrite(
    model: keras.Model,
    sites: list[Site],
    make_layer: LayerBuilder,
    make_activation: ActivationBuilder,
    check_subclassed: Callable[[str, Any], None] | None = None,
    *,
    consume: bool = False,
    engine: Engine = KERAS3,
) -> keras.Model:
    """Return a new model with every ``replaced`` site rebuilt; ``model`` is untouched.

    A subclassed model (top-level or nested) is rebuilt from its edited config;
    ``check_subclassed(path, new_model)`` is then called on it, so the caller
    can refuse activations that its Python code sets and the config does not.

    ``consume=True`` is for a caller that owns ``model`` and drops it after the
    call (a model it loaded from a file, which nobody else can reach): the
    layers of a Sequential/Functional model that hold no replaced site then
    *move* into the result instead of being rebuilt and having their weights
    copied, so conversion costs no second copy of the weights and no
    re-initialisation. ``model`` must not be used afterwards (its layers now
    belong to the result's graph only).

    ``engine`` says which Keras the model is of (default Keras 3); a
    subclassed model is rewritten with Keras 3 only.
    """
    if not model.built:
        raise UnsupportedModelError(
            f"model '{model.name}' is not built (its input shape is unknown); "
            "add a keras.Input or call it once on data before converting"
        )
    with _cyclic_gc_paused():
        return _rewrite(model, sites, make_layer, make_activation, check_subclassed, consume, engine)


def _rewrite(
    model: keras.Model,
    sites: list[Site],
    make_layer: LayerBuilder,
    make_activation: ActivationBuilder,
    check_subclassed: Callable[[str, Any], None] | None,
    consume: bool,
    engine: Engine,
) -> keras.Model:
    flavor = engine.flavor
    if not flavor.is_graph_model(model):
        if engine is not KERAS3:
            raise UnsupportedModelError(f"subclassed model {type(model).__name__}: not a graph model")
        new = _rewrite_subclassed(model, sites, make_layer, make_activation)
        if check_subclassed is not None:
            check_subclassed("", new)
        check_same_weights(model, new)
        return new
    olds: dict[int, tuple[str, Any]] = {id(obj): (path, obj) for path, obj in iter_nodes(model, "", flavor)}
    edits: dict[int, list[Site]] = {}
    for site in sites:
        if site.action == REPLACED:
            edits.setdefault(site.leaf_id, []).append(site)

    def clone_leaf(layer: Any) -> Any:
        if id(layer) in edits:
            return _edited_leaf(layer, edits[id(layer)], make_layer, make_activation, engine)
        if consume:
            # Moved, not copied. Forget the input graph's nodes first (clone
            # calls each layer once here, before wiring it into the new graph),
            # so the layer belongs to one graph: node indices start at 0 and
            # ``layer.output`` and ``get_config`` see the new graph only.
            layer._inbound_nodes = []
            layer._outbound_nodes = []
            return layer
        return layer.__class__.from_config(layer.get_config())

    new_model, cache = engine.clone(model, clone_leaf)

    cascades = engine.trainable_cascades
    # Parents first: setting trainable on a model cascades to its layers, and a
    # frozen sub-model must stay frozen whatever its layers' own flags were.
    for oid, (path, old) in olds.items():
        new = cache.get(oid)
        if new is None:
            raise InvariantError(f"'{path}' was not rebuilt by clone_model")
        if not cascades and hasattr(old, "trainable") and hasattr(new, "trainable"):  # ops have no flag
            new.trainable = old.trainable
        if not flavor.is_graph_model(old) and hasattr(old, "weights"):
            _copy_weights(old, new, path, engine.value)
        if flavor.is_model(old) and not flavor.is_graph_model(old) and check_subclassed:
            check_subclassed(path, new)
    new_model.trainable = model.trainable
    if cascades:
        # A model's flag overwrites every flag below it (tf_keras): top down,
        # along every path, so a layer shared by two nested models is set
        # again after each of them.
        for _, old in iter_nodes(model, "", flavor):
            cache[id(old)].trainable = old.trainable

    signature = engine.signature
    if signature(new_model) != signature(model):
        raise InvariantError(
            f"inputs/outputs changed: {signature(model)} -> {signature(new_model)}"
        )
    check_same_weights(model, new_model)
    return new_model
