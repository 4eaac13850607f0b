"""The layer graph of a Keras 2 functional config, checked before tf_keras reads it.

tf_keras rebuilds a functional model by calling each layer on the outputs of
the nodes it reads, and puts a call whose inputs do not exist yet back in the
queue, with no limit: a config where a layer reads a node that will never
exist (a node index past the calls the config lists, a layer never called) or
where layers read each other in a cycle makes ``load_model`` loop forever (the
fuzzer found it, issue 29: one JSON edit of a Keras 2 ``.h5`` hung ``inspect``).
Keras 3 stops such a loop itself ("has loops or disconnected nodes").

:func:`check_graphs` refuses those configs:

* every reference ``[layer, node, tensor]`` in a functional config's
  ``inbound_nodes``, ``input_layers`` and ``output_layers`` names a layer of
  the same config and a node it has;
* the layers do not read each other in a cycle;
* no two layers share a name (tf_keras maps calls by name; a fuzzed file
  listing its InputLayer twice hung the rebuild);
* the model has inputs and outputs (tf_keras loads a model with none, and
  cloning it, which ``convert`` does, never ends).

A layer's nodes are its calls (``inbound_nodes``); an ``InputLayer``, a nested
``Functional``/``Model`` and a nested ``Sequential`` that is built when it is
deserialized (its first layer an ``InputLayer`` or declaring its input shape,
which is how tf_keras always writes one it has called) also have node 0 of
their own, so their calls start at node 1. A ``Sequential`` with no input
shape gets no node of its own: its first call is node 0 (a fuzzed file whose
nested model lost its ``InputLayer`` still read its call as node 1, and hung).

Invariants: reads the parsed config only; nothing is imported or written.
"""

from __future__ import annotations

import json

from typing import Any

from .report import DAMAGED, ERROR, ScanReport

OWN_NODE = frozenset({"InputLayer", "Functional", "Model"})
INPUT_SHAPE_KEYS = ("batch_input_shape", "batch_shape", "input_shape")


def _own_node(layer: dict[str, Any]) -> bool:
    """Whether ``layer`` has a node of its own before it is called (see the module docstring)."""
    cls = layer.get("class_name")
    if not isinstance(cls, str):
        return False
    if cls in OWN_NODE:
        return True
    if cls != "Sequential":
        return False
    config = layer.get("config")
    if not isinstance(config, dict):
        return False
    if config.get("build_input_shape") is not None:
        return True
    inner = config.get("layers")
    first = inner[0] if isinstance(inner, list) and inner else None
    if not isinstance(first, dict):
        return False
    first_config = first.get("config")
    return first.get("class_name") == "InputLayer" or (
        isinstance(first_config, dict) and any(first_config.get(k) is not None for k in INPUT_SHAPE_KEYS))


def check_graphs(config: Any, report: ScanReport, what: str) -> None:
    """Add one finding if some functional config in ``config`` (at any depth) has
    a layer graph tf_keras could not rebuild (the first problem found)."""
    for graph in _functional_configs(config):
        problem = _problem(graph)
        if problem is not None:
            report.add(ERROR, DAMAGED, what, f"{what}: the layer graph is broken: {problem} "
                       "(tf_keras would never finish rebuilding it)")
            return


def check_inputs(config: Any, report: ScanReport, what: str) -> None:
    """Add one finding if a functional config in ``config`` (at any depth, either
    dialect) lists one input twice in its ``input_layers``: Keras 3 loads such a
    model, and every rebuild of it (convert's clone) then fails on the repeated
    name (the fuzzer, issue 29)."""
    for graph in _functional_configs(config):
        refs = _refs(graph.get("input_layers"))
        repeated = sorted({name for name, _ in refs if sum(1 for r in refs if r[0] == name) > 1}, key=str)
        if repeated:
            report.add(ERROR, DAMAGED, what, f"{what}: the layer graph is broken: input '{repeated[0]}' is listed "
                       f"{sum(1 for r in refs if r[0] == repeated[0])} times in input_layers (a model cannot take "
                       "one input twice)")
            return


