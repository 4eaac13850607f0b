"""Every private TensorFlow API actswap relies on, in one place.

TF's public API has no way to turn a FunctionDef from a loaded SavedModel
back into a graph whose ops can be walked, nor to create an op from a NodeDef
inside a function being traced, nor to freeze a function without reading
every variable (ONNX export leaves the weights out). These are stable internals (tf2onnx and
TF's own converters use them), but they are internals: the versions tested are
listed below, and tests/test_savedmodel.py::test_private_tf_api_still_works
fails loudly if an upgrade moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

TESTED_TF = ("2.21",)

from tensorflow.python.framework import convert_to_constants as _c2c  # noqa: E402
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


def freeze(concrete_fn: Any, left_out: Callable[[Any], bool]) -> tuple[Any, dict[str, Any]]:
    """``concrete_fn``'s GraphDef with its variables as constants, by TF's own
    freezer (nested functions inlined, ``ResourceGather`` made ``GatherV2``), as
    tf2onnx does. The variables ``left_out(variable)`` selects are not read at
    all: each becomes a ``Placeholder`` of its dtype and shape. Returns the graph
    and ``{placeholder name: variable}``."""
    import numpy as np

    class _Data(_c2c._FunctionConverterDataInEager):
        def _eval(self, tensor: Any) -> Any:
            if isinstance(tensor, tf.Variable) and left_out(tensor):
                return np.zeros((), tensor.dtype.as_numpy_dtype)  # a stand-in, replaced below
            return super()._eval(tensor)

    data = _Data(func=concrete_fn, lower_control_flow=False, aggressive_inlining=True)
    graph_def, _ = _c2c._replace_variables_by_constants(converter_data=data)
    captured = concrete_fn.captured_inputs
    by_handle = {id(v.handle): v for v in concrete_fn.graph.variables}
    placeholders: dict[str, Any] = {}
    for name, found in data._tensor_data.items():
        var = by_handle.get(id(captured[found.index])) if found.index is not None else None
        if var is not None and left_out(var):
            placeholders[name] = var
    for node in graph_def.node:
        var = placeholders.get(node.name)
        if var is not None:
            name = node.name
            node.Clear()
            node.name, node.op = name, "Placeholder"
            node.attr["dtype"].type = var.dtype.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(var.shape).as_proto())
    return graph_def, placeholders


def tf_version_tested() -> bool:
    return any(tf.__version__.startswith(v) for v in TESTED_TF)
