"""CKKS parameters from a program: depth, slots and magnitudes -> the smallest
128-bit-secure setting that holds them; the context and its rescale drift."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .evaluate import _evaluate, _PlainBackend
from .limits import MARGIN_BITS, MAX_MODULUS_BITS, MAX_PRIME_BITS, MAX_SCALE_BITS, MIN_SCALE_BITS, ParameterError
from .stages import Program


@dataclass
class CKKSParameters:
    poly_modulus_degree: int
    coeff_mod_bit_sizes: list[int]
    scale_bits: int
    depth: int
    slots_needed: int
    integer_bits: int
    security_bits: int = 128

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def describe(self) -> str:
        return (
            f"CKKS N={self.poly_modulus_degree} ({self.poly_modulus_degree // 2} slots, {self.slots_needed} "
            f"needed), coefficient modulus {self.coeff_mod_bit_sizes} = {self.total_bits} bits "
            f"(max {MAX_MODULUS_BITS[self.poly_modulus_degree]} for {self.security_bits}-bit security), "
            f"scale 2^{self.scale_bits}, depth {self.depth}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree, "slots": self.poly_modulus_degree // 2,
            "slots_needed": self.slots_needed, "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "total_bits": self.total_bits, "max_bits_128": MAX_MODULUS_BITS[self.poly_modulus_degree],
            "scale_bits": self.scale_bits, "depth": self.depth, "integer_bits": self.integer_bits,
            "security_bits": self.security_bits,
        }


def depth_and_magnitudes(program: Program, x: np.ndarray) -> tuple[int, dict[int, float]]:
    """Multiplicative depth of ``program`` and, per level, the largest value a slot
    holds on the samples ``x`` (counted by running the evaluator in plaintext)."""
    backend = _PlainBackend()
    _, out = _evaluate(program, backend, np.asarray(x, "float64").reshape(len(x), -1))
    return out.level, backend.magnitude


def choose_parameters(depth: int, slots: int, magnitude: dict[int, float]) -> CKKSParameters:
    """The smallest polynomial modulus degree N (fastest) whose N/2 slots hold ``slots``
    and whose 128-bit-secure modulus budget holds ``depth`` rescale primes of at
    least :data:`MIN_SCALE_BITS` bits; within it, the largest scale (up to
    :data:`MAX_SCALE_BITS`). The first prime q0 = scale + integer bits, where the
    integer bits cover the largest value of the last level, and any earlier level
    within the primes still above it, with :data:`MARGIN_BITS` to spare; the
    special (key-switching) prime equals q0. Raises :class:`ParameterError`."""
    depth = max(depth, 1)

    def integer_bits(s: int) -> int:
        need = 1 + MARGIN_BITS
        for level, m in magnitude.items():
            bits = math.ceil(math.log2(m)) if m > 1 else 0
            # A value produced at `level` still has (depth - level) primes of s bits above q0.
            need = max(need, bits + 1 + MARGIN_BITS - (depth - level) * s)
        return need

    tried = []
    for n in sorted(MAX_MODULUS_BITS):
        if n // 2 < slots:
            tried.append(f"N={n}: {n // 2} slots < {slots}")
            continue
        budget = MAX_MODULUS_BITS[n]
        for s in range(MAX_SCALE_BITS, MIN_SCALE_BITS - 1, -1):
            ib = integer_bits(s)
            q0 = s + ib
            if q0 <= MAX_PRIME_BITS and 2 * q0 + depth * s <= budget:
                return CKKSParameters(n, [q0] + [s] * depth + [q0], s, depth, slots, ib)
        tried.append(f"N={n}: depth {depth} needs {2 * (MIN_SCALE_BITS + integer_bits(MIN_SCALE_BITS)) + depth * MIN_SCALE_BITS} bits > {budget}")
    raise ParameterError(
        f"no CKKS parameters at 128-bit security fit this model (multiplicative depth {depth}, "
        f"{slots} slots needed): {'; '.join(tried)}; use fewer or lower-degree polynomial "
        "activations, or smaller layers"
    )


def make_context(params: CKKSParameters, galois: bool = True) -> Any:
    """A TenSEAL context with public, secret and relinearisation keys, and the Galois
    keys rotations need (``CKKSVector.mm``) unless ``galois`` is False (batch mode
    never rotates; the keys are most of the public context's size)."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.scale_bits
    if galois:
        ctx.generate_galois_keys()
    return ctx


# --- the run ---------------------------------------------------------------------
