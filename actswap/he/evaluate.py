"""Evaluate a :class:`~actswap.he.program.Program` on a backend: the level and
factor bookkeeping every backend shares (:func:`_evaluate`), and the plaintext
float64 backend (the reference and the depth/magnitude probe).

The encrypted backends implement the same small protocol (``encrypt``,
``matmul``, ``add``, ``add_vector``, ``add_scalar``, ``mul``, ``mul_scalar``,
``mul_vector``, ``neg``, ``drift``, ``note``): :mod:`.latency` (one sample per
ciphertext), :mod:`.batch` (one sample per slot), and :mod:`.tenseal_mm`
(TenSEAL's ``CKKSVector.mm``, the packing before them, kept as a reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .program import Affine, Poly, Program


@dataclass
class _Ct:
    """A ciphertext (or its plaintext stand-in) with what the evaluator knows of it:
    its level (rescales so far) and ``factor`` (decrypted value = factor x true value)."""

    data: Any
    level: int
    factor: float


class _PlainBackend:
    """Numpy stand-in for TenSEAL: the same operations on (N, n) float64 arrays.
    Records, per level reached, the largest magnitude a slot will hold."""

    def __init__(self) -> None:
        self.magnitude: dict[int, float] = {}

    def note(self, level: int, value: np.ndarray) -> None:
        m = float(np.abs(value).max()) if value.size else 0.0
        self.magnitude[level] = max(self.magnitude.get(level, 0.0), m)

    def drift(self, level: int) -> float:
        return 1.0

    def encrypt(self, x: np.ndarray) -> Any:
        return np.asarray(x, "float64")

    def matmul(self, x: np.ndarray, m: np.ndarray, level: int) -> np.ndarray:
        # The diagonal method's partial sums are bounded by sum |x_i m_ij|.
        self.note(level, np.abs(x) @ np.abs(m))
        y = x @ m
        return y

    def add_vector(self, x: np.ndarray, v: np.ndarray, key: Any) -> np.ndarray:
        return x + v

    def add_scalar(self, x: np.ndarray, c: float) -> np.ndarray:
        return x + c

    def mul_scalar(self, x: np.ndarray, c: float, level: int) -> np.ndarray:
        y = x * c
        self.note(level, y)
        return y

    def mul_vector(self, x: np.ndarray, v: np.ndarray, key: Any, level: int) -> np.ndarray:
        y = x * v
        self.note(level, y)
        return y

    def mul(self, a: np.ndarray, b: np.ndarray, level: int) -> np.ndarray:
        y = a * b
        self.note(level, y)
        return y

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def neg(self, a: np.ndarray) -> np.ndarray:
        return -a


def _evaluate(program: Program, backend: Any, x: np.ndarray) -> tuple[Any, _Ct]:
    """Evaluate ``program`` on ``x`` (one flat sample, or a batch for the plain
    backend). Returns the encrypted input and the output; ``out.data / out.factor``
    is the logits. The level arithmetic here is the multiplicative depth:
    a matrix costs 1, a product 1, a scalar or vector coefficient 1 (folded
    into the factor instead when it is 1 or -1 and the polynomial has one term)."""
    enc = backend.encrypt(x)
    h = _Ct(enc, 0, 1.0)
    for i, s in enumerate(program.stages):
        if isinstance(s, Affine):
            # Compensate this input's factor and the drift of the coming rescale.
            level = h.level + 1
            m = s.matrix / (h.factor * backend.drift(level))
            h = _Ct(backend.matmul(h.data, m, level), level, 1.0)
            if np.any(s.bias):
                h.data = backend.add_vector(h.data, s.bias, (i, "bias"))
        else:
            h = _polynomial(s, backend, h, i)
        backend.note(h.level, h.data)
    return enc, h


def _polynomial(p: Poly, backend: Any, x: _Ct, index: int) -> _Ct:
    c = p.coefficients
    terms = [k for k in range(1, c.shape[0]) if np.any(c[k] != 0)]
    powers: dict[int, _Ct] = {1: x}

    def power(k: int) -> _Ct:
        if k not in powers:
            hi = 1 << (k.bit_length() - 1)
            if hi == k:
                a = b = power(k // 2)
            else:
                a, b = power(hi), power(k - hi)
            level = max(a.level, b.level) + 1
            powers[k] = _Ct(backend.mul(a.data, b.data, level), level, a.factor * b.factor * backend.drift(level))
        return powers[k]

    def scalar(v: np.ndarray) -> float | None:
        return float(v) if v.ndim == 0 else (float(v[0]) if np.all(v == v[0]) else None)

    result: _Ct | None = None
    if len(terms) == 1 and scalar(c[terms[0]]) in (1.0, -1.0):
        # A lone x^k (x² above all): no coefficient to multiply, the factor carries on.
        t = power(terms[0])
        data = t.data if scalar(c[terms[0]]) == 1.0 else backend.neg(t.data)
        result = _Ct(data, t.level, t.factor)
    else:
        for k in terms:
            t = power(k)
            level = t.level + 1
            ck, d = c[k], t.factor * backend.drift(level)
            s = scalar(ck)
            if s is not None:
                data = backend.mul_scalar(t.data, s / d, level)
            else:
                data = backend.mul_vector(t.data, ck / d, (index, k), level)
            term = _Ct(data, level, 1.0)
            result = term if result is None else _Ct(backend.add(result.data, term.data),
                                                      max(result.level, level), 1.0)
    assert result is not None  # a Poly has degree >= 1
    c0 = c[0]
    s0 = scalar(c0)
    if s0 is None:
        result.data = backend.add_vector(result.data, c0 * result.factor, (index, 0))
    elif s0 != 0.0:
        result.data = backend.add_scalar(result.data, s0 * result.factor)
    return result


def _evaluate_from(program: Program, backend: Any, enc: Any) -> _Ct:
    """:func:`_evaluate` on an already encrypted input (so encryption is timed apart)."""

    class _Given:
        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def encrypt(self, _: Any) -> Any:
            return enc

    return _evaluate(program, _Given(), None)[1]
