"""Every private TensorFlow API actswap relies on, in one place.

TF's public API has no way to turn a FunctionDef from a loaded SavedModel
back into a graph whose ops can be walked, nor to create an op from a NodeDef
inside a function being traced. These are stable internals (tf2onnx and
TF's own converters use them), but they are internals: the versions tested are
listed below, and tests/test_savedmodel.py::test_private_tf_api_still_works
fails loudly if an upgrade moves them.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

TESTED_TF = ("2.21",)

from tensorflow.python.framework import function_def_to_graph as _f2g  # noqa: E402
from tensorflow.python.ops import resource_variable_ops as _rvo  # noqa: E402


def function_def_to_graph(fdef: Any) -> Any:
    """A FuncGraph holding the ops of ``fdef``; ``.inputs``/``.outputs`` in order."""
    return _f2g.function_def_to_graph(fdef)


def create_op(graph: Any, op_type: str, inputs: list[Any], dtypes: list[Any], attrs: dict[str, Any], op_def: Any) -> Any:
    """Create an op in ``graph`` (the function being traced) from a NodeDef's parts."""
    return graph._create_op_internal(op_type, inputs, dtypes=dtypes, attrs=attrs, op_def=op_def)


def mark_variable_accessed(variable: Any) -> None:
    """Tell tapes and the traced function that ``variable`` is read, so it is watched."""
    _rvo.variable_accessed(variable)


def tf_version_tested() -> bool:
    return any(tf.__version__.startswith(v) for v in TESTED_TF)
