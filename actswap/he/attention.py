"""Compiling actswap's transformer layers into program stages.

:class:`~actswap.transformer.PolyMultiHeadAttention` becomes its own parts: the
query, key and value projections (affine, 1/sqrt(key_dim) folded into the
query's), QKᵀ (a :class:`~.stages.Bilinear` stage), the polynomial softmax
``s·(x + c)²`` (a :class:`~.stages.Poly`), the weights times V (Bilinear) and
the output projection (affine). The fixed normalisations (degree 0 in the
variance) are affine maps and compile as such. Each part is checked on the
probes like every stage, and the whole against the layer's own call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .limits import OutOfScopeError


def einsum_pairs(equation: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]
                 ) -> tuple[np.ndarray, tuple[int, ...]]:
    """The products ``einsum(equation, a, b)`` sums, as flat indices: pairs (n_out,
    terms, 2) into row-major ``a`` and ``b``, and the output's shape."""
    operands, out = equation.replace(" ", "").split("->")
    ea, eb = operands.split(",")
    sizes: dict[str, int] = {}
    for letters, shape in ((ea, shape_a), (eb, shape_b)):
        if len(letters) != len(shape):
            raise ValueError(f"einsum '{equation}': '{letters}' does not match the shape {shape}")
        for letter, d in zip(letters, shape):
            if sizes.setdefault(letter, int(d)) != int(d):
                raise ValueError(f"einsum '{equation}': '{letter}' is {sizes[letter]} and {d}")
    summed = [letter for letter in sizes if letter not in out]
    letters = list(out) + summed  # output letters first: the grid's C order groups by output
    grid = np.indices([sizes[letter] for letter in letters]).reshape(len(letters), -1)
    at = dict(zip(letters, grid))
    ia = np.ravel_multi_index([at[letter] for letter in ea], [sizes[letter] for letter in ea])
    ib = np.ravel_multi_index([at[letter] for letter in eb], [sizes[letter] for letter in eb])
    out_shape = tuple(sizes[letter] for letter in out)
    return np.stack([ia, ib], axis=-1).reshape(int(np.prod(out_shape)), -1, 2), out_shape


def shifted_square(obj: Any) -> np.ndarray | None:
    """Coefficients of ``scale * (x + shift)**2`` for actswap's polynomial softmax
    objects (a layer or an activation: element-wise whatever their axis), else None."""
    if type(obj).__name__ not in ("PolySoftmax", "PolySoftmaxActivation"):
        return None
    return _square(obj.shift, obj.scale)


def _square(shift: float, scale: float) -> np.ndarray:
    s, c = float(scale), float(shift)
    return np.array([s * c * c, 2 * s * c, s])


def _attention(c: Any, op: Any, args: tuple, kwargs: dict) -> Any:
    from keras import ops

    from ..transformer import shifted_square

    name = op.name
    query = args[0]
    value = args[1] if len(args) > 1 else kwargs["value"]
    key = args[2] if len(args) > 2 else kwargs.get("key")
    key = value if key is None else key
    for option in ("attention_mask", "query_mask", "value_mask", "key_mask"):
        if kwargs.get(option) is not None:
            raise OutOfScopeError(f"'{name}': attention with a mask ({option}) is not compiled for encrypted runs")
    if kwargs.get("use_causal_mask") or kwargs.get("return_attention_scores"):
        raise OutOfScopeError(f"'{name}': a causal mask or returned scores are not compiled for encrypted runs")
    if getattr(op, "_use_gate", False):
        raise OutOfScopeError(f"'{name}': gated attention (use_gate=True) is not compiled for encrypted runs")
    if getattr(op, "blend", False) or getattr(op, "calibrating", False):
        raise OutOfScopeError(f"'{name}': the layer is still blending or calibrating; finish recovery first")
    q = c.call(op._query_dense, query)
    k = c.call(op._key_dense, key)
    v = c.call(op._value_dense, value)
    inv = float(op._inverse_sqrt_key_dim)
    q_probe = ops.multiply(q.probe, ops.cast(inv, q.probe.dtype))
    q = type(q)(q.seg, q.rows * inv, q_probe, names=q.names + (f"{name} 1/sqrt(key_dim)",))
    qa, ka, va = (c.materialize(t, f"{name}/{part}") for t, part in ((q, "query"), (k, "key"), (v, "value")))
    scores = ops.einsum(op._dot_product_equation, k.probe, q_probe)
    sid = c.bilinear(op._dot_product_equation, ka, qa, f"{name}/QKᵀ", scores)
    weights = shifted_square(scores, op.shift, op.scale)
    wid = c.poly_stage(sid, _square(op.shift, op.scale), f"{name}/softmax s·(x + c)²", weights)
    combined = ops.einsum(op._combine_equation, weights, v.probe)
    oid = c.bilinear(op._combine_equation, wid, va, f"{name}/weights × V", combined)
    out = c.call(op._output_dense, c.start(c.shapes[oid], combined, oid))
    expected = op(query.probe, value.probe, key.probe, training=False)
    c.check(np.asarray(out.probe, "float64").reshape(len(c.probe), -1), expected, f"'{name}' by its parts")
    return out


def _normalization(c: Any, op: Any, args: tuple, kwargs: dict) -> Any:
    degree = len(op.coefficients) - 1
    if degree > 0:
        raise OutOfScopeError(
            f"'{op.name}': its inverse square root is a degree-{degree} polynomial of the variance, a product "
            "of encrypted values the encrypted run does not compile; the fixed normalisation (degree 0, "
            "actswap's default) does"
        )
    return c.affine(op, args, kwargs)


def _not_compiled(c: Any, op: Any, args: tuple, kwargs: dict) -> Any:
    raise OutOfScopeError(f"'{op.name}' ({type(op).__name__}) is not compiled for encrypted runs yet; "
                          "MultiHeadAttention is")


# Layer class -> its compiler (called with the compiler, the layer, its arguments).
SPECIAL_LAYERS: dict[str, Callable[..., Any]] = {
    "PolyMultiHeadAttention": _attention,
    "PolyLayerNormalization": _normalization,
    "PolyRMSNormalization": _normalization,
    "PolyAttention": _not_compiled,
}
