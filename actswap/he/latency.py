"""Latency mode: one sample per ciphertext, evaluated with few rotations.

``CKKSVector.mm`` (TenSEAL's Halevi-Shoup product) rotates the ciphertext once
per input element, each rotation by an arbitrary step (several key switches
with the power-of-two Galois keys): 1,864 rotations, ~55 s per MNIST digit on
the CryptoNets fixture. TenSEAL ships SEAL's own evaluator as
``tenseal.sealapi`` (rotations, plain products, rescaling on the very
ciphertexts of a TenSEAL context), and this module evaluates a
:class:`~.program.Program` with it, behind the same backend protocol as the
other backends of :mod:`.evaluate`:

* **sparse generalized diagonals** (the packing, :data:`PACKING`): a vector
  lives in known slots of one ciphertext (its layout; other slots may hold
  garbage, they are never read unmasked). ``y = x @ M`` groups the non-zeros
  ``M[i, j]`` by the rotation ``r = slot(x_i) - slot(partial of y_j)`` they
  need; each distinct ``r`` is one plain mask and one plain product, so a
  convolution or a dense layer costs its non-zero diagonals only, never one
  rotation per input.
* **baby-step giant-step**: ``r = g + b``; the baby rotations of the input
  are built as a tree of power-of-two steps (one key switch each), the masks are
  pre-rotated by ``-g``, and each giant step rotates one inner sum, so the
  rotations are about 2 sqrt(#diagonals) instead of #diagonals.
* **folding** (for layers with few outputs, e.g. 980 -> 100): output ``j``
  is accumulated in ``F`` partial sums ``M`` slots apart (``r`` is taken mod
  ``M``, a power of two >= the output count), so only ``M`` diagonals exist;
  ``log2 F`` rotations by powers of two sum the partials (before the rescale).
  The planner picks ``M`` per product from an estimated cost.
* rotation noise: ``mm`` multiplies then rotates (at scale 2^2s, where key
  switching noise is negligible); baby steps rotate the input, so they do it
  before the input's last rescale when it comes straight from a product (the
  fixture's squares), else after lifting it by an exact 2^:data:`BOOST_BITS`.
  The logits keep ``mm``'s precision (relative error ~3e-5 on the fixture).
* one rescale per product (not per diagonal); after every rescale the scale
  is set back to the context's global scale exactly as TenSEAL does, so the
  evaluator's per-level drift compensation (:mod:`actswap.he`) holds as is;
  the drift factors are the exact ``2^s / q`` of the context's primes.

Everything runs in the calling thread: ``tenseal.sealapi`` holds the GIL (two
Python threads rotating: 0.26 s for what one does in 0.18 s), and a TenSEAL
context's ``n_threads`` did not speed ``mm`` up on the 2 shared cores (100x10:
2.1 s with 1 thread, 3.6 s with 2). Figures from the fixture: 85 key switches
and 486 plain products per digit, ~1.0-1.3 s, against ~1,864 rotations and
55-85 s with ``mm``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from .diagonals import _Plan, _rotation_cost, plan_product
from .seal import Seal

PACKING = ("latency: one sample per ciphertext, matrix products by sparse generalized diagonals "
           "with baby-step giant-step rotations and folded partial sums (tenseal.sealapi)")

# A rotation (key switch) adds noise of ~6e-4 at scale 2^28 (N=8192, a 37-bit special
# prime): 20x the fresh encryption's. Products therefore rotate their input where its
# scale is high: before its last rescale when the input comes straight from a product
# (``_Vec.pre``), else lifted by an exact 2^BOOST_BITS with masks encoded that much
# lower. Measured relative logit errors on a small conv net (scale 2^28), boost 0, 4,
# 6, 8: 3e-4, 3.5e-5, 1.5e-4, 4.6e-4 (mask rounding takes over above 4); mm: 2e-5..8e-5.
BOOST_BITS = 4


def slots_needed(program: Any) -> int:
    """Slots the latency packing needs: the largest vector of the program (every
    product can fall back to contiguous outputs with full-ring diagonals), where
    ``CKKSVector.mm`` needs ``sum(n_i - 1) + m`` over its chain
    (:func:`~.tenseal_mm.slots_needed`, an upper bound of this)."""
    from .program import Affine

    sizes = [program.input_size] + [s.matrix.shape[1] for s in program.stages if isinstance(s, Affine)]
    return max(sizes)


class _Vec:
    """A sample in latency layout: one SEAL ciphertext and the slot of each element.
    ``decrypt()`` and ``serialize()`` as a TenSEAL vector's."""

    def __init__(self, backend: LatencyBackend, ct: Any, pos: np.ndarray, pre: Any = None) -> None:
        # pre: the same value before its last rescale (scale ~2^2s), while nothing else
        # touched it: a product rotates it there, where key switching adds 2^-s noise.
        self.backend, self.ct, self.pos, self.pre = backend, ct, pos, pre

    def decrypt(self) -> list[float]:
        return list(np.asarray(self.backend.decrypt(self.ct))[self.pos])

    def serialize(self) -> bytes:
        return self.backend.serialize(self.ct)


