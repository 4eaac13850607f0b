"""Planning a matrix product on one ciphertext by sparse generalized diagonals
(latency mode, :mod:`.latency`): which rotations, which masks, which fold.

Pure numpy, no encryption: ``plan_product(m, in_pos, slots)`` says how
``x @ m`` is computed for ``x`` held at slots ``in_pos`` of one ciphertext:
the non-zeros of ``m`` grouped by the rotation they need (one plain mask and
one plain product each), the rotations split into baby and giant steps
(about 2 sqrt(#diagonals) key switches instead of #diagonals), and for
products with few outputs the partial sums folded ``period`` slots apart.
Invariant (tested against numpy): applying the plan's masks and rotations to
any vector laid out at ``in_pos`` gives ``x @ m`` at the plan's ``out_pos``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Relative costs for the planner (measured at N=8192, level 0: a key switch ~9 ms,
# a plain product plus its addition ~0.7 ms, a plain encoding ~1.4 ms but cached).
_COST_KEY_SWITCH = 9.0
_COST_PRODUCT = 0.7


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
