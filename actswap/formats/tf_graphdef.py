"""Frozen TF1 GraphDefs: each selected activation node gets the target's op type.

The TensorFlow side of the :mod:`.graphdef` backend (which imports it only
when used: it imports TensorFlow). Node names, inputs and attributes are
kept, so every tensor name a user feeds or fetches still exists; the result
is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tensorflow as tf

from .. import registry
from ..containers import Format
from ..errors import LoadError, UserError, first_line
from ..paths import check_output_pb, write_atomically
from ..policy import decide
from ..report import REPLACED, SKIPPED, Report, Site
from ..safety import check_container
from .tf_graphs import precision_notes


def read_graphdef(path: Path, trust_code: bool = False) -> Any:
    """Scan (:func:`actswap.safety.check_container`), then parse a frozen GraphDef."""
    check_container(path, Format.GRAPHDEF, trust_code)
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - a protobuf decode error is the file's
        raise LoadError(f"'{path}' is not a valid frozen GraphDef ({first_line(e)})") from None
    if not graph_def.node:
        raise LoadError(f"'{path}' is a GraphDef with no nodes")
    return graph_def


def _graphdef_nodes(graph_def: Any) -> Iterable[tuple[str, Any]]:
    for node in graph_def.node:
        yield node.name, node
    for fn in graph_def.library.function:
        for node in fn.node_def:
            yield f"{fn.signature.name}/{node.name}", node


def inspect_graphdef(
    path: Path, sources: Iterable[str] = ("relu",), to: Any = "square", trust_code: bool = False
) -> Report:
    target = registry.get_target(to)
    sites = []
    for where, node in _graphdef_nodes(read_graphdef(path, trust_code)):
        act = registry.TF_OP_ACTIVATIONS.get(node.op)
        if act is not None:
            site = Site(where, node.op, "graph node", act)
            site.replaceable = decide(site, target, frozenset(sources)) is None
            sites.append(site)
    return Report(sites=sites, source=str(path), notes=["frozen graph: not trainable (no variables)"])


def convert_graphdef(
    path: Path, to: Any = "square", *, sources: Iterable[str] = ("relu",), trust_code: bool = False
) -> tuple[Any, Report]:
    """A copy of the frozen GraphDef with each selected activation node's op swapped.

    Node names, inputs and attributes are kept, so every tensor name a user feeds
    or fetches still exists. A frozen graph has no variables: the result is for
    inference (and export), not training, and the report says so.
    """
    target = registry.get_target(to)
    if target.graph_op is None:
        raise UserError(
            f"--to {target.name} needs several ops per site; a frozen graph converts only to "
            "single-op targets (square)"
        )
    chosen = frozenset(sources)
    graph_def = read_graphdef(path, trust_code)
    new = tf.compat.v1.GraphDef()
    new.CopyFrom(graph_def)
    sites, low = [], set()
    for where, node in _graphdef_nodes(new):
        act = registry.TF_OP_ACTIVATIONS.get(node.op)
        if act is None:
            continue
        site = Site(where, node.op, "graph node", act)
        reason = decide(site, target, chosen)
        site.replaceable = reason is None
        site.action = REPLACED if reason is None else SKIPPED
        site.reason = reason or f"{act} -> {target.name}"
        if reason is None:
            node.op = target.graph_op  # same T attribute, same single output
            low.add(_dtype_detail(node))
        sites.append(site)
    notes = ["frozen graph: not trainable (no variables); the gradient mode does not apply"]
    notes += precision_notes(low, target.name)
    return new, Report(sites=sites, target=target.name, grad="n/a", source=str(path), notes=notes)


def _dtype_detail(node: Any) -> str:
    t = node.attr["T"].type if "T" in node.attr else None
    return {tf.float16.as_datatype_enum: "float16", tf.bfloat16.as_datatype_enum: "bfloat16"}.get(t, "")


def save_graphdef(
    graph_def: Any, path: str | os.PathLike[str], *, overwrite: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    dest = check_output_pb(path, overwrite=overwrite)
    return write_atomically(dest, graph_def.SerializeToString(), check)


__all__ = ["convert_graphdef", "inspect_graphdef", "read_graphdef", "save_graphdef"]
