"""Evaluate a :class:`~actswap.he.program.Program` on a backend: the level and
factor bookkeeping every backend shares (:func:`_evaluate`), and the plaintext
float64 backend (the reference and the depth/magnitude probe).

The encrypted backends implement the same small protocol (``encrypt``,
``matmul``, ``add``, ``add_vector``, ``add_scalar``, ``mul``, ``mul_scalar``,
``mul_vector``, ``neg``, ``drift``, ``note``): :mod:`.latency` (one sample per
ciphertext), :mod:`.batch` (one sample per slot), and :mod:`.tenseal_mm`
(TenSEAL's ``CKKSVector.mm``, the packing before them, kept as a reference).
A backend may also offer ``matmul_bias(x, m, bias, level)`` (the matrix and the
bias in one pass, no copy of the output to add the bias to). A program that is
not a chain (:attr:`~.stages.Program.is_chain`) also needs
``bilinear`` (sums of products of two encrypted vectors), ``join``
(concatenate) and ``lower`` (modulus-switch to a level): the plaintext and
batch backends have them; latency mode runs chains only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stages import Affine, Bilinear, Poly, Program, inputs_of, last_uses


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

    def bilinear(self, a: np.ndarray, b: np.ndarray, pairs: np.ndarray, level: int) -> np.ndarray:
        terms = a[:, pairs[..., 0]] * b[:, pairs[..., 1]]
        self.note(level, np.abs(terms).sum(axis=-1))  # the partial sums
        return terms.sum(axis=-1)

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def lower(self, x: np.ndarray, level: int) -> np.ndarray:
        return x

    def neg(self, a: np.ndarray) -> np.ndarray:
        return -a


def _evaluate(program: Program, backend: Any, x: np.ndarray,
              levels: dict[int, int] | None = None) -> tuple[Any, _Ct]:
    """Evaluate ``program`` on ``x`` (one flat sample, or a batch for the plain
    backend). Returns the encrypted input and the output; ``out.data / out.factor``
    is the logits. The level arithmetic here is the multiplicative depth:
    a matrix costs 1, a product 1, a scalar or vector coefficient 1 (folded
    into the factor instead when it is 1 or -1 and the polynomial has one term).
    A stage reading several values brings them to the deepest one's level first
    (a modulus switch: value and scale unchanged) and compensates each one's
    factor in its own rows; a value is dropped after its last reader. ``levels``,
    when given, receives each value's level."""
    enc = backend.encrypt(x)
    return enc, _evaluate_from(program, backend, enc, levels)


def _evaluate_from(program: Program, backend: Any, enc: Any, levels: dict[int, int] | None = None,
                   on_stage: Callable[[int, float], None] | None = None) -> _Ct:
    """:func:`_evaluate` on an already encrypted input (so encryption is timed apart).
    Holds ``enc`` only until its last reader: a caller that passes its only
    reference (``holder.pop()``) gets the input's ciphertexts freed there.
    ``on_stage(index, seconds)`` is called after each stage."""
    values = {0: _Ct(enc, 0, 1.0)}
    del enc
    if levels is not None:
        levels[0] = 0
    last = last_uses(program.stages)
    sizes = {0: program.input_size, **{k + 1: st.size for k, st in enumerate(program.stages)}}
    for i, s in enumerate(program.stages):
        started = time.perf_counter()
        ins = [values[v] for v in inputs_of(s, i)]
        if isinstance(s, Affine):
            # Compensate each input's factor and the drift of the coming rescale.
            top = max(h.level for h in ins)
            level = top + 1
            if len(ins) == 1:  # a chain's stage (all latency mode runs)
                m, data = s.matrix / (ins[0].factor * backend.drift(level)), ins[0].data
            else:
                factors = np.concatenate([np.full(sizes[v], values[v].factor) for v in inputs_of(s, i)])
                m = s.matrix / (factors[:, None] * backend.drift(level))
                data = backend.join([backend.lower(h.data, top) for h in ins])
            if np.any(s.bias) and hasattr(backend, "matmul_bias"):  # the bias added as outputs are made
                h = _Ct(backend.matmul_bias(data, m, s.bias, level), level, 1.0)
            else:
                h = _Ct(backend.matmul(data, m, level), level, 1.0)
                if np.any(s.bias):
                    h.data = backend.add_vector(h.data, s.bias, (i, "bias"))
        elif isinstance(s, Bilinear):
            a, b = ins
            top = max(a.level, b.level)
            level = top + 1
            data = backend.bilinear(backend.lower(a.data, top), backend.lower(b.data, top), s.pairs, level)
            h = _Ct(data, level, a.factor * b.factor * backend.drift(level))
        else:
            h = _poly_stage(s, backend, ins[0], i)
        backend.note(h.level, h.data)
        values[i + 1] = h
        if levels is not None:
            levels[i + 1] = h.level
        for v in inputs_of(s, i):
            if last[v] == i:
                values.pop(v, None)  # its ciphertexts are freed
        if on_stage is not None:
            on_stage(i, time.perf_counter() - started)
    return values[len(program.stages)]


def _poly_stage(p: Poly, backend: Any, x: _Ct, index: int) -> _Ct:
    """:func:`_polynomial`, in slices of ``backend.poly_chunk`` elements when the
    backend has one and the coefficients are shared (every slice then takes the
    same levels and factors): a slice's powers and terms are all that is held
    beside the input and the output."""
    size = getattr(backend, "poly_chunk", None)
    if not size or p.size <= size or p.coefficients.ndim != 1:
        return _polynomial(p, backend, x, index)
    parts = [_polynomial(Poly(p.coefficients, p.layer, len(x.data[lo:lo + size])), backend,
                         _Ct(x.data[lo:lo + size], x.level, x.factor), index)
             for lo in range(0, p.size, size)]
    return _Ct(backend.join([part.data for part in parts]), parts[0].level, parts[0].factor)


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
    # power() refers to itself, so its closure is a reference cycle holding `powers`:
    # emptied here, the stage's input and powers are freed now, not at the next GC.
    powers.clear()
    c0 = c[0]
    s0 = scalar(c0)
    if s0 is None:
        result.data = backend.add_vector(result.data, c0 * result.factor, (index, 0))
    elif s0 != 0.0:
        result.data = backend.add_scalar(result.data, s0 * result.factor)
    return result
