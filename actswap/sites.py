"""Finding activation sites in live Keras models (Keras 3, and tf_keras through its flavor).

A model is walked down to its *leaves* (layers and operations that are not
Sequential/Functional models); each leaf is serialized with Keras's own
``serialize_keras_object`` and its config tree is read for activations. Reading
the config, rather than poking attributes, finds activations at any depth
inside wrappers (``TimeDistributed``, ``Bidirectional``, RNN cells) with one
mechanism, and it is exactly what the rewrite changes, so what is reported is
what is rewritten.

The walk is the same for both Kerases; what differs (which objects are
graph models, how a model lists its children, how a leaf serializes, which
:class:`~actswap.classify.Dialect` reads the config) is a :class:`Flavor`:
:data:`KERAS3` here, ``actswap.legacy``'s for tf_keras.

Invariant: finding sites never modifies the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras

from . import classify, rules
from .errors import UnsupportedModelError
from .report import Site

_Functional = keras.src.models.functional.Functional


def is_graph_model(obj: Any) -> bool:
    """Sequential and Functional models: their structure is data, so it can be rebuilt."""
    return isinstance(obj, (keras.Sequential, _Functional))


def children(model: Any) -> list[Any]:
    ops = model.layers if isinstance(model, keras.Sequential) else model.operations
    return [op for op in ops if not isinstance(op, keras.layers.InputLayer)]


@dataclass(frozen=True)
class Flavor:
    """How one Keras's live models are walked; one instance per Keras.

    ``serialize(leaf)`` returns a config tree that ``classify.node_sites`` reads
    with ``dialect``; each site's pointer locates it in that tree, and the
    rewrite engine edits the same tree, so what is reported is what is rewritten.
    """

    name: str
    dialect: classify.Dialect
    is_model: Callable[[Any], bool]
    is_graph_model: Callable[[Any], bool]
    # The layers/ops of a graph model, InputLayers excluded, in graph order.
    children: Callable[[Any], list[Any]]
    serialize: Callable[[Any], Any]


KERAS3 = Flavor(
    name="keras3",
    dialect=classify.KERAS3,
    is_model=lambda obj: isinstance(obj, keras.Model),
    is_graph_model=is_graph_model,
    children=children,
    serialize=keras.saving.serialize_keras_object,
)


def iter_nodes(model: Any, prefix: str = "", flavor: Flavor = KERAS3) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, obj)`` for every nested graph model and leaf, parents first."""
    for child in flavor.children(model):
        path = prefix + child.name
        yield path, child
        if flavor.is_graph_model(child):
            yield from iter_nodes(child, path + "/", flavor)


def subclassed_models(model: Any) -> list[str]:
    """Paths of models whose structure is Python code (subclassed ``keras.Model``)."""
    found = [] if is_graph_model(model) else ["<model>"]
    if not found:
        for path, obj in iter_nodes(model):
            if isinstance(obj, keras.Model) and not is_graph_model(obj):
                found.append(path)
    return found


def classify_value(value: Any) -> str | None:
    """The source activation named by an ``activation=`` config value (None: none)."""
    return classify.classify_value(value, classify.KERAS3)


def sites_in_config(node: Any, prefix: str, pointer: tuple[Any, ...] = ()) -> Iterator[Site]:
    """Sites in a serialized layer tree; ``pointer`` locates each in ``node``."""
    return classify.node_sites(node, prefix, classify.KERAS3, pointer)


def leaf_sites(leaf: Any, prefix: str, flavor: Flavor = KERAS3) -> list[Site]:
    """Sites of one leaf, read from ``flavor.serialize(leaf)``; each knows its leaf."""
    tree = flavor.serialize(leaf)
    sites = list(classify.node_sites(tree, prefix, flavor.dialect))
    for s in sites:
        s.leaf_id = id(leaf)
    return sites


