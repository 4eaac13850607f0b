"""The rewriting engine for Keras 3 Sequential/Functional models.

Mechanism only: the engine is handed sites already marked ``replaced`` and two
builders (what to put where a whole layer/op stood, what to put in an
``activation=`` argument). It never names a target.

How: ``keras.models.clone_model(recursive=True)`` rebuilds the graph, nested
models included, and its cache keeps shared layers shared. For each leaf that
holds a replaced site, the leaf's serialized config is edited at the site and
deserialized (safe mode); every other leaf is cloned from its config. Cloning
creates fresh weights, so afterwards every variable is assigned from its
original, and the result is checked.

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
from typing import Any

import keras
import numpy as np

from .errors import InvariantError, UnsupportedModelError
from .report import REPLACED, Site
from .sites import is_graph_model, iter_nodes

LayerBuilder = Callable[[Site, dict[str, Any]], Any]
# (site, config of the layer that holds the activation= argument) -> activation
ActivationBuilder = Callable[[Site, dict[str, Any]], Any]


def target_owned(layer: Any) -> set[int]:
    """ids of the weights that target-created layers inside ``layer`` own (e.g.
    trainable polynomial coefficients): new weights, not copies of old ones.
    A target layer says so with a class attribute ``actswap_target = True``."""
    owned: set[int] = set()
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        if getattr(sub, "actswap_target", False):
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
    leaf: Any, sites: list[Site], make_layer: LayerBuilder, make_activation: ActivationBuilder
) -> Any:
    tree = copy.deepcopy(keras.saving.serialize_keras_object(leaf))
    # A subclassed leaf's own class may not be registered; it is the class of
    # an object already in memory, so naming it is not loading new code.
    own = {type(leaf).__name__: type(leaf)}
    for site in sites:
        old = _get(tree, site.pointer)
        if not site.is_argument:
            new = keras.saving.serialize_keras_object(make_layer(site, old))
        else:
            owner = _get(tree, site.pointer[:-1])
            new = keras.activations.serialize(make_activation(site, owner))
        tree = _put(tree, site.pointer, new)
    return keras.saving.deserialize_keras_object(tree, custom_objects=own, safe_mode=True)


def _copy_weights(old: Any, new: Any, where: str) -> None:
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
        n.assign(o.value)


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
            raise InvariantError(f"weight '{o.path}' is not bit-identical after rewriting")


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


def _rewrite_subclassed(
    model: Any, sites: list[Site], make_layer: LayerBuilder, make_activation: ActivationBuilder
) -> Any:
    mine = [s for s in sites if s.action == REPLACED]
    if mine:
        new = _edited_leaf(model, mine, make_layer, make_activation)
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
    """
    if not model.built:
        raise UnsupportedModelError(
            f"model '{model.name}' is not built (its input shape is unknown); "
            "add a keras.Input or call it once on data before converting"
        )
    with _cyclic_gc_paused():
        return _rewrite(model, sites, make_layer, make_activation, check_subclassed, consume)


def _rewrite(
    model: keras.Model,
    sites: list[Site],
    make_layer: LayerBuilder,
    make_activation: ActivationBuilder,
    check_subclassed: Callable[[str, Any], None] | None,
    consume: bool,
) -> keras.Model:
    if not is_graph_model(model):
        new = _rewrite_subclassed(model, sites, make_layer, make_activation)
        if check_subclassed is not None:
            check_subclassed("", new)
        check_same_weights(model, new)
        return new
    olds: dict[int, tuple[str, Any]] = {id(obj): (path, obj) for path, obj in iter_nodes(model)}
    edits: dict[int, list[Site]] = {}
    for site in sites:
        if site.action == REPLACED:
            edits.setdefault(site.leaf_id, []).append(site)

    def clone_leaf(layer: Any) -> Any:
        if id(layer) in edits:
            return _edited_leaf(layer, edits[id(layer)], make_layer, make_activation)
        if consume:
            # Moved, not copied. Forget the input graph's nodes first (clone
            # calls each layer once here, before wiring it into the new graph),
            # so the layer belongs to one graph: node indices start at 0 and
            # ``layer.output`` and ``get_config`` see the new graph only.
            layer._inbound_nodes = []
            layer._outbound_nodes = []
            return layer
        return layer.__class__.from_config(layer.get_config())

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

    # Parents first: setting trainable on a model cascades to its layers, and a
    # frozen sub-model must stay frozen whatever its layers' own flags were.
    for oid, (path, old) in olds.items():
        new = cache.get(oid)
        if new is None:
            raise InvariantError(f"'{path}' was not rebuilt by clone_model")
        if hasattr(old, "trainable") and hasattr(new, "trainable"):  # ops have no flag
            new.trainable = old.trainable
        if not is_graph_model(old) and hasattr(old, "weights"):
            _copy_weights(old, new, path)
        if isinstance(old, keras.Model) and not is_graph_model(old) and check_subclassed:
            check_subclassed(path, new)
    new_model.trainable = model.trainable

    if _signature(new_model) != _signature(model):
        raise InvariantError(
            f"inputs/outputs changed: {_signature(model)} -> {_signature(new_model)}"
        )
    check_same_weights(model, new_model)
    return new_model
