"""Homomorphic encryption: how ready a model is (:mod:`.readiness`: non-polynomial
operations, multiplicative depth), and running it on CKKS-encrypted data
(TenSEAL), compared with plaintext.

Layout: :mod:`.readiness` (``he_report``), :mod:`.layers` (what both know of
Keras layers; activations come from :mod:`actswap.catalog`), :mod:`.program`
(compile a model into affine stages and polynomials), :mod:`.params` (CKKS
parameters and context), :mod:`.evaluate` (the level/factor bookkeeping all
backends share, and the plaintext backend), :mod:`.seal` (SEAL on a TenSEAL
context's keys, what the encrypted backends share, and a ciphertext's data as
an array), :mod:`.encryption` (how samples are encrypted: SEAL's public-key or
secret-key encryption), :mod:`.latency` with :mod:`.diagonals` (latency mode: one sample
per ciphertext), :mod:`.batch` (batch mode: one sample per slot; its backends
:mod:`.batch_rns` with :mod:`.rns` and :mod:`.forks`, and :mod:`.batch_seal`,
run by :mod:`.worker`), :mod:`.tenseal_mm` (TenSEAL's
``CKKSVector.mm``, the packing before them, kept as a test reference),
:mod:`.encrypted` (``run``, its report), :mod:`.limits` (security limits,
the refusals).

Running a converted model encrypted:

Three steps, each with one job:

1. :func:`~.program.compile_model` turns a Keras model made of affine maps,
   polynomial activations and actswap's polynomial attention into a
   :class:`Program`: stages (:mod:`.stages`) that each read earlier values, an
   :class:`Affine` (one plain matrix and bias over the values it reads), a
   :class:`Poly` (polynomial coefficients, shared or per element) or a
   :class:`Bilinear` (sums of products of two encrypted values: attention's
   QKᵀ and weights x V, :mod:`.attention`). Each affine stretch (every layer
   between two stages, across residual branches) is compiled by applying the
   layers themselves, cloned in float64 with the same weights, to the zero
   input and to every basis vector of the values it reads: ``bias = f(0)``,
   ``matrix[i] = f(e_i) - f(0)``. That is exact for affine layers (up to
   float64 rounding) and needs no per-layer formula. Each stage is then checked
   against the original float32 layers on probe inputs (:data:`COMPILE_TOL`);
   a failure is an :class:`~actswap.errors.InvariantError`. A model whose
   values flow layer to layer compiles to a chain (what latency mode runs).
2. :func:`~.params.choose_parameters` picks CKKS parameters (polynomial modulus degree,
   coefficient modulus chain, scale) from the program's multiplicative depth,
   its vector sizes and the magnitudes of its values, at 128-bit security.
3. :func:`~.encrypted.run` encrypts the samples, evaluates the program and
   decrypts the logits, in one of two packings:

   * *batch* (:mod:`.batch`, CryptoNets' packing): one ciphertext per vector
     element, sample j in slot j of each, up to N/2 samples per batch; a
     matrix is ciphertext x scalar products over its non-zero weights, summed
     and rescaled once per output; no rotations, so no Galois keys. The
     products run as exact integer matrix products on the ciphertexts' RNS
     data (:mod:`.rns`, :mod:`.batch_rns`), in a process without TensorFlow
     (:mod:`.worker`) whose operations are shared among processes forked
     once per run (:mod:`.forks`); ~2 ms per MNIST image amortised on the CryptoNets
     fixture.
   * *latency* (:mod:`.latency`): one sample per ciphertext; a matrix is its
     non-zero generalized diagonals (one plain product each), rotated with
     baby-step giant-step (:mod:`.diagonals`): ~85 key switches per MNIST
     digit where ``CKKSVector.mm`` made 1,864 rotations; ~1 s per image.

   Squares and products for polynomials in both. It reports agreement, errors,
   latency, throughput, memory and sizes.

Scope: Dense, Conv1D/2D/3D (and transposed, depthwise, separable), average
pooling, Flatten/Reshape/Permute, BatchNormalization (inference mode),
Rescaling, padding/cropping, dropout (identity at inference), Add/Subtract/
Concatenate/Average of tensors, adding or multiplying by a constant,
actswap's square and polynomial activations, its polynomial multi-head
attention, fixed LayerNorm/RMSNorm and hidden softmax (batch mode), and a
softmax as the very last operation (its input, the logits, is what is
decrypted and compared). Anything else is refused with
:class:`OutOfScopeError`, naming the layer and what to do.

Both encrypted backends drive SEAL through TenSEAL's bundled binding
(``tenseal.sealapi``, :mod:`.seal`): TenSEAL's vectors rescale after every
product and expose neither rescale nor rotation. One TenSEAL fact the
evaluator is built around (measured on 0.3.18): after every rescale the
ciphertext's scale is set back to 2^s although the value was divided by a
prime q only close to 2^s, so every level multiplies the value by 2^s/q (0.3%
per level for 27-bit primes). The backends keep that convention and know the
factor of each level from the primes (:meth:`~.seal.Seal.drift`, checked
against TenSEAL's own vectors); :func:`~.evaluate._evaluate` compensates it
exactly in the next plain matrix or scalar, so the logits keep the precision
of the scale instead of losing a few percent.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Depth", "HEReport", "HERunReport", "he_report", "run"]

# Imported when first used: the encrypted run's worker process (:mod:`.worker`)
# imports its submodules without Keras and TensorFlow (readiness needs Keras).
_LAZY = {"run": ".encrypted", "HERunReport": ".encrypted", "he_report": ".readiness",
         "HEReport": ".readiness", "Depth": ".readiness"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
