"""Exact arithmetic modulo SEAL's primes on numpy arrays: the public linear maps
batch mode applies to ciphertexts' data (issue 25).

A CKKS ciphertext at some level is ``parts`` polynomials, each held as its
residues modulo the level's primes, in NTT form: SEAL's ``(parts, primes, N)``
array of uint64, every entry below its prime. In that form SEAL's own
``multiply_plain`` by a plaintext that encodes the scalar ``w`` at scale 2^s
multiplies every entry modulo q by ``W mod q``, where ``W = round(w 2^s)`` (its
``CKKSEncoder`` encodes a scalar as that integer in every NTT slot), and
``add_plain`` of the scalar ``c`` adds ``round(c 2^s) mod q`` to part 0. A sum of
such products over a batch's ciphertexts is therefore, per prime, one integer
matrix product ``Y = Wᵀ X mod q`` (:class:`ModularMatrix`), and its result is
bit for bit what SEAL's products and additions give (tests check that).

Exactness: float64 holds integers up to 2^53 exactly, so residues (up to 60
bits) are cut into signed digits (:func:`plan`) small enough that every sum of
products BLAS forms stays below 2^53, whatever its order; digit products are
recombined modulo q with Shoup's multiplication by a constant (:func:`mulmod`),
which needs only 64-bit integer arithmetic. Nothing here reads keys or
randomness: the inputs are ciphertext data and public weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


EXACT = 2.0**52  # partial sums stay below this: float64 holds them exactly, and a
# float quotient estimate (:func:`_fred`) leaves an exact remainder
MASK32 = np.uint64(0xFFFFFFFF)


# --- encoding (what SEAL's CKKSEncoder does with a scalar) -------------------------

def encode(values: Any, scale: float) -> np.ndarray:
    """``round(value * scale)`` as SEAL computes it (C's ``round``: halves away from
    zero), as exact integer-valued float64."""
    v = np.asarray(values, "float64") * scale
    a = np.abs(v)
    r = np.floor(a)
    r += (a - r) >= 0.5  # a - r is exact below 2^52; above, a is an integer already
    return np.copysign(r, v)


def residues(ints: np.ndarray, q: int) -> np.ndarray:
    """Integer-valued float64 ``ints`` modulo ``q``, as uint64 in [0, q): exact for any
    magnitude (SEAL encodes large values by decomposing the double)."""
    ints = np.asarray(ints, "float64")
    out = np.empty(ints.shape, np.uint64)
    small = np.abs(ints) < 2.0**62
    out[small] = (ints[small].astype(np.int64) % np.int64(q)).astype(np.uint64)
    if not small.all():
        out[~small] = [int(v) % q for v in ints[~small]]  # float -> int is exact
    return out


# --- arithmetic modulo one prime -----------------------------------------------------

def shoup(t: Any, q: int) -> np.ndarray:
    """Shoup's precomputed quotient ``floor(t 2^64 / q)`` for constants ``t`` < q."""
    t = np.asarray(t, np.uint64)
    return np.array([(int(v) << 64) // q for v in t.ravel()], np.uint64).reshape(t.shape)


def _mulhi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The high 64 bits of the 128-bit products ``a * b`` (uint64), from 32-bit halves."""
    a_lo, a_hi = a & MASK32, a >> np.uint64(32)
    b_lo, b_hi = b & MASK32, b >> np.uint64(32)
    lo_hi, hi_lo = a_lo * b_hi, a_hi * b_lo
    mid = ((a_lo * b_lo) >> np.uint64(32)) + (lo_hi & MASK32) + (hi_lo & MASK32)
    return a_hi * b_hi + (lo_hi >> np.uint64(32)) + (hi_lo >> np.uint64(32)) + (mid >> np.uint64(32))


def mulmod(a: np.ndarray, t: Any, t_shoup: Any, q: int) -> np.ndarray:
    """``a * t mod q`` for uint64 ``a`` < 2^64 and constants ``t`` < q < 2^63 (broadcast),
    ``t_shoup`` = :func:`shoup` (t, q): the remainder ``a t - floor(a t'/2^64) q`` lies
    in [0, 2q) and is computed modulo 2^64."""
    a = np.asarray(a, np.uint64)
    t, t_shoup, qq = np.asarray(t, np.uint64), np.asarray(t_shoup, np.uint64), np.uint64(q)
    r = a * t - _mulhi(a, t_shoup) * qq
    return np.where(r >= qq, r - qq, r)


def addmod(a: np.ndarray, b: np.ndarray, q: Any) -> np.ndarray:
    """``(a + b) mod q`` for a, b in [0, q) (q < 2^63, or uint64 primes broadcast
    against them: the sum does not wrap)."""
    q = np.asarray(q, np.uint64)
    s = a + b
    s -= (s >= q) * q
    return s


def negmod(a: np.ndarray, q: Any) -> np.ndarray:
    """``-a mod q`` for a in [0, q) (q broadcast as in :func:`addmod`)."""
    q = np.asarray(q, np.uint64)
    return (a != 0) * (q - a)


def centered(a: np.ndarray, q: int) -> np.ndarray:
    """Residues in [0, q) as int64 in (-q/2, q/2]."""
    s = a.astype(np.int64)
    return np.where(a > np.uint64(q // 2), s - np.int64(q), s)


def digits(v: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Signed base-2^bits digits of int64 ``v``: ``count`` arrays d_i with
    ``v = sum d_i 2^(i bits)`` and |d_i| <= 2^(bits - 1), as float64 (count, *v.shape)."""
    out = np.empty((count,) + v.shape, "float64")
    half, base = np.int64(1 << (bits - 1)), np.int64(1 << bits)
    for i in range(count - 1):
        d = ((v + half) & (base - 1)) - half
        out[i] = d
        v = (v - d) >> np.int64(bits)
    out[count - 1] = v
    return out


@dataclass(frozen=True)
class Digits:
    """How one prime's product is cut: data into ``nx`` digits of ``bx`` bits, weights
    into ``nw`` of ``bw``; cost is proportional to ``nx * nw``."""

    nx: int
    bx: int
    nw: int
    bw: int


def plan(q: int, inner: int) -> Digits:
    """The cheapest digit split for residues mod ``q`` in sums of ``inner`` products,
    such that every partial sum stays below :data:`EXACT`: ``inner * 2^b * 2^(bw-1)``
    for data taken whole (``nx`` = 1: residues in [0, q), not centred) and
    ``nx * inner * 2^(bx-1) * 2^(bw-1)`` for data cut into centred digits. Centred
    residues have magnitude < 2^(b-1), so ``count * bits >= b`` signed digits hold
    them, the last within 2^(bits-1)."""
    b = q.bit_length()
    best = None
    for nx in range(1, 13):
        for nw in range(1, 13):
            bx, bw = -(-b // nx), -(-b // nw)
            data = 2.0**b if nx == 1 else nx * 2.0 ** (bx - 1)
            if inner * data * 2.0 ** (bw - 1) >= EXACT:
                continue
            if best is None or nx * nw < best.nx * best.nw:
                best = Digits(nx, bx, nw, bw)
    if best is None:
        raise ValueError(f"no exact digit split for a {b}-bit prime over {inner} products")
    return best


# --- matrix products over ciphertext data --------------------------------------------

# A block of columns is grown while its dense product does at most this much more
# work than its non-zero weights (a convolution's neighbouring outputs share most
# of their inputs; a dense layer is one block).
BLOCK_SLACK = 1.5

# Data is cut along the coefficients into pieces of at most this many residues (a
# piece's digits, and its output sums), so that they stay in cache through the
# passes over them: 2^17 float64 is 1 MB.
PIECE = 1 << 20


def blocks(nonzero: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive columns of a (rows, columns) non-zero mask grouped into blocks
    ``(rows, columns)``: a block's rows are the union of its columns' rows, and it
    grows while ``len(rows) * len(columns) <= BLOCK_SLACK * nnz`` (all-zero columns
    are left out)."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    cols: list[int] = []
    union = np.zeros(nonzero.shape[0], bool)
    nnz = 0
    for j in range(nonzero.shape[1]):
        col = nonzero[:, j]
        n = int(col.sum())
        if n == 0:
            continue
        grown = union | col
        if cols and grown.sum() * (len(cols) + 1) > BLOCK_SLACK * (nnz + n):
            out.append((np.flatnonzero(union), np.array(cols)))
            cols, union, nnz, grown = [], np.zeros_like(union), 0, col.copy()
        cols.append(j)
        union, nnz = grown, nnz + n
    if cols:
        out.append((np.flatnonzero(union), np.array(cols)))
    return out


class ModularMatrix:
    """``x @ m`` on ciphertext data, exactly as SEAL's per-scalar ``multiply_plain``
    and ``add`` compute it: the weights ``m`` (n_in, n_out) encoded at ``scale`` as
    SEAL encodes scalars, then per prime ``q`` of ``primes`` (a level's, in SEAL's
    order) and per block of columns, ``sum_i W[i, j] x[i] mod q``.

    Invariant: the result is bit-identical to SEAL's. The weights' residues and
    digits are computed here once; the data's per call, piece by piece."""

    def __init__(self, m: np.ndarray, scale: float, primes: list[int]) -> None:
        ints = encode(m, scale)
        self.shape = ints.shape
        self.primes = list(primes)
        self.zero_columns = np.flatnonzero(~(ints != 0).any(axis=0))
        self.blocks = blocks(ints != 0)
        inner = max((len(rows) for rows, _ in self.blocks), default=1)
        self.plans = [plan(q, inner) for q in self.primes]
        # Per block, per prime: the weights' digits with the data's digit shifts folded
        # in (W 2^(a bx) mod q, cut into nw digits), as (nw, n_cols, nx * rows).
        self._weights: list[list[np.ndarray]] = []
        for rows, cols in self.blocks:
            sub = ints[np.ix_(rows, cols)]
            per_prime = []
            for q, d in zip(self.primes, self.plans):
                w = np.concatenate(_folded_digits(sub, q, d), axis=1)  # (nw, nx * rows, cols)
                per_prime.append(np.ascontiguousarray(w.transpose(0, 2, 1)))
            self._weights.append(per_prime)

    def apply(self, x: np.ndarray, out: np.ndarray, columns: np.ndarray | None = None) -> None:
        """``out[k] = sum_i W[i, c_k] x[i]`` for the output columns ``c_k`` in
        ``columns`` (default all; zero columns give zeros); ``x`` (n_in, parts, L, N)
        uint64 with L <= len(primes) (the level's first L primes), ``out``
        (len(columns), parts, L, N) uint64."""
        columns = np.arange(self.shape[1]) if columns is None else np.asarray(columns)
        where = np.full(self.shape[1], -1)
        where[columns] = np.arange(len(columns))
        out[...] = 0
        parts, L, N = x.shape[1:]
        chosen = []  # (block, positions of its columns asked for, their positions in out)
        for b, (rows, cols) in enumerate(self.blocks):
            k = np.flatnonzero(where[cols] >= 0)
            if k.size:
                chosen.append((b, k, where[cols[k]]))
        if not chosen:
            return
        needed = np.unique(np.concatenate([self.blocks[b][0] for b, _, _ in chosen]))
        local = np.full(self.shape[0], -1)
        local[needed] = np.arange(len(needed))
        # Blocks of one shape go through one stacked product (a convolution's are mostly
        # alike), written straight into their rows of the sums: columns in group order.
        shapes: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for b, k, dest in chosen:
            shapes.setdefault((len(self.blocks[b][0]), len(k)), []).append((b, k, dest))
        order = np.concatenate([dest for group in shapes.values() for _, _, dest in group])
        widest = max(len(needed), len(columns))
        step = int(min(N, max(256, 1 << int(np.log2(max(1, PIECE // widest))))))
        for l in range(L):
            q, d = self.primes[l], self.plans[l]
            groups, at = [], 0
            for group in shapes.values():
                rows = np.stack([local[self.blocks[b][0]] for b, _, _ in group])  # (G, rows)
                w = np.stack([self._weights[b][l][:, k] for b, k, _ in group], axis=1)  # (nw, G, cols, nx rows)
                whole = len(group) == 1 and rows.shape[1] == len(needed)  # a dense layer: no gather
                groups.append((None if whole else rows, w, at))
                at += w.shape[1] * w.shape[2]
            for p in range(parts):
                for n0 in range(0, N, step):
                    n1 = min(N, n0 + step)
                    xd = _data_digits(x[needed, p, l, n0:n1], q, d)  # (nx, len(needed), n1 - n0)
                    sums = np.empty((d.nw, len(order), n1 - n0))
                    for rows, w, at in groups:
                        if rows is None:
                            xb = xd.reshape(1, -1, n1 - n0)
                        else:  # (G, nx * rows, piece)
                            xb = xd[:, rows].transpose(1, 0, 2, 3).reshape(len(rows), -1, n1 - n0)
                        span = slice(at, at + w.shape[1] * w.shape[2])
                        for c in range(d.nw):
                            np.matmul(w[c], xb, out=sums[c, span].reshape(w.shape[1], w.shape[2], n1 - n0))
                    out[order, p, l, n0:n1] = _combine(sums, q, d)


def _folded_digits(ints: np.ndarray, q: int, d: Digits) -> list[np.ndarray]:
    """Integer weights ``ints`` (rows, cols) modulo ``q`` with each data digit's shift
    folded in (``W 2^(a bx) mod q``, a < nx), each cut into ``nw`` centred digits:
    ``nx`` arrays (nw, rows, cols)."""
    r = residues(ints, q)
    out = []
    for a in range(d.nx):
        t = pow(2, a * d.bx, q)
        out.append(digits(centered(mulmod(r, t, shoup(t, q), q), q), d.bw, d.nw))
    return out


def _data_digits(x: np.ndarray, q: int, d: Digits) -> np.ndarray:
    """Residues ``x`` (uint64) as float64 (nx, *x.shape): whole when ``d.nx`` is 1,
    else centred and cut into signed digits of ``d.bx`` bits (in float arithmetic
    where it is exact)."""
    if d.nx == 1:  # taken whole, in [0, q) (see plan)
        return x.view(np.int64).astype("float64")[None]  # below 2^52 by plan; a fast cast
    if q >= 1 << 52:
        return digits(centered(x, q), d.bx, d.nx)
    v = x.view(np.int64).astype("float64")  # residues < 2^52: exact
    v -= (v > q // 2) * float(q)  # arithmetic, not np.where: several times faster
    out = np.empty((d.nx,) + x.shape)
    base, inv = 2.0**d.bx, 2.0**-d.bx
    for i in range(d.nx - 1):
        hi = np.rint(v * inv)
        out[i] = v - hi * base
        v = hi
    out[d.nx - 1] = v
    return out


def _loose(v: np.ndarray, q: int) -> np.ndarray:
    """Integer-valued float64 ``v`` (|v| < 2^53 - q) minus its nearest multiple of
    ``q`` (< 2^51), in place: in (-q, q) (the float quotient ``v / q`` is off by
    less than 2^-24 of a unit, so the nearest multiple is missed only by one, next
    to a half; ``q * round(v / q)`` and the difference are exact below 2^53)."""
    t = v * (1.0 / q)
    np.rint(t, out=t)
    t *= q
    v -= t
    return v


def _combine(sums: np.ndarray, q: int, d: Digits) -> np.ndarray:
    """``sum_c sums[c] 2^(c bw) mod q`` as uint64 in [0, q), for exact integer sums
    (|sums| < 2^52). Below 2^51, Horner's rule in floats: each step multiplies a
    residue by at most 2^(51 - b), so with a sum below 2^52 added the value stays
    below 2^53 - q, where :func:`_loose` is exact."""
    b = q.bit_length()
    if b <= 50:
        shift = 51 - b
        acc = _loose(sums[-1], q)
        for c in range(d.nw - 2, -1, -1):
            for k in range(0, d.bw, shift):
                acc *= 2.0 ** min(shift, d.bw - k)
                if k + shift >= d.bw:
                    acc += sums[c]
                _loose(acc, q)
        acc += (acc < 0) * float(q)
        return acc.astype(np.int64).view(np.uint64)
    acc = sums[-1].astype(np.int64) % np.int64(q)
    t = pow(2, d.bw, q)
    for c in range(d.nw - 2, -1, -1):
        r = sums[c].astype(np.int64) % np.int64(q)
        acc = addmod(mulmod(acc.astype(np.uint64), t, shoup(t, q), q), r.astype(np.uint64), q).astype(np.int64)
    return acc.astype(np.uint64)


class RowSums:
    """``sum_i W[i, j] x[i] mod q`` over rows that arrive in chunks (products made a
    chunk at a time and then dropped): exact float64 sums of digit products are
    kept per output (their bound is planned for all the rows, so adding chunks
    never leaves float64's exact range) and reduced once, by :meth:`result`.
    Dense in the columns: for a layer whose every output reads most inputs.
    Holds ``primes x nw x n_out x parts x N`` float64."""

    def __init__(self, m: np.ndarray, scale: float, primes: list[int], shape: tuple[int, int],
                 sums: list[np.ndarray] | None = None, weights: Any = None) -> None:
        """``shape`` is (parts, N); ``sums``, arrays of :meth:`sums_shapes` to keep the
        sums in (zeroed here), else new ones; ``weights``, :meth:`weights` of the same
        ``m``, ``scale`` and ``primes`` (else computed here)."""
        self.primes, self.shape = list(primes), shape  # shape: (parts, N)
        self.plans, self._weights = weights if weights is not None else self.weights(m, scale, primes)
        self.sums = sums if sums is not None else [np.empty(s) for s in self.sums_shapes(m, primes, shape)]
        for s in self.sums:
            s[...] = 0.0

    @staticmethod
    def weights(m: np.ndarray, scale: float, primes: list[int]) -> tuple[list[Digits], list[np.ndarray]]:
        """Per prime, the digit plan and the weights' digits with the data's digit
        shifts folded in, as (nw, n_out, nx, rows)."""
        ints = encode(m, scale)
        plans = [plan(q, ints.shape[0]) for q in primes]
        out = []
        for q, d in zip(primes, plans):
            per_shift = _folded_digits(ints, q, d)  # each (nw, rows, n_out)
            out.append(np.ascontiguousarray(np.stack(per_shift, axis=1).transpose(0, 3, 1, 2)))
        return plans, out

    @staticmethod
    def sums_shapes(m: np.ndarray, primes: list[int], shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """The float64 arrays the sums take, per prime: (nw, n_out, parts x N)."""
        parts, n = shape[0], shape[-1]
        return [(plan(q, m.shape[0]).nw, m.shape[1], parts * n) for q in primes]

    def add(self, x: np.ndarray, start: int) -> None:
        """Add rows ``start .. start + len(x)`` of the product: ``x`` (rows, parts, L, N)."""
        rows, parts, L, N = x.shape
        n_out = self.sums[0].shape[1]
        step = int(min(N, max(256, 1 << int(np.log2(max(1, PIECE // max(rows, n_out)))))))
        tmp = np.empty((n_out, step))
        for l in range(L):
            q, d = self.primes[l], self.plans[l]
            w = self._weights[l][:, :, :, start:start + rows].reshape(d.nw, n_out, d.nx * rows)
            for p in range(parts):
                for n0 in range(0, N, step):
                    n1 = min(N, n0 + step)
                    xd = _data_digits(x[:, p, l, n0:n1], q, d).reshape(d.nx * rows, n1 - n0)
                    for c in range(d.nw):
                        t = np.matmul(w[c], xd, out=tmp[:, :n1 - n0])
                        self.sums[l][c, :, p * N + n0:p * N + n1] += t

    def result(self, out: np.ndarray) -> None:
        """The sums modulo each prime into ``out`` (n_out, parts, L, N) uint64."""
        parts, N = self.shape
        for l, (q, d) in enumerate(zip(self.primes, self.plans)):
            s = self.sums[l].reshape(d.nw, -1, parts, N)
            for p in range(parts):
                for n0 in range(0, N, 1024):
                    out[:, p, l, n0:n0 + 1024] = _combine(s[:, :, p, n0:n0 + 1024].copy(), q, d)
