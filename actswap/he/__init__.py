"""Homomorphic encryption: how ready a model is (:mod:`.readiness`: non-polynomial
operations, multiplicative depth), and running it on CKKS-encrypted data
(TenSEAL), compared with plaintext.

Layout: :mod:`.readiness` (``he_report``), :mod:`.layers` (what both know of
Keras layers; activations come from :mod:`actswap.catalog`), :mod:`.program`
(compile a model into affine stages and polynomials), :mod:`.params` (CKKS parameters),
:mod:`.evaluate` (plaintext and TenSEAL backends), :mod:`.batch` (batch mode:
many samples per ciphertext), :mod:`.encrypted` (``run``, its report),
:mod:`.limits` (security limits, the refusals).

Running a converted model encrypted:

Three steps, each with one job:

1. :func:`~.program.compile_model` turns a Keras model that is a chain of affine maps and
   polynomial activations into a :class:`Program`: a list of stages, each an
   :class:`Affine` (one plain matrix and bias) or a :class:`Poly` (polynomial
   coefficients, shared or per element). Each affine stretch (every layer
   between two polynomial activations) is compiled by applying the layers
   themselves, cloned in float64 with the same weights, to the zero input and
   to every basis vector: ``bias = f(0)``, ``matrix[i] = f(e_i) - f(0)``.
   That is exact for affine layers (up to float64 rounding) and needs no
   per-layer formula. Each stage is then checked against the original float32
   layers on probe inputs (:data:`COMPILE_TOL`); a failure is an
   :class:`~actswap.errors.InvariantError`.
2. :func:`~.params.choose_parameters` picks CKKS parameters (polynomial modulus degree,
   coefficient modulus chain, scale) from the program's multiplicative depth,
   its vector sizes and the magnitudes of its values, at 128-bit security.
3. :func:`~.encrypted.run` encrypts the samples, evaluates the program and
   decrypts the logits, in one of two modes: *latency*, one ciphertext per
   sample (TenSEAL, ``CKKSVector.mm`` for matrices), or *batch*, one ciphertext
   per vector element holding up to N/2 samples (:mod:`.batch`: CryptoNets'
   packing, scalar products only, no rotations); squares and products for
   polynomials in both. It reports agreement, errors, latency, throughput,
   memory and sizes.

Scope: Dense, Conv1D/2D/3D (and transposed, depthwise, separable), average
pooling, Flatten/Reshape/Permute, BatchNormalization (inference mode),
Rescaling, padding/cropping, dropout (identity at inference), Add/Subtract/
Concatenate/Average of tensors of the same affine stretch, adding or
multiplying by a constant, actswap's square and polynomial activations, and a
softmax as the very last operation (its input, the logits, is what is
decrypted and compared). Anything else is refused with
:class:`OutOfScopeError`, naming the layer and what to do.

Two TenSEAL facts the evaluator is built around (both measured on 0.3.18):

* ``CKKSVector.mm`` (the Halevi-Shoup diagonal method) reads the encrypted
  vector cyclically: an input of size n multiplied by an n x m matrix needs
  the slots to hold the vector repeated over n + m - 1 positions. Encryption
  repeats it over all slots, a product keeps the repetition one input length
  shorter, but ``add_plain``/``mul_plain`` of a plain *vector* write it once
  and zero the rest, which corrupts the next product (OpenMined/TenSEAL#462).
  So vector constants (biases, per-element coefficients) are encrypted once
  with the public key (encryption repeats them) and added or multiplied as
  ciphertexts; scalars stay plain. The slot count must cover
  ``sum(n_i - 1) + m`` over the chain of products (:func:`slots_needed`).
* after every rescale TenSEAL sets the ciphertext's scale back to 2^s although
  it divided by a prime q that is only close to 2^s, so every level multiplies
  the value by 2^s/q (0.3% per level for 27-bit primes). The factor of each
  level is measured once per context (:func:`_measure_drift`) and compensated
  exactly in the next plain matrix or scalar, so the logits keep the precision
  of the scale instead of losing a few percent.
"""

from __future__ import annotations

from .encrypted import HERunReport, run
from .readiness import Depth, HEReport, he_report

__all__ = ["Depth", "HEReport", "HERunReport", "he_report", "run"]
