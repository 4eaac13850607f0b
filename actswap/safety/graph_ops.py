"""TensorFlow graphs checked op by op against the allow-list of ops that only compute on tensors.

:func:`check_graph` checks every node of a GraphDef and of its function
library against ``allowlists.TF_OPS``. Checkpoint ops are the one exception:
a SavedModel's saver needs them, so they are accepted where only the saver
reaches them (see :func:`check_graph` for the reachability rules). An op
that is refused is reported once, with a reason and how many places use it.

Invariants: works on parsed protobuf messages only (no TensorFlow import, no
op is run or looked up in a registry); nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from . import allowlists
from .report import CODE, DAMAGED, ERROR, NUMERICS, WARNING, ScanReport

CHECKPOINT_READ_OPS = frozenset({"RestoreV2", "Restore", "RestoreSlice"})
CHECKPOINT_WRITE_OPS = frozenset({"SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints"})
_OP_REASONS = {
    "ReadFile": "reads a file", "WriteFile": "writes a file", "MatchingFiles": "lists files on disk",
    "PyFunc": "runs Python code", "PyFuncStateless": "runs Python code", "EagerPyFunc": "runs Python code",
    "Print": "prints", "PrintV2": "prints", "ImmutableConst": "maps a file into memory",
    "Abort": "aborts the process", "InitializeTableFromTextFile": "reads a file",
    "InitializeTableFromTextFileV2": "reads a file", "RemoteCall": "runs a function on another task",
    "DecodeProtoV2": "can read a descriptor file", "EncodeProto": "can read a descriptor file",
    "LoadAndRemapMatrix": "reads a checkpoint file", "RecordInput": "reads files",
}
_OP_REASON_PATTERNS = (
    (r"Dataset|Iterator", "reads data (a tf.data op)"),
    (r"Summary|SummaryWriter", "writes summaries"),
    (r"Reader", "reads files"),
    (r"^(Save|Restore|MergeV2Checkpoints)", "reads or writes checkpoint files outside the saver"),
    (r"^(Send|Recv|_Send|_Recv)|Collective|Nccl|Rpc", "talks to other processes"),
    (r"^Debug", "writes debug dumps"),
)


def check_graph(
    graph: Any, report: ScanReport, label: str, *, saver: Any, signatures: list[Any],
    collections: list[str], restored: set[str], asset_reads: frozenset[str] = frozenset(),
) -> None:
    """Check every op of ``graph`` and its function library against the allow-list.

    Checkpoint ops are what a SavedModel's saver uses to read and write its
    variables; they are accepted only in the saver's own nodes and functions
    (which ``tf.saved_model.load`` runs only to restore variables from the file
    name it chooses), never where a signature, an initializer or a restored
    function could reach them, and only reading ones on the restore path.
    ``asset_reads`` are the places of table initializers the caller showed to
    read only a file the SavedModel ships (:func:`asset_reads`); they pass.
    """
    lib = {f.signature.name: f for f in graph.library.function}
    in_label = f" in {label}" if label else ""

    def refs(node: Any) -> set[str]:
        out = {node.op} if node.op in lib else set()
        for entry in node.attr:
            value = entry.value
            if value.func.name:
                out.add(value.func.name)
            out.update(f.name for f in value.list.func if f.name)
        return out

    calls = {name: set().union(*(refs(n) for n in f.node_def)) for name, f in lib.items()}
    nodes = {n.name: n for n in graph.node}
    saver_roots = {_node_name(t) for t in (saver.save_tensor_name, saver.restore_op_name)} - {""} if saver else set()
    other_roots = {_node_name(t.value.name) for s in signatures for t in list(s.inputs) + list(s.outputs)}
    other_roots |= {_node_name(c) for c in collections}
    saver_only = _ancestors(nodes, saver_roots) - _ancestors(nodes, other_roots)
    restore_nodes = _ancestors(nodes, {_node_name(saver.restore_op_name)}) if saver else set()
    node_refs = {name: refs(n) for name, n in nodes.items()}
    gradient_fns = {g.gradient_func for g in graph.library.gradient} | {
        g.gradient_func for g in graph.library.registered_gradients
    }
    fn_other = _closure(
        calls,
        restored | gradient_fns | {f for name, r in node_refs.items() if name not in saver_only for f in r},
    )
    # Functions nothing calls are treated as reachable: nothing vouches for them.
    fn_other |= {name for name in lib if not any(name in c for c in calls.values())
                 and not any(name in r for r in node_refs.values())}
    fn_restore = _closure(calls, {f for name in restore_nodes for f in node_refs[name]})

    problems: dict[str, list[str]] = {}

    def check(op: str, place: str, saver_place: bool, restore_place: bool, called: set[str]) -> None:
        if op in lib:
            pass
        elif op in CHECKPOINT_READ_OPS or op in CHECKPOINT_WRITE_OPS:
            if not saver_place or (restore_place and op in CHECKPOINT_WRITE_OPS):
                problems.setdefault(op, []).append(place)
        elif op not in allowlists.TF_OPS and place not in asset_reads:
            problems.setdefault(op, []).append(place)
        for fn in called:
            if fn not in lib and fn not in allowlists.TF_OPS:
                report.add(ERROR, DAMAGED, place, f"{place}{in_label} calls function '{fn}', which the file does not define")

    count = 0
    for name, node in nodes.items():
        count += 1
        check(node.op, f"graph node '{name}'", name in saver_only, name in restore_nodes, node_refs[name] - {node.op})
    for fname, f in lib.items():
        for node in f.node_def:
            count += 1
            check(node.op, f"function '{fname}', node '{node.name}'", fname not in fn_other,
                  fname in fn_restore, refs(node) - {node.op})
    for op, places in sorted(problems.items()):
        more = f" and {len(places) - 1} more place(s)" if len(places) > 1 else ""
        report.add(ERROR, CODE, places[0], f"op {op} ({_op_reason(op)}) at {places[0]}{in_label}{more}")
    report.checked.append(
        f"graph{in_label}: {count} ops in {len(nodes)} nodes and {len(lib)} functions checked against "
        "the TensorFlow op allow-list"
    )
    _note_graph_precision(graph, report, in_label)


# Ops that fill a lookup table from a text file (a vocabulary): allowed where
# the file is an asset of the SavedModel itself.
TABLE_FROM_FILE_OPS = frozenset({"InitializeTableFromTextFile", "InitializeTableFromTextFileV2"})


def asset_reads(meta_graph: Any, assets_dir: Any) -> frozenset[str]:
    """Places (as :func:`check_graph` names them) of the table initializers in
    ``meta_graph`` whose file name is, through Identity ops, a function
    argument bound to an asset of the SavedModel whose file is a plain name in
    ``assets_dir``: they read the model's own vocabulary, nothing else."""
    lib = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    objects = meta_graph.object_graph_def
    concretes = {e.key: e.value for e in objects.concrete_functions}  # a map, read as its entries
    assets = meta_graph.asset_file_def
    places = set()
    for fname, f in lib.items():
        bound = list(concretes[fname].bound_inputs) if fname in concretes else []
        args = [a.name for a in f.signature.input_arg]
        offset = len(args) - len(bound)
        nodes = {n.name: n for n in f.node_def}
        for node in f.node_def:
            if node.op not in TABLE_FROM_FILE_OPS or len(node.input) < 2:
                continue
            source = _through_identity(node.input[1], nodes)
            if source not in args or args.index(source) < offset:
                continue
            index = bound[args.index(source) - offset]
            obj = objects.nodes[index] if 0 <= index < len(objects.nodes) else None
            if obj is None or not obj.HasField("asset") or obj.asset.asset_file_def_index >= len(assets):
                continue
            if _own_file(assets_dir, assets[obj.asset.asset_file_def_index].filename):
                places.add(f"function '{fname}', node '{node.name}'")
    return frozenset(places)


