"""Keras model configs (JSON) walked as data against the Keras allow-lists.

A config names classes and functions that Keras would import and instantiate
on load; :func:`walk_config` checks every serialized object at every depth
against :mod:`actswap.safety.allowlists` and reports what would run or import
code. Keras 3 configs (``config.json`` in a ``.keras`` archive) are walked
with the Keras 3 lists; Keras 2 ones (``model_config`` in an ``.h5``,
``keras_metadata.pb`` in a SavedModel) with ``legacy=True``, which adds the
tf_keras classes and Keras 2's own ways of serializing functions.

Invariants: JSON is parsed by :func:`json.loads` only after its size and
nesting are checked against the limits; nothing named in a config is
imported, and nothing is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoadError, first_line
from . import allowlists
from .graphs import check_graphs, check_inputs
from .report import (
    CODE, DAMAGED, ERROR, MAX_CONFIG_BYTES, MAX_JSON_DEPTH, NUMERICS, STRUCTURE, WARNING, ScanReport,
)

# Classes whose config carries code, or that load something that does.
CODE_CLASSES = {
    "Lambda": "carries code that would run on load",
    "__lambda__": "carries code that would run on load",
    "TFSMLayer": "carries code that would run on load: it loads a SavedModel whose ops run",
    "TorchModuleWrapper": "carries code that would run on load (a pickled torch module)",
    "JaxLayer": "carries code that would run on load (a JAX function)",
    "FlaxLayer": "carries code that would run on load (a Flax module)",
}
# Keras's own serialization markers: plain data.
DATA_MARKERS = frozenset({
    "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__",
    "__tuple__", "__passive_serialization__",
})
TRUSTED_PACKAGES = ("actswap", "actswap_legacy")  # registered names "actswap>Square"
LOOKUP_LAYERS = frozenset({"StringLookup", "IntegerLookup", "TextVectorization"})
LOW_PRECISION = frozenset({"float16", "bfloat16", "mixed_float16", "mixed_bfloat16", "half"})

# The classes a config may name: a Keras 2 config may also name tf_keras's.
_CLASSES = {False: allowlists.KERAS_CLASSES, True: allowlists.KERAS_CLASSES | allowlists.TF_KERAS_CLASSES}

# tf_keras TFOpLambda layers name a TensorFlow symbol; these touch files,
# processes or Python.
_TF_OP_DENIED_ROOTS = frozenset({
    "io", "compat", "raw_ops", "summary", "debugging", "saved_model", "data",
    "distribute", "lookup", "config", "experimental", "autograph", "sysconfig",
    "train", "tpu", "profiler", "__internal__", "__operators__.getattr",
})
_TF_OP_DENIED_NAMES = frozenset({
    "print", "py_function", "numpy_function", "load_op_library", "load_library",
    "function", "init_scope", "Module", "Variable", "write_file", "read_file",
})


# --- parsing ------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(raw: Any, what: str, report: ScanReport) -> Any:
    """Parse a JSON config as data (bounded size and depth); None after a finding."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_CONFIG_BYTES:
            report.add(ERROR, STRUCTURE, what, f"{what} is {len(raw)} bytes, more than the {MAX_CONFIG_BYTES} actswap reads")
            return None
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add(ERROR, DAMAGED, what, f"{what} is not UTF-8 text ({e})")
            return None
    if not isinstance(raw, str):
        report.add(ERROR, DAMAGED, what, f"{what} is not text")
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        report.add(ERROR, STRUCTURE, what, f"{what} is {len(raw)} characters, more than the {MAX_CONFIG_BYTES} actswap reads")
        return None
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        report.add(ERROR, STRUCTURE, what, f"{what} is nested {depth} levels deep, more than the {MAX_JSON_DEPTH} actswap reads")
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        report.add(ERROR, DAMAGED, what, f"{what} is not valid JSON ({first_line(e)})")
        return None
    if not isinstance(value, dict):
        report.add(ERROR, DAMAGED, what, f"{what} is not a JSON object")
        return None
    return value