def find_sites(model: Any, flavor: Flavor = KERAS3) -> list[Site]:
    """Every activation site of a model, in graph order.

    Paths are named from the model down, without the model's own name
    (``inner/dense_2``). A layer shared by several (nested) models is one
    site; its other paths are in ``also_at``.

    For a subclassed model (top-level or nested) the sites are those of its
    *config* (constructor arguments such as ``activation='relu'``): that is
    what rebuilds it, so that is what can be rewritten soundly. Activations its
    Python code sets or calls are found by :func:`code_sites`.
    """
    if not flavor.is_model(model):
        raise UnsupportedModelError(
            f"expected a keras.Model, got {type(model).__name__}"
        )
    sites: list[Site] = []
    by_leaf: dict[int, list[Site]] = {}
    first_path: dict[int, str] = {}
    outputs = output_names(model) if flavor.is_graph_model(model) else set()
    if flavor.is_graph_model(model):
        nodes = list(iter_nodes(model, "", flavor))
    else:
        nodes = [("", model)]
    for path, obj in nodes:
        if flavor.is_graph_model(obj):
            continue
        if id(obj) in by_leaf:  # a shared layer: one site, several paths
            first = first_path[id(obj)]
            for s in by_leaf[id(obj)]:
                s.also_at.append(path + s.path[len(first) :])
            continue
        prefix = path[: len(path) - len(obj.name)]
        found = leaf_sites(obj, prefix, flavor)
        by_leaf[id(obj)] = found
        first_path[id(obj)] = path
        sites.extend(found)
    for s in sites:
        s.at_output = s.path in outputs
    return sites


def output_names(model: Any) -> set[str]:
    """Names of the top-level layers/ops producing a graph model's outputs (empty
    for a subclassed model, whose outputs are Python code)."""
    try:
        return {t._keras_history[0].name for t in keras.tree.flatten(model.outputs)}
    except (AttributeError, TypeError, ValueError):
        return set()


def _is_graph_config(node: Any) -> bool:
    """A serialized Sequential/Functional model: what :func:`is_graph_model` is, as data."""
    return (
        classify.is_layer_node(node)
        and node["class_name"] in ("Sequential", "Functional")
        and isinstance(node["config"].get("layers"), list)
    )


def _graph_config_sites(node: dict[str, Any], prefix: str) -> Iterator[Site]:
    for layer in node["config"]["layers"]:
        if not classify.is_layer_node(layer) or layer["class_name"] == "InputLayer":
            continue
        if _is_graph_config(layer):
            yield from _graph_config_sites(layer, prefix + layer["config"]["name"] + "/")
        else:
            yield from sites_in_config(layer, prefix)


def config_sites(config: dict[str, Any]) -> list[Site]:
    """The sites of a serialized model (a ``.keras`` file's ``config.json``), read
    as data: nothing is deserialized. For a model that a file round-trips, the
    paths, forms and activations are those :func:`find_sites` reports for it,
    except that a layer shared by several nested models appears once per path."""
    if _is_graph_config(config):
        return list(_graph_config_sites(config, ""))
    return list(sites_in_config(config, ""))


def attribute_sites(model: Any, path: str) -> list[Site]:
    """Sites of the layers a subclassed model holds as attributes (live objects)."""
    found: list[Site] = []
    prefix = f"{path}/" if path else ""
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if isinstance(layer, keras.Model) and not is_graph_model(layer):
            found.extend(attribute_sites(layer, prefix + layer.name))
            continue
        for s in leaf_sites(layer, prefix):
            s.form = f"{s.form} (set in {type(model).__name__} code)"
            found.append(s)
    return found


def unlisted_sites(model: Any, chosen: Any) -> list[Site]:
    """Sites of the selected sources whose rules are not listed otherwise
    (:attr:`actswap.rules.Rule.listed`): layers of a graph model matched by
    class name, parents first."""
    selected = rules.unlisted_sources(chosen)
    if not selected or not is_graph_model(model):
        return []
    by_class = {cls: r for r in selected for cls in r.layer_classes}
    found = []
    for path, obj in iter_nodes(model):
        rule = by_class.get(type(obj).__name__)
        if rule is not None:
            found.append(Site(path, type(obj).__name__, rule.form, rule.source, leaf_id=id(obj), pointer=()))
    return found
