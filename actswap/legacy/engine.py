"""tf_keras as a flavor of the shared Keras engine (:mod:`actswap.sites`,
:mod:`actswap.rewrite`): only what tf_keras does differently from Keras 3.

* a leaf serializes as ``{"class_name", "config": layer.get_config()}``, read
  with the :data:`~actswap.classify.TF_KERAS` dialect (whose whole-layer
  pointers locate the layer's ``config``; the engine edits the node above it);
* ``tf_keras.models.clone_model`` is not recursive (a nested model would be
  re-created from its unedited config), so :func:`clone` rebuilds nested
  Sequential/Functional models itself, keeping a layer shared between them shared;
* setting a tf_keras model's ``trainable`` sets every layer's flag, so the
  engine sets the top model's flag first (``trainable_cascades``);
* only Sequential/Functional models built from their config can be rebuilt:
  :func:`check_structure` refuses the rest before anything is rewritten.

tf_keras is imported inside the functions: it is an optional dependency.
Importing this module imports Keras 3 (the engine's), which ``import
actswap.legacy`` alone does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..classify import TF_KERAS
from ..errors import UnsupportedModelError
from ..rewrite import Engine
from ..sites import Flavor


def is_model(obj: Any) -> bool:
    import tf_keras

    return isinstance(obj, tf_keras.Model)


def is_graph_model(obj: Any) -> bool:
    import tf_keras
    from tf_keras.src.engine import functional

    return isinstance(obj, (tf_keras.Sequential, functional.Functional))


def children(model: Any) -> list[Any]:
    import tf_keras

    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=False)
        if not isinstance(layer, tf_keras.layers.InputLayer)
    ]


def serialize(leaf: Any) -> dict[str, Any]:
    # tf_keras's own serialize would add module/registered_name keys the
    # dialect does not need; get_config() is what from_config takes back.
    return {"class_name": type(leaf).__name__, "config": leaf.get_config()}


def check_structure(model: Any, path: str = "") -> None:
    """Refuse (UnsupportedModelError) what the engine cannot rebuild from configs:
    subclassed models, and layers tf_keras restored from a SavedModel's graph
    because their class is not registered."""
    if not is_graph_model(model):
        where = path or "<model>"
        raise UnsupportedModelError(
            f"subclassed model {type(model).__name__} at '{where}': its call() is Python code "
            "that actswap cannot rewrite; rebuild it as a Functional or Sequential model"
        )
    for child in children(model):
        child_path = f"{path}/{child.name}" if path else child.name
        if is_model(child):
            check_structure(child, child_path)
        elif type(child).__module__.startswith("tf_keras.src.saving.legacy.saved_model"):
            raise UnsupportedModelError(
                f"layer '{child_path}' was restored from the SavedModel graph, not from its "
                "config (a custom class that is not registered): actswap cannot rewrite it"
            )


def _serialize_layer(layer: Any) -> Any:
    import tf_keras

    # The legacy form names the class by its registered name
    # ("actswap_legacy>Square"), which both of tf_keras's deserializers find;
    # a wrapper's from_config (TimeDistributed(ReLU())) uses the legacy one.
    return tf_keras.layers.serialize(layer, use_legacy_format=True)


def _serialize_activation(fn: Any) -> Any:
    import tf_keras

    return tf_keras.activations.serialize(fn)


def _deserialize(tree: Any, own: dict[str, Any]) -> Any:
    import tf_keras

    # tf_keras's deserializer runs in safe mode: no stored bytecode is loaded.
    return tf_keras.layers.deserialize(tree, custom_objects=own)


def clone(model: Any, clone_leaf: Callable[[Any], Any]) -> tuple[Any, dict[int, Any]]:
    """Rebuild ``model`` with tf_keras ``clone_model``, nested models recursively;
    returns the clone and ``id(old)`` -> new for every nested model and leaf."""
    import tf_keras

    mapping: dict[int, Any] = {}

    def clone_layer(layer: Any) -> Any:
        if id(layer) in mapping:  # shared between nested models
            return mapping[id(layer)]
        if is_graph_model(layer):
            _check_cloneable(layer)
            new = tf_keras.models.clone_model(layer, clone_function=clone_layer)
        else:
            new = clone_leaf(layer)
        mapping[id(layer)] = new
        return new

    _check_cloneable(model)
    return tf_keras.models.clone_model(model, clone_function=clone_layer), mapping


def _check_cloneable(model: Any) -> None:
    """Refuse a graph model tf_keras's ``clone_model`` would never finish: one
    without inputs or outputs (tf_keras loads such a file; its clone re-queues
    calls forever)."""
    from ..errors import UnsupportedModelError

    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise UnsupportedModelError(
            f"model '{model.name}' has no {'inputs' if not getattr(model, 'inputs', None) else 'outputs'}; "
            "nothing to convert (is the file damaged?)"
        )


def signature(model: Any) -> tuple[Any, ...]:
    def specs(tensors: Any) -> list[tuple[Any, ...]]:
        return [(tuple(t.shape), t.dtype.name) for t in tensors]

    return (
        list(getattr(model, "input_names", []) or []),
        list(getattr(model, "output_names", []) or []),
        specs(model.inputs or []),
        specs(model.outputs or []),
    )


FLAVOR = Flavor(
    name="tf_keras",
    dialect=TF_KERAS,
    is_model=is_model,
    is_graph_model=is_graph_model,
    children=children,
    serialize=serialize,
)

ENGINE = Engine(
    flavor=FLAVOR,
    serialize_layer=_serialize_layer,
    serialize_activation=_serialize_activation,
    deserialize=_deserialize,
    clone=clone,
    signature=signature,
    # Through numpy, as tf_keras's set_weights copies: the bytes, whatever the
    # variable class (tf.Variable.value is a method, not Keras 3's property).
    value=lambda variable: variable.numpy(),
    trainable_cascades=True,
)