class LatencyBackend(Seal):
    """The :mod:`.evaluate` backend protocol on SEAL ciphertexts (see the module docstring).
    ``context`` is a TenSEAL CKKS context with a global scale, Galois and relinearization
    keys (``params.make_context``); the drift of each level comes from its primes (:class:`~.seal.Seal`)."""

    packing = PACKING

    def __init__(self, context: Any, encryption: str | None = None) -> None:
        super().__init__(context, encryption)
        self.plans: dict[bytes, _Plan] = {}
        self.boost_bits = BOOST_BITS
        self.stats: dict[str, int] = {"key_switches": 0, "products": 0}

    def note(self, level: int, value: Any) -> None:
        pass

    def prepare(self, program: Any) -> LatencyBackend:
        """Plan every product of ``program`` and encode its masks (one-off work that
        would otherwise fall on the first sample: ~3 s on the CryptoNets fixture) by
        evaluating it once on an encrypted zero sample. Returns the backend."""
        from .evaluate import _evaluate

        _evaluate(program, self, np.zeros(program.input_size))
        return self

    def describe(self) -> list[str]:
        """The packing of each product planned so far, in evaluation order."""
        return [p.describe() for p in self.plans.values()]

    # -- encoding helpers -------------------------------------------------------------

    def _encode(self, values: Any, ct: Any, scale: float | None = None) -> Any:
        v = values if isinstance(values, float) else np.asarray(values, "float64").tolist()
        return self.plain(v, ct.parms_id(), scale)

    def _spread(self, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        full = np.zeros(self.slots)
        full[pos] = v
        return full

    def _rescaled(self, pre: Any, pos: np.ndarray) -> _Vec:
        """A _Vec from a product not yet rescaled, keeping the product as ``pre``."""
        return _Vec(self, self.rescaled(pre), pos, pre)

    def _match(self, a: _Vec, b: _Vec) -> tuple[Any, Any]:
        if not np.array_equal(a.pos, b.pos):
            raise ValueError("latency backend: element-wise operation on two different layouts")
        return self.aligned(a.ct, b.ct)

    def _zero_like(self, x: _Vec, pos: np.ndarray) -> _Vec:
        """An encryption of zero one level below ``x`` (a product whose weights all
        round to zero at the mask scale)."""
        out = self.new()
        self.encryptor.encrypt(self.plain(0.0, x.ct.parms_id()), out)
        return _Vec(self, self.rescale(self._times_one(out)), pos)

    def _times_one(self, ct: Any) -> Any:
        out = self.new()
        self.evaluator.multiply_plain(ct, self._encode(1.0, ct), out)
        return out

    def _rotate(self, ct: Any, step: int) -> Any:
        self.stats["key_switches"] += _rotation_cost(step, self.slots)
        return self.rotate(ct, step)

    # -- the protocol -----------------------------------------------------------------

    def encrypt(self, x: np.ndarray) -> _Vec:
        x = np.asarray(x, "float64").ravel()
        if x.size > self.slots:
            raise ValueError(f"latency backend: {x.size} values do not fit {self.slots} slots")
        return _Vec(self, super().encrypt(self._spread(x, np.arange(x.size)).tolist()), np.arange(x.size))

    def plan(self, m: np.ndarray, in_pos: np.ndarray) -> _Plan:
        key = hashlib.blake2b(np.ascontiguousarray(m).tobytes() + bytes(str(m.shape), "ascii")
                              + np.ascontiguousarray(in_pos, np.int64).tobytes(), digest_size=16).digest()
        if key not in self.plans:
            self.plans[key] = plan_product(np.asarray(m, "float64"), np.asarray(in_pos), self.slots)
        return self.plans[key]

    def matmul(self, x: _Vec, m: np.ndarray, level: int) -> _Vec:
        if m.shape[0] != x.pos.size:
            raise ValueError(f"latency backend: a {m.shape} matrix for a vector of {x.pos.size}")
        plan = self.plan(m, x.pos)
        ev = self.evaluator
        pid = tuple(x.ct.parms_id())
        rotating = len(plan.bsgs.baby) > 1
        boost = self.boost_bits if rotating and x.pre is None else 0
        encoded = plan.encoded.get((pid, boost))
        if encoded is None:
            mask_scale = self.scale / 2.0**boost
            encoded = {}
            for k, v in plan.masks.items():
                pt = self._encode(v, x.ct, mask_scale)
                if not pt.is_zero():  # weights below the mask scale's resolution
                    encoded[k] = pt
            plan.encoded[(pid, boost)] = encoded
        rotated: dict[int, Any] = {0: x.ct}
        if rotating and x.pre is not None:
            # Baby steps on the input before its rescale, then each rescaled.
            pre = {0: x.pre}
            for b in plan.bsgs.baby:
                if b:
                    p = plan.bsgs.parent[b]
                    pre[b] = self._rotate(pre[p], b - p)
                    rotated[b] = self.rescaled(pre[b])
        elif rotating:
            x_ct = x.ct
            if boost:
                # Lift the input's scale by an exact 2^boost (a constant plaintext: every
                # coefficient times 2^boost, no rounding) so the baby steps' key-switching
                # noise is 2^-boost of the value's; the masks are encoded 2^boost lower.
                x_ct = self.new()
                self.evaluator.multiply_plain(x.ct, self._encode(1.0, x.ct, 2.0**boost), x_ct)
            rotated[0] = x_ct
            for b in plan.bsgs.baby:
                if b:
                    p = plan.bsgs.parent[b]
                    rotated[b] = self._rotate(rotated[p], b - p)
        total = None
        for g in plan.bsgs.giant:
            inner = None
            for (gg, b), pt in encoded.items():
                if gg != g:
                    continue
                t = self.new()
                ev.multiply_plain(rotated[b], pt, t)
                self.stats["products"] += 1
                if inner is None:
                    inner = t
                else:
                    ev.add_inplace(inner, t)
            if inner is None:
                continue
            if g % self.slots:
                inner = self._rotate(inner, g)
            if total is None:
                total = inner
            else:
                ev.add_inplace(total, inner)
        if total is None:  # every weight rounds to zero
            return self._zero_like(x, plan.out_pos)
        # Fold before the rescale: at scale 2^2s the rotations' key-switching noise
        # is 2^-s of the value's, after it the noise would be at the value's scale.
        step = plan.period
        for _ in range(int(math.log2(plan.fold))):
            ev.add_inplace(total, self._rotate(total, step))
            step *= 2
        return self._rescaled(total, plan.out_pos)

    def add_vector(self, x: _Vec, v: np.ndarray, key: Any) -> _Vec:
        out = self.new()
        self.evaluator.add_plain(x.ct, self._encode(self._spread(v, x.pos), x.ct, x.ct.scale), out)
        return _Vec(self, out, x.pos)

    def add_scalar(self, x: _Vec, c: float) -> _Vec:
        out = self.new()
        self.evaluator.add_plain(x.ct, self._encode(float(c), x.ct, x.ct.scale), out)
        return _Vec(self, out, x.pos)

    def mul_scalar(self, x: _Vec, c: float, level: int) -> _Vec:
        out = self.new()
        self.evaluator.multiply_plain(x.ct, self._encode(float(c), x.ct), out)
        return self._rescaled(out, x.pos)

    def mul_vector(self, x: _Vec, v: np.ndarray, key: Any, level: int) -> _Vec:
        out = self.new()
        self.evaluator.multiply_plain(x.ct, self._encode(self._spread(v, x.pos), x.ct), out)
        return self._rescaled(out, x.pos)

    def mul(self, a: _Vec, b: _Vec, level: int) -> _Vec:
        out = self.new()
        if a is b:
            self.evaluator.square(a.ct, out)
        else:
            ca, cb = self._match(a, b)
            self.evaluator.multiply(ca, cb, out)
        self.evaluator.relinearize_inplace(out, self.relin)
        return self._rescaled(out, a.pos)

    def add(self, a: _Vec, b: _Vec) -> _Vec:
        ca, cb = self._match(a, b)
        out = self.new()
        self.evaluator.add(ca, cb, out)
        return _Vec(self, out, a.pos)

    def neg(self, a: _Vec) -> _Vec:
        out = self.new()
        self.evaluator.negate(a.ct, out)
        return _Vec(self, out, a.pos)