def _through_identity(tensor: str, nodes: dict[str, Any]) -> str:
    name = tensor.lstrip("^").split(":")[0]
    seen = set()
    while name in nodes and nodes[name].op == "Identity" and nodes[name].input and name not in seen:
        seen.add(name)
        name = nodes[name].input[0].lstrip("^").split(":")[0]
    return name


def _own_file(assets_dir: Any, filename: str) -> bool:
    """A plain file name (no directory part) of a regular file in ``assets_dir``."""
    import os

    if not filename or filename != os.path.basename(filename) or filename in (".", ".."):
        return False
    full = os.path.join(assets_dir, filename)
    real_dir = os.path.realpath(assets_dir)
    return os.path.isfile(full) and os.path.realpath(full).startswith(real_dir + os.sep)


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _ancestors(nodes: dict[str, Any], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(n for n in (_node_name(i) for i in nodes[name].input) if n in nodes and n not in seen)
    return seen


def _closure(calls: dict[str, set[str]], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in calls:
            continue
        seen.add(name)
        stack.extend(calls[name] - seen)
    return seen


def _op_reason(op: str) -> str:
    if op in _OP_REASONS:
        return _OP_REASONS[op]
    for pattern, reason in _OP_REASON_PATTERNS:
        if re.search(pattern, op):
            return reason
    return "not an op actswap knows to only compute on tensors (a custom op, or one that reaches outside the model)"


def _note_graph_precision(graph: Any, report: ScanReport, in_label: str) -> None:
    from ..catalog import is_converted_tf_op
    from ..tfproto import DT_BFLOAT16, DT_HALF

    names = {DT_HALF: "float16", DT_BFLOAT16: "bfloat16"}
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    for node in nodes:
        if not is_converted_tf_op(node.op):  # the ops a conversion turns into x² (the catalog's)
            continue
        for entry in node.attr:
            if entry.key == "T" and entry.value.type in names:
                name = names[entry.value.type]
                report.add(
                    WARNING, NUMERICS, node.name,
                    f"{node.op} '{node.name}'{in_label} computes in {name}: x² overflows float16 once "
                    "|x| > 255 (65504 is its largest value)",
                )
                return