def load_config(raw: Any, what: str, path: Path) -> dict[str, Any]:
    """:func:`parse_json` for callers that want the config itself: raise :class:`LoadError` instead of reporting."""
    report = ScanReport(str(path), "config")
    config = parse_json(raw, what, report)
    if config is None:
        raise LoadError(f"'{path}': {report.errors[0].message}")
    return config


# --- walking ------------------------------------------------------------------------


def check_config(raw: Any, what: str, report: ScanReport, *, legacy: bool) -> None:
    """Parse the config ``what`` and walk it; say in ``report.checked`` how much was checked."""
    config = parse_json(raw, what, report)
    if config is not None:
        n = walk_config(config, report, legacy=legacy)
        report.checked.append(f"{what}: {n} objects checked against the Keras allow-list")


def find_unsafe(config: dict[str, Any], legacy: bool = False) -> list[str]:
    """The error messages for ``config`` (a parsed model config), one per entry."""
    report = ScanReport("<config>", "config")
    walk_config(config, report, legacy=legacy)
    return [f.message for f in report.errors]


@dataclass
class _Walk:
    report: ScanReport
    classes: frozenset[str]
    legacy: bool
    objects: int = 0
    low_precision: tuple[str, str, str] | None = None  # (dtype, where, place)


def walk_config(config: dict[str, Any], report: ScanReport, *, legacy: bool) -> int:
    """Check every serialized object in ``config``; return how many were checked."""
    ctx = _Walk(report, _CLASSES[bool(legacy)], legacy)
    _walk(config, "", (), True, ctx)
    check_inputs(config, report, "the model config")
    if legacy:  # tf_keras loops forever on a broken layer graph; Keras 3 stops itself
        check_graphs(config, report, "the model config")
    if ctx.low_precision:
        dtype, where, place = ctx.low_precision
        report.add(
            WARNING, NUMERICS, where,
            f"the model computes in {dtype} (first at {place}): x² overflows float16 once |x| > 255 "
            "(65504 is its largest value) and loses precision in bfloat16; convert a float32 copy, "
            "or calibrate and check output_max",
        )
    return ctx.objects


def _walk(node: Any, ptr: str, names: tuple[str, ...], root: bool, ctx: _Walk) -> None:
    # ``names``: the layer path from the model down, without the model's own
    # name, as in actswap's site reports; ``ptr``: where in the JSON.
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{ptr}[{i}]", names, False, ctx)
        return
    if not isinstance(node, dict):
        return
    cfg = node.get("config")
    if "class_name" in node and isinstance(cfg, dict) and isinstance(cfg.get("name"), str) and not root:
        names = names + (cfg["name"],)
    where = "/".join(names) or "<model>"
    place = f"'{where}' ({ptr or 'the top level'})"
    if "class_name" in node:
        ctx.objects += 1
        if not _check_object(node, place, where, ctx):
            return
    elif ctx.legacy:
        _check_legacy_value(node, place, where, ctx)
    _note_precision(node, where, place, ctx)
    for key, value in node.items():
        _walk(value, f"{ptr}.{key}" if ptr else key, names, False, ctx)


def _keras_module(module: str, legacy: bool) -> bool:
    roots = ("keras", "tf_keras") if legacy else ("keras",)
    return module.split(".")[0] in roots


def _trusted_registered(name: Any) -> bool:
    return isinstance(name, str) and name.split(">")[0] in TRUSTED_PACKAGES and ">" in name


