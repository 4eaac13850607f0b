"""A fix for tf2onnx 1.17's transpose optimizer, applied around every export.

``TransposeOptimizer._mul_handler`` handles ``Mul(t, t)`` (both inputs the same
Transpose output, which is exactly how tf2onnx converts ``tf.square``) by
moving the Transpose after the Mul, but leaves the Mul's output shape in the
old layout. Later rewrites trust that shape, and the graph they produce is
invalid: onnxruntime refuses it ("Input channels C is not equal to kernel
channels * group", or an NCHWc reorder failure) for ResNet50 and ResNet50V2
with squares, while the same networks with ReLU (a unary op) export fine.

The fix records the shape of the Transpose's input (the Mul now computes in
that layout) and sets it on the Mul's output. It is applied only inside
:func:`patched`, and tests/test_export.py checks that the unpatched exporter
still fails, so the fix is removed once tf2onnx is fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

TESTED_TF2ONNX = ("1.17",)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    original = TransposeOptimizer._mul_handler

    def mul_handler(self: Any, trans: Any, node: Any) -> bool:
        same = len(node.input) == 2 and node.input[0] == node.input[1] == trans.output[0]
        if not same:
            return original(self, trans, node)
        shape = self._g.get_shape(trans.input[0])
        done = original(self, trans, node)
        if done:
            self._g.set_shape(node.output[0], shape)
        return done

    TransposeOptimizer._mul_handler = mul_handler
    try:
        yield
    finally:
        TransposeOptimizer._mul_handler = original
