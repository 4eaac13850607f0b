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
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PACKING = ("latency: one sample per ciphertext, matrix products by sparse generalized diagonals "
           "with baby-step giant-step rotations and folded partial sums (tenseal.sealapi)")

# Relative costs for the planner (measured at N=8192, level 0: a key switch ~9 ms,
# a plain product plus its addition ~0.7 ms, a plain encoding ~1.4 ms but cached).
_COST_KEY_SWITCH = 9.0
_COST_PRODUCT = 0.7

# A rotation (key switch) adds noise of ~6e-4 at scale 2^28 (N=8192, a 37-bit special
# prime): 20x the fresh encryption's. Products therefore rotate their input where its
# scale is high: before its last rescale when the input comes straight from a product
# (``_Vec.pre``), else lifted by an exact 2^BOOST_BITS with masks encoded that much
# lower. Measured relative logit errors on a small conv net (scale 2^28), boost 0, 4,
# 6, 8: 3e-4, 3.5e-5, 1.5e-4, 4.6e-4 (mask rounding takes over above 4); mm: 2e-5..8e-5.
BOOST_BITS = 4


def _naf_weight(k: int) -> int:
    """Non-zero digits of the non-adjacent form of ``k``: the key switches SEAL
    needs for a rotation by ``k`` with power-of-two Galois keys."""
    k, w = abs(k), 0
    while k:
        if k & 1:
            w += 1
            k += 1 if (k & 3) == 3 else -1  # digit -1 for ...11, +1 for ...01
        k >>= 1
    return w


def _rotation_cost(step: int, slots: int) -> int:
    step %= slots
    if step == 0:
        return 0
    signed = step - slots if step > slots // 2 else step
    return _naf_weight(signed)


@dataclass
class _BSGS:
    """How to apply the set of rotations ``rs``: ``r = g + b`` with ``b = r mod size``.
    Baby step ``b`` is computed from baby step ``parent[b]`` (a rotation by a power of
    two where possible: one key switch, and rotation noise adds up over a few steps
    only, not along a chain of all the baby steps)."""

    size: int
    baby: list[int]
    giant: list[int]
    parent: dict[int, int]
    key_switches: int


def _baby_tree(baby: list[int], slots: int) -> tuple[dict[int, int], int]:
    parent, depth, cost = {}, {0: 0}, 0
    for b in baby:
        if b == 0:
            continue
        options = [0] + [b - (1 << k) for k in range(b.bit_length()) if (b - (1 << k)) in depth]
        p = min(options, key=lambda q: (_rotation_cost(b - q, slots), depth[q]))
        parent[b] = p
        depth[b] = depth[p] + _rotation_cost(b - p, slots)
        cost += _rotation_cost(b - p, slots)
    return parent, cost


def _bsgs(rs: np.ndarray, slots: int) -> _BSGS:
    best: _BSGS | None = None
    limit = int(min(slots, max(2, 4 * math.isqrt(int(rs.max() - rs.min()) + 1) + 2)))
    for b_size in range(1, limit + 1):
        giant = np.unique(rs - rs % b_size)
        g_cost = sum(_rotation_cost(int(g), slots) for g in giant)
        if best is not None and g_cost >= best.key_switches:
            continue
        baby = [int(b) for b in np.unique(rs % b_size)]
        parent, b_cost = _baby_tree(baby, slots)
        if best is None or g_cost + b_cost < best.key_switches:
            best = _BSGS(b_size, baby, [int(g) for g in giant], parent, g_cost + b_cost)
    assert best is not None
    return best


@dataclass
class _Plan:
    """One matrix product for one input layout: masks per (giant, baby) pre-rotated,
    the fold (``fold`` partial sums ``period`` slots apart) and the output slots."""

    bsgs: _BSGS
    masks: dict[tuple[int, int], np.ndarray]  # (g, b) -> (slots,) float64
    period: int
    fold: int
    out_pos: np.ndarray
    cost: float
    encoded: dict[Any, dict[tuple[int, int], Any]] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{len(self.masks)} diagonals, {len(self.bsgs.baby)} baby x {len(self.bsgs.giant)} giant steps "
                f"({self.bsgs.key_switches} key switches), fold {self.fold} x {self.period}")


