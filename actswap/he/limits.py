"""CKKS limits actswap works within (128-bit security, SEAL's prime sizes) and the
two refusals of an encrypted run: a model outside its scope, parameters that fit no
secure CKKS setting."""

from __future__ import annotations

from ..errors import UnsupportedModelError


# Largest total coefficient-modulus bits for 128-bit classical security
# (HomomorphicEncryption.org standard, what SEAL enforces by default).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


MAX_PRIME_BITS = 60  # SEAL's largest prime


MAX_SCALE_BITS = 40  # more buys nothing for float64 results


MIN_SCALE_BITS = 25  # below this, rescale and encoding noise reach ~1e-3 of the values


MARGIN_BITS = 3  # headroom over the largest value seen (values up to 8x larger still decrypt)


MAX_SLOTS = max(MAX_MODULUS_BITS) // 2  # the widest vector any parameter set holds


def max_depth() -> int:
    """The most rescale levels any 128-bit-secure setting holds: the largest
    modulus, two outer primes of the smallest scale plus the sign bit and
    margin, and primes of the smallest scale between them (as
    :func:`actswap.he.params.choose_parameters` lays them out)."""
    outer = MIN_SCALE_BITS + 1 + MARGIN_BITS
    return (max(MAX_MODULUS_BITS.values()) - 2 * outer) // MIN_SCALE_BITS


class OutOfScopeError(UnsupportedModelError):
    """The model is not a chain of affine maps and polynomials (exit 2); names the layer."""


class ParameterError(UnsupportedModelError):
    """No CKKS parameters at 128-bit security fit the model's depth, width or values (exit 2)."""


# --- the compiled program ----------------------------------------------------
