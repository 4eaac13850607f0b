"""Reading activation sites out of serialized Keras layer configs, for either Keras.

Keras 3 (:mod:`actswap.sites`) and Keras 2 / ``tf_keras`` (:mod:`actswap.legacy`)
write layer configs that are almost the same; this module reads both with one
walker and one classifier. What differs is a :class:`Dialect`: a few
parameters and small hooks, one instance per Keras (:data:`KERAS3`,
:data:`TF_KERAS`).

Pure: works on config dicts only. Importing it imports neither TensorFlow nor
Keras nor ``tf_keras``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import registry
from .report import Site

# (activation, detail, form): what a layer or op that is itself an activation is.
Found = tuple[str, str, str]

ACTIVATION_LAYER_FORM = "Activation layer"
RELU_LAYER_FORM = "ReLU layer"
OWN_LAYER_FORM = "actswap layer"
KERAS_OP_FORM = "keras.ops call"
KERAS_ACTIVATION_FORM = "keras.activations call"
TF_OP_FORM = "tf op call"

# The package actswap's tf_keras objects are registered under
# (``actswap_legacy>Square``, ``actswap_legacy>SquareActivation``).
LEGACY_PACKAGE = "actswap_legacy"


def _no_node(module: str, cls: str, config: dict[str, Any]) -> Found | None:
    return None


@dataclass(frozen=True)
class Dialect:
    """What one Keras writes differently; read by :func:`classify_value`,
    :func:`classify_node` and the walkers :func:`layer_sites`/:func:`node_sites`."""

    name: str
    # An ``activation=`` value that is one of actswap's own objects -> its
    # source name (None: not actswap's). Receives the serialized dict.
    own_object: Callable[[dict[str, Any]], str | None]
    # Module roots whose ``{"class_name": "function", "config": name}`` values
    # name a built-in activation.
    function_roots: tuple[str, ...]
    # Another function is reported as ``custom:<registered name>``, falling
    # back to its ``config`` name (True) or to its class_name, "function" (False).
    custom_function_by_config: bool
    # Whether a node of this module may be one of Keras's activation layers
    # (Activation, ReLU, ``activation_layers``).
    is_layer_module: Callable[[str], bool]
    # Layer classes that are an activation in themselves -> source name.
    activation_layers: Mapping[str, str]
    # Of those, the classes whose one config key is shown as the detail.
    layer_detail_keys: Mapping[str, str] = field(default_factory=dict)
    # Whether a node of this module may be actswap's own ``Square`` layer.
    is_own_module: Callable[[str], bool] = lambda module: True
    # Any other node that is an activation (op calls): (module, cls, config) -> Found.
    other_node: Callable[[str, str, dict[str, Any]], Found | None] = _no_node
    # ``max_value`` is shown as ``f"{float(v):g}"`` (True) or ``f"{v:g}"`` (False).
    max_value_as_float: bool = False
    # The pointer of a layer that is itself an activation locates its
    # ``config`` dict (True) or its ``{"class_name", "config"}`` node (False);
    # the rewrite engine (:mod:`actswap.rewrite`) replaces the node either way.
    layer_pointer_at_config: bool = False


def classify_value(value: Any, dialect: Dialect) -> str | None:
    """The source activation named by an ``activation=`` config value (None: none)."""
    if value is None:
        return None
    if isinstance(value, str):
        name = registry.canonical(value)
        return None if name == "linear" else name
    if isinstance(value, dict):
        own = dialect.own_object(value)
        if own is not None:
            return own
        reg = value.get("registered_name")
        module = str(value.get("module") or "")
        if value.get("class_name") == "function" and isinstance(value.get("config"), str):
            if module.split(".")[0] in dialect.function_roots:
                return classify_value(value["config"], dialect)
            if dialect.custom_function_by_config:
                return f"custom:{reg or value['config']}"
        return f"custom:{reg or value.get('class_name')}"
    return "custom"


def _g(value: Any, as_float: bool) -> str:
    return f"{float(value):g}" if as_float else f"{value:g}"


def relu_variant(config: dict[str, Any], max_value_as_float: bool = False) -> tuple[str, str]:
    """(activation, detail) of a ReLU layer or op from its config."""
    max_value = config.get("max_value")
    slope = float(config.get("negative_slope") or 0.0)
    threshold = float(config.get("threshold") or 0.0)
    parts = []
    if max_value is not None:
        parts.append(f"max_value={_g(max_value, max_value_as_float)}")
    if slope:
        parts.append(f"negative_slope={slope:g}")
    if threshold:
        parts.append(f"threshold={threshold:g}")
    detail = ", ".join(parts)
    if not parts:
        return "relu", ""
    if max_value is not None and len(parts) == 1 and float(max_value) == 6.0:
        return "relu6", detail
    if parts == [f"negative_slope={slope:g}"]:
        return "leaky_relu", detail
    return "relu_variant", detail


def classify_node(
    module: str, cls: str, config: dict[str, Any], dialect: Dialect
) -> Found | None:
    """(activation, detail, form) if this serialized layer/op is itself an activation."""
    if dialect.is_layer_module(module):
        if cls == "Activation":
            act = classify_value(config.get("activation"), dialect)
            return (act, "", ACTIVATION_LAYER_FORM) if act else None
        if cls == "ReLU":
            return (*relu_variant(config, dialect.max_value_as_float), RELU_LAYER_FORM)
        if cls in dialect.activation_layers:
            name = dialect.activation_layers[cls]
            key = dialect.layer_detail_keys.get(cls)
            detail = f"{key}={float(config[key]):g}" if key and key in config else ""
            return name, registry.detail_of(name, config) or detail, f"{cls} layer"
    found = dialect.other_node(module, cls, config)
    if found:
        return found
    if cls in registry.OWN_LAYERS and dialect.is_own_module(module):
        return registry.OWN_LAYERS[cls], "", OWN_LAYER_FORM
    return None


def is_layer_node(node: Any) -> bool:
    """A serialized layer: ``{"class_name": str, "config": {"name": str, ...}}``."""
    return (
        isinstance(node, dict)
        and isinstance(node.get("class_name"), str)
        and isinstance(node.get("config"), dict)
        and isinstance(node["config"].get("name"), str)
    )


def layer_sites(
    cls: str,
    config: dict[str, Any],
    path: str,
    dialect: Dialect,
    module: str = "",
    pointer: tuple[Any, ...] = (),
    layer_pointer: tuple[Any, ...] | None = None,
) -> Iterator[Site]:
    """Sites of one layer given its class and config.

    ``pointer`` locates ``config``; ``layer_pointer`` (default: ``pointer``)
    is the pointer of the site when the whole layer is the activation.
    """
    found = classify_node(module, cls, config, dialect)
    if found:
        act, detail, form = found
        yield Site(
            path, cls, form, act, detail,
            pointer=pointer if layer_pointer is None else layer_pointer,
        )
        return
    for key, value in config.items():
        if isinstance(key, str) and key.endswith("activation"):
            act = classify_value(value, dialect)
            if act:
                yield Site(path, cls, f"{key}=", act, pointer=pointer + (key,))
        elif isinstance(value, (dict, list)):
            yield from node_sites(value, path + "/", dialect, pointer + (key,))


def node_sites(
    node: Any, prefix: str, dialect: Dialect, pointer: tuple[Any, ...] = ()
) -> Iterator[Site]:
    """Sites in a serialized layer tree (layers inside wrappers, RNN cells ...).

    ``pointer`` locates ``node``; each site's pointer locates it in the same tree.
    """
    if is_layer_node(node):
        cfg = node["config"]
        at_config = pointer + ("config",)
        yield from layer_sites(
            node["class_name"], cfg, prefix + cfg["name"], dialect,
            module=str(node.get("module") or ""),
            pointer=at_config,
            layer_pointer=at_config if dialect.layer_pointer_at_config else pointer,
        )
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                yield from node_sites(value, prefix, dialect, pointer + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from node_sites(value, prefix, dialect, pointer + (i,))


# --- Keras 3 --------------------------------------------------------------------


def _keras3_own_object(value: dict[str, Any]) -> str | None:
    reg = value.get("registered_name")
    if isinstance(reg, str) and reg in registry.OWN_OBJECTS:
        return registry.OWN_OBJECTS[reg]
    return None


def _keras3_layer_module(module: str) -> bool:
    return module in ("keras.layers",) or module.startswith("keras.src.layers")


def _keras3_op(module: str, cls: str, config: dict[str, Any]) -> Found | None:
    if module.startswith("keras.src.ops") and cls in registry.OP_ACTIVATIONS:
        return registry.OP_ACTIVATIONS[cls], "", KERAS_OP_FORM
    if module == "keras.src.activations.activations" and cls == "ReLU":
        return (*relu_variant(config), KERAS_ACTIVATION_FORM)
    return None


KERAS3 = Dialect(
    name="keras3",
    own_object=_keras3_own_object,
    function_roots=("keras",),
    custom_function_by_config=True,
    is_layer_module=_keras3_layer_module,
    activation_layers=registry.ACTIVATION_LAYERS,
    layer_detail_keys={"LeakyReLU": "negative_slope"},
    is_own_module=lambda module: module.split(".")[0] == "actswap",
    other_node=_keras3_op,
)


# --- Keras 2 (tf_keras) -----------------------------------------------------------

# tf_keras layer classes that are an activation in themselves (besides
# Activation and ReLU, which carry their activation in their config), and the
# TensorFlow symbols a Keras 2 TFOpLambda names: ``tf.nn.relu(x)`` on a Keras 2
# symbolic tensor becomes a TFOpLambda layer whose config names the symbol (so
# do tf_keras.activations.relu(x) and tf_keras.backend.relu(x), which dispatch
# to it). Both are views of the catalog (:mod:`actswap.catalog`).
TF_KERAS_ACTIVATION_LAYERS: dict[str, str] = registry.TF_KERAS_ACTIVATION_LAYERS
TF_OP_ACTIVATIONS: dict[str, str] = registry.TF_KERAS_SYMBOLS


def _tf_keras_own_object(value: dict[str, Any]) -> str | None:
    reg = value.get("registered_name") or value.get("class_name")
    return "square" if isinstance(reg, str) and reg.startswith(f"{LEGACY_PACKAGE}>") else None


def _tf_op(module: str, cls: str, config: dict[str, Any]) -> Found | None:
    if cls == "TFOpLambda":
        symbol = str(config.get("function"))
        if symbol in TF_OP_ACTIVATIONS:
            return TF_OP_ACTIVATIONS[symbol], "", TF_OP_FORM
    return None


# tf_keras's get_config() carries no module: every node is judged by its class.
TF_KERAS = Dialect(
    name="tf_keras",
    own_object=_tf_keras_own_object,
    function_roots=("keras", "tf_keras"),
    custom_function_by_config=False,
    is_layer_module=lambda module: True,
    activation_layers=TF_KERAS_ACTIVATION_LAYERS,
    layer_detail_keys={"LeakyReLU": "alpha", "ThresholdedReLU": "theta"},
    other_node=_tf_op,
    max_value_as_float=True,
    layer_pointer_at_config=True,
)