def plan_product(m: np.ndarray, in_pos: np.ndarray, slots: int) -> _Plan:
    """The cheapest packing of ``x @ m`` for ``x`` at slots ``in_pos``: outputs contiguous
    from slot 0 (before folding), fold period chosen by estimated cost."""
    n_in, n_out = m.shape
    if n_out > slots or in_pos.size != n_in or (n_in and (in_pos.min() < 0 or in_pos.max() >= slots)):
        raise ValueError(f"latency packing: a {n_in} x {n_out} product does not fit {slots} slots")
    rows, cols = np.nonzero(m)
    if rows.size == 0:  # an all-zero matrix: one zero mask
        rows, cols = np.zeros(1, int), np.zeros(1, int)
    vals = m[rows, cols]
    d = in_pos[rows].astype(np.int64) - cols.astype(np.int64)
    candidates = []
    period = 1 << max(0, (n_out - 1).bit_length())
    while period <= slots:
        if period == slots:
            f = np.zeros_like(d)
            r = d % slots
        else:
            f = np.floor_divide(d, period)
            r = d - f * period
        fold = 1 << int(f.max() - f.min()).bit_length() if f.max() > f.min() else 1
        if fold * period <= slots:
            rs = np.unique(r)
            bsgs = _bsgs(rs, slots)
            ks = bsgs.key_switches + int(math.log2(fold)) if fold > 1 else bsgs.key_switches
            cost = ks * _COST_KEY_SWITCH + len(rs) * _COST_PRODUCT
            candidates.append((cost, period, f, r, fold, bsgs))
        period *= 2
    cost, period, f, r, fold, bsgs = min(candidates, key=lambda c: c[0])
    fmin = int(f.min())
    partial = (cols + f * period) % slots  # slot of the partial sum of output cols
    masks: dict[tuple[int, int], np.ndarray] = {}
    for rv in np.unique(r):
        rv = int(rv)
        b = rv % bsgs.size
        g = rv - b
        sel = r == rv
        mask = np.zeros(slots)
        mask[partial[sel]] = vals[sel]
        masks[(g, b)] = np.roll(mask, g)  # pre-rotated by -g: rot(mask, -g)[s] = mask[s - g]
    out_pos = (np.arange(n_out) + fmin * period) % slots
    return _Plan(bsgs, masks, period, fold, out_pos, cost)


def slots_needed(program: Any) -> int:
    """Slots the latency packing needs: the largest vector of the program (every
    product can fall back to contiguous outputs with full-ring diagonals), where
    ``CKKSVector.mm`` needs ``sum(n_i - 1) + m`` over its chain
    (:func:`~.params.slots_needed`, an upper bound of this)."""
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
        b = self.backend
        pt = b.sa.Plaintext()
        b.decryptor.decrypt(self.ct, pt)
        return list(np.asarray(b.encoder.decode_double(pt))[self.pos])

    def serialize(self) -> bytes:
        fd, path = tempfile.mkstemp(suffix=".ct")
        os.close(fd)
        try:
            self.ct.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)


