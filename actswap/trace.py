"""Counting TensorFlow ops in a model's traced forward pass.

The one check that sees activations hidden in Python code: a subclassed
model's ``call()`` may apply ``tf.nn.relu`` or ``keras.ops.relu`` directly,
which no config or attribute shows. Tracing the call into a graph and counting
op types (in the graph and every function it calls: ``while`` bodies, ``cond``
branches) finds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tensorflow as tf


def _specs(shape: Any) -> list[tf.TensorSpec] | None:
    def one(s: Any) -> tf.TensorSpec | None:
        if isinstance(s, (list, tuple)) and all(d is None or isinstance(d, int) for d in s) and s:
            return tf.TensorSpec((None,) + tuple(s[1:]), tf.float32)
        return None

    single = one(shape)
    if single is not None:
        return [single]
    if isinstance(shape, (list, tuple)):
        many = [one(s) for s in shape]
        if many and all(m is not None for m in many):
            return many  # type: ignore[return-value]
    if isinstance(shape, dict) and len(shape) == 1:
        return _specs(next(iter(shape.values())))
    return None


def count_ops(model: Any, op_types: Iterable[str]) -> int | None:
    """Number of ops of ``op_types`` in ``model``'s inference graph; None if untraceable."""
    wanted = set(op_types)
    build = model.get_build_config() if hasattr(model, "get_build_config") else None
    specs = _specs((build or {}).get("input_shape"))
    if specs is None:
        return None

    def forward(*xs: Any) -> Any:
        return model(xs[0] if len(xs) == 1 else list(xs), training=False)

    try:
        graph_def = tf.function(forward).get_concrete_function(*specs).graph.as_graph_def()
    except Exception:  # noqa: BLE001 - an untraceable model is reported as such
        return None
    count = sum(node.op in wanted for node in graph_def.node)
    for fn in graph_def.library.function:
        count += sum(node.op in wanted for node in fn.node_def)
    return count
