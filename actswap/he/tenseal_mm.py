"""TenSEAL's own vector API, the packing ``he-run`` used before issue 18: one
sample per ``CKKSVector``, repeated over the slots, matrices by ``CKKSVector.mm``
(the Halevi-Shoup diagonal method: one rotation per input element, 1,864 per
MNIST digit on the CryptoNets fixture, ~55 s). Kept as an independent
reference: tests compare the SEAL backends (:mod:`.latency`, :mod:`.batch`)
with it, and :func:`measure_drift` measures through TenSEAL's vectors the
rescale factors :class:`~.seal.Seal` computes from the primes.

Two TenSEAL facts this backend is built around (both measured on 0.3.18):

* ``mm`` reads the encrypted vector cyclically: an input of size n multiplied
  by an n x m matrix needs the slots to hold the vector repeated over
  n + m - 1 positions (:func:`slots_needed`), and ``add_plain``/``mul_plain``
  of a plain *vector* write it once and zero the rest, which corrupts the next
  product (OpenMined/TenSEAL#462): vector constants are encrypted instead;
* after every rescale TenSEAL sets the scale back to 2^s although it divided
  by a prime q only close to 2^s: every level multiplies the value by 2^s/q.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .program import Affine, Program


def slots_needed(program: Program) -> int:
    """Slots a TenSEAL ``mm`` chain needs: before each product of an n-vector by an
    n x m matrix the vector must repeat over n + m - 1 slots, and each product
    shortens the repetition by n - 1 (see the module docstring)."""
    used, need = 0, program.input_size
    for s in program.stages:
        if isinstance(s, Affine):
            n, m = s.matrix.shape
            need = max(need, used + n + m - 1)
            used += n - 1
    return need


def measure_drift(ctx: Any, depth: int) -> list[float]:
    """Per level, the factor 2^s/q that TenSEAL's rescale leaves in the value (see
    the module docstring), measured on a vector of ones over all slots."""
    import tenseal as ts

    ones = ts.ckks_vector(ctx, [1.0] * 256)
    previous, out = 1.0, []
    for _ in range(depth):
        ones = ones * 1.0
        value = float(np.mean(ones.decrypt()))
        out.append(value / previous)
        previous = value
    return out


class MMBackend:
    """TenSEAL CKKSVector operations (``CKKSVector.mm``: one rotation per input element);
    vector constants are encrypted once and cached. The packing before issue 18, kept
    as the reference for the SEAL backends."""

    packing = "tenseal-mm: one sample per CKKSVector, replicated; CKKSVector.mm (one rotation per input)"

    def __init__(self, context: Any, drift: list[float]) -> None:
        import tenseal as ts

        self.ts, self.context, self._drift = ts, context, drift
        self.constants: dict[Any, Any] = {}

    def drift(self, level: int) -> float:
        return self._drift[level - 1]

    def note(self, level: int, value: Any) -> None:
        pass  # magnitudes are the plaintext backend's business

    def encrypt(self, x: np.ndarray) -> Any:
        return self.ts.ckks_vector(self.context, np.asarray(x, "float64").tolist())

    def _constant(self, v: np.ndarray, key: Any) -> Any:
        if key not in self.constants:
            self.constants[key] = self.encrypt(v)
        return self.constants[key]

    def matmul(self, x: Any, m: np.ndarray, level: int) -> Any:
        return x.mm(m)

    def add_vector(self, x: Any, v: np.ndarray, key: Any) -> Any:
        return x + self._constant(v, key)

    def add_scalar(self, x: Any, c: float) -> Any:
        return x + float(c)

    def mul_scalar(self, x: Any, c: float, level: int) -> Any:
        return x * float(c)

    def mul_vector(self, x: Any, v: np.ndarray, key: Any, level: int) -> Any:
        return x * self._constant(v, key)

    def mul(self, a: Any, b: Any, level: int) -> Any:
        return a.square() if a is b else a * b

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def neg(self, a: Any) -> Any:
        return -a