class LatencyBackend:
    """The :mod:`.evaluate` backend protocol on SEAL ciphertexts (see the module docstring).
    ``context`` is a TenSEAL CKKS context with a global scale, Galois and relinearization
    keys (``params.make_context``); ``drift`` is accepted for the protocol and replaced by
    the exact factors of the context's primes."""

    packing = PACKING

    def __init__(self, context: Any, drift: list[float] | None = None) -> None:
        from tenseal import sealapi as sa

        self.sa, self.context = sa, context
        seal = context.seal_context().data
        self.seal = seal
        self.evaluator = sa.Evaluator(seal)
        self.encoder = sa.CKKSEncoder(seal)
        self.slots = self.encoder.slot_count()
        self.scale = float(context.global_scale)
        self.galois = context.galois_keys().data
        self.relin = context.relin_keys().data
        self.encryptor = context.data.encryptor()
        self.decryptor = context.data.decryptor() if context.is_private() else None
        primes = [q.value() for q in seal.first_context_data().parms().coeff_modulus()]
        # The k-th rescale drops the k-th prime from the end.
        self._drift = [self.scale / q for q in primes[::-1][:-1]]
        self.plans: dict[bytes, _Plan] = {}
        self.boost_bits = BOOST_BITS
        self.stats: dict[str, int] = {"key_switches": 0, "products": 0}

    def drift(self, level: int) -> float:
        return self._drift[level - 1]

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
        pt = self.sa.Plaintext()
        v = values if isinstance(values, float) else np.asarray(values, "float64").tolist()
        self.encoder.encode(v, ct.parms_id(), self.scale if scale is None else scale, pt)
        return pt

    def _spread(self, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        full = np.zeros(self.slots)
        full[pos] = v
        return full

    def _rescale(self, ct: Any) -> Any:
        self.evaluator.rescale_to_next_inplace(ct)
        ct.scale = self.scale  # as TenSEAL: the 2^s/q factor is the evaluator's drift
        return ct

    def _rescaled(self, pre: Any, pos: np.ndarray) -> _Vec:
        """A _Vec from a product not yet rescaled, keeping the product as ``pre``."""
        out = self.sa.Ciphertext()
        self.evaluator.rescale_to_next(pre, out)
        out.scale = self.scale
        return _Vec(self, out, pos, pre)

    def _match(self, a: _Vec, b: _Vec) -> tuple[Any, Any]:
        if not np.array_equal(a.pos, b.pos):
            raise ValueError("latency backend: element-wise operation on two different layouts")
        ca, cb = a.ct, b.ct
        ia = self.seal.get_context_data(ca.parms_id()).chain_index()
        ib = self.seal.get_context_data(cb.parms_id()).chain_index()
        if ia > ib:
            ca = self._mod_switch(ca, cb.parms_id())
        elif ib > ia:
            cb = self._mod_switch(cb, ca.parms_id())
        return ca, cb

    def _mod_switch(self, ct: Any, parms_id: Any) -> Any:
        out = self.sa.Ciphertext()
        self.evaluator.mod_switch_to(ct, parms_id, out)
        return out

    def _rescale_copy(self, ct: Any) -> Any:
        out = self.sa.Ciphertext()
        self.evaluator.rescale_to_next(ct, out)
        out.scale = self.scale
        return out

    def _zero_like(self, x: _Vec, pos: np.ndarray) -> _Vec:
        """An encryption of zero one level below ``x`` (a product whose weights all
        round to zero at the mask scale)."""
        pt = self.sa.Plaintext()
        self.encoder.encode(0.0, x.ct.parms_id(), self.scale, pt)
        out = self.sa.Ciphertext()
        self.encryptor.encrypt(pt, out)
        return _Vec(self, self._rescale(self._times_one(out)), pos)

    def _times_one(self, ct: Any) -> Any:
        out = self.sa.Ciphertext()
        self.evaluator.multiply_plain(ct, self._encode(1.0, ct), out)
        return out

    def _rotate(self, ct: Any, step: int) -> Any:
        out = self.sa.Ciphertext()
        self.evaluator.rotate_vector(ct, int(step), self.galois, out)
        self.stats["key_switches"] += _rotation_cost(step, self.slots)
        return out

    # -- the protocol -----------------------------------------------------------------

    def encrypt(self, x: np.ndarray) -> _Vec:
        x = np.asarray(x, "float64").ravel()
        if x.size > self.slots:
            raise ValueError(f"latency backend: {x.size} values do not fit {self.slots} slots")
        pt = self.sa.Plaintext()
        self.encoder.encode(self._spread(x, np.arange(x.size)).tolist(), self.scale, pt)
        ct = self.sa.Ciphertext()
        self.encryptor.encrypt(pt, ct)
        return _Vec(self, ct, np.arange(x.size))

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
                    rotated[b] = self._rescale_copy(pre[b])
        elif rotating:
            x_ct = x.ct
            if boost:
                # Lift the input's scale by an exact 2^boost (a constant plaintext: every
                # coefficient times 2^boost, no rounding) so the baby steps' key-switching
                # noise is 2^-boost of the value's; the masks are encoded 2^boost lower.
                x_ct = self.sa.Ciphertext()
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
                t = self.sa.Ciphertext()
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
        out = self.sa.Ciphertext()
        self.evaluator.add_plain(x.ct, self._encode(self._spread(v, x.pos), x.ct, x.ct.scale), out)
        return _Vec(self, out, x.pos)

    def add_scalar(self, x: _Vec, c: float) -> _Vec:
        out = self.sa.Ciphertext()
        self.evaluator.add_plain(x.ct, self._encode(float(c), x.ct, x.ct.scale), out)
        return _Vec(self, out, x.pos)

    def mul_scalar(self, x: _Vec, c: float, level: int) -> _Vec:
        out = self.sa.Ciphertext()
        self.evaluator.multiply_plain(x.ct, self._encode(float(c), x.ct), out)
        return self._rescaled(out, x.pos)

    def mul_vector(self, x: _Vec, v: np.ndarray, key: Any, level: int) -> _Vec:
        out = self.sa.Ciphertext()
        self.evaluator.multiply_plain(x.ct, self._encode(self._spread(v, x.pos), x.ct), out)
        return self._rescaled(out, x.pos)

    def mul(self, a: _Vec, b: _Vec, level: int) -> _Vec:
        out = self.sa.Ciphertext()
        if a is b:
            self.evaluator.square(a.ct, out)
        else:
            ca, cb = self._match(a, b)
            self.evaluator.multiply(ca, cb, out)
        self.evaluator.relinearize_inplace(out, self.relin)
        return self._rescaled(out, a.pos)

    def add(self, a: _Vec, b: _Vec) -> _Vec:
        ca, cb = self._match(a, b)
        out = self.sa.Ciphertext()
        self.evaluator.add(ca, cb, out)
        return _Vec(self, out, a.pos)

    def neg(self, a: _Vec) -> _Vec:
        out = self.sa.Ciphertext()
        self.evaluator.negate(a.ct, out)
        return _Vec(self, out, a.pos)