def _functional_configs(node: Any) -> list[dict[str, Any]]:
    out = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("layers"), list) and "output_layers" in item:
                out.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _refs(node: Any) -> list[tuple[Any, Any]]:
    """The (layer name, node index) pairs a node's data reads: Keras 2's
    ``[name, node, tensor, kwargs]`` lists and Keras 3's ``keras_history``."""
    out = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            if len(item) >= 3 and isinstance(item[0], str) and all(isinstance(v, int) for v in item[1:3]):
                out.append((item[0], item[1]))
                stack.extend(item[3:])
            else:
                stack.extend(item)
        elif isinstance(item, dict):
            history = item.get("keras_history")
            if isinstance(history, list) and len(history) >= 2 and isinstance(history[0], str) \
                    and isinstance(history[1], int):
                out.append((history[0], history[1]))
            stack.extend(v for k, v in item.items() if k != "keras_history")
    return out


def _malformed_ref(calls: Any) -> Any:
    """The first reference of Keras 2's list form that is not ``[name, node,
    tensor]`` or ``[name, node, tensor, kwargs]`` (a layer name, two indices
    >= 0, a dict), in ``calls`` (a layer's ``inbound_nodes``: a list of nodes,
    each a list of references); None if all are. Nodes of the newer dict form
    (``keras_history``) are read by :func:`_refs`."""
    if not isinstance(calls, list):
        return None
    for node in calls:
        if not isinstance(node, list):
            continue
        for ref in node:
            if not (isinstance(ref, list) and ref and isinstance(ref[0], str)) or ref[0] == "_CONSTANT_VALUE":
                continue  # a constant argument is [_CONSTANT_VALUE, -1, value, kwargs]
            ok = len(ref) in (3, 4) and all(type(v) is int and v >= 0 for v in ref[1:3]) and \
                (len(ref) == 3 or isinstance(ref[3], dict))
            if not ok:
                return ref
    return None


def _problem(graph: dict[str, Any]) -> str | None:
    layers = [layer for layer in graph["layers"] if isinstance(layer, dict)]
    nodes: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer.get("name"), str):
            return f"a layer's name is {type(layer.get('name')).__name__}, not text"
        if layer["name"] in nodes:  # tf_keras maps calls by name: a second one loops its rebuild
            return f"two layers are named '{layer['name']}'"
        calls = layer.get("inbound_nodes")
        count = len(calls) if isinstance(calls, list) else 0
        nodes[layer["name"]] = count + (1 if _own_node(layer) else 0)
    for key in ("input_layers", "output_layers"):
        if not _refs(graph.get(key)):  # tf_keras loads such a model, and then cloning it never ends
            return f"the model has no {key.split('_')[0]}s ({key} is empty)"
    for layer in layers:
        bad = _malformed_ref(layer.get("inbound_nodes"))
        if bad is not None:  # tf_keras's rebuild never finished on ["inner", 0, {}] (the fuzzer, issue 29)
            return f"'{layer['name']}' reads its input through a malformed reference {json.dumps(bad)[:80]}"
    for key in ("input_layers", "output_layers"):
        bad = _malformed_ref([graph.get(key)])
        if bad is not None:
            return f"{key} holds a malformed reference {json.dumps(bad)[:80]}"
    reads: dict[str, set[str]] = {name: set() for name in nodes}
    places = [(layer.get("name"), layer.get("inbound_nodes")) for layer in layers]
    places += [(None, graph.get("input_layers")), (None, graph.get("output_layers"))]
    for reader, data in places:
        for name, index in _refs(data):
            if name not in nodes:
                return f"'{reader or 'the model'}' reads layer '{name}', which the config does not define"
            if not 0 <= index < nodes[name]:
                return (f"'{reader or 'the model'}' reads node {index} of '{name}', "
                        f"which has {nodes[name]} node(s)")
            if reader is not None:
                reads[reader].add(name)
    cycle = _cycle(reads)
    return f"layers read each other in a cycle ({' -> '.join(map(str, cycle))})" if cycle else None


def _cycle(reads: dict[Any, set[Any]]) -> list[Any] | None:
    """A cycle in ``reads`` (layer -> layers it reads), or None."""
    state: dict[Any, int] = {}  # 1: on the current path, 2: done
    for start in reads:
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(reads[start], key=str))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(reads.get(nxt, ()), key=str)))
    return None