def _check_object(node: dict[str, Any], place: str, where: str, ctx: _Walk) -> bool:
    """Check one serialized object; False when what is below it need not be read."""
    add = ctx.report.add
    cls, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    if not isinstance(cls, str):
        add(ERROR, CODE, where, f"an object at {place} has a class_name that is not a string")
        return False
    if cls in CODE_CLASSES:
        add(ERROR, CODE, where, f"{cls} at {place} {CODE_CLASSES[cls]}")
        return False
    if cls in DATA_MARKERS:
        return True
    if cls == "__typespec__":
        if not (isinstance(module, str) and module.split(".")[0] in ("tensorflow", "keras")):
            add(ERROR, CODE, where, f"a type spec from module '{module}' at {place} is outside TensorFlow and would be imported on load")
        return False
    if cls == "function":
        fn = node.get("config")
        if _trusted_registered(registered):
            return False
        if isinstance(module, str) and (module == "builtins" or _keras_module(module, ctx.legacy)):
            if fn not in allowlists.KERAS_FUNCTIONS:
                add(ERROR, CODE, where, f"function '{fn}' (module '{module}') at {place} is not a Keras activation, loss, metric or op")
        else:
            add(ERROR, CODE, where, f"function '{fn}' from module '{module}' at {place} is outside Keras and would be imported on load")
        return False
    if isinstance(registered, str) and ">" in registered:
        if _trusted_registered(registered):
            return True
        add(
            ERROR, CODE, where,
            f"custom class '{registered}' (module '{module}') at {place} is the file author's code, "
            "not a Keras class; actswap cannot load it",
        )
        return False
    if ">" in cls and cls not in ctx.classes:  # Keras 2 writes registered names as class_name
        if _trusted_registered(cls):
            return True
        add(ERROR, CODE, where, f"custom class '{cls}' at {place} is the file author's code, not a Keras class; actswap cannot load it")
        return False
    if module is not None and not (isinstance(module, str) and _keras_module(module, ctx.legacy)):
        add(ERROR, CODE, where, f"'{cls}' from module '{module}' at {place} is outside Keras and would be imported on load")
        return False
    if cls not in ctx.classes:
        add(ERROR, CODE, where, f"unknown class '{cls}' at {place}: not a Keras layer or object actswap knows")
        return False
    cfg = node.get("config")
    if cls in LOOKUP_LAYERS and isinstance(cfg, dict) and isinstance(cfg.get("vocabulary"), str):
        add(ERROR, CODE, where, f"{cls} at {place} reads the file '{cfg['vocabulary']}' when it is loaded")
    if ctx.legacy and cls in ("TFOpLambda", "SlicingOpLambda") and isinstance(cfg, dict):
        symbol = cfg.get("function")
        if not isinstance(symbol, str) or _tf_op_denied(symbol):
            add(ERROR, CODE, where, f"{cls} at {place} calls tf.{symbol}, which can touch files or run code")
    return True


def _check_legacy_value(node: dict[str, Any], place: str, where: str, ctx: _Walk) -> None:
    # Keras 2 configs serialize functions without a class_name.
    if "function_type" in node:
        ctx.report.add(ERROR, CODE, where, f"a function ({node.get('function_type')}) at {place} carries code that would run on load")
    module = node.get("module")
    if isinstance(module, str) and not _keras_module(module, True) and module.split(".")[0] not in TRUSTED_PACKAGES:
        ctx.report.add(ERROR, CODE, where, f"module '{module}' at {place} is outside Keras and would be imported on load")


def _note_precision(node: dict[str, Any], where: str, place: str, ctx: _Walk) -> None:
    if ctx.low_precision:
        return
    dtype = node.get("dtype")
    name = None
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, dict) and isinstance(dtype.get("config"), dict):
        name = dtype["config"].get("name")
    if isinstance(name, str) and name in LOW_PRECISION:
        ctx.low_precision = (name, where, place)


def _tf_op_denied(symbol: str) -> bool:
    parts = symbol.split(".")
    return (
        parts[0] in _TF_OP_DENIED_ROOTS
        or ".".join(parts[:2]) in _TF_OP_DENIED_ROOTS
        or parts[-1] in _TF_OP_DENIED_NAMES
    )
