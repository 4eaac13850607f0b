"""Batch mode's shared memory and forked processes (actswap.he.forks)."""

from __future__ import annotations

import numpy as np
import pytest

from actswap.he import forks


def test_arena_never_hands_out_memory_an_array_or_view_still_uses():
    arena = forks.Arena()
    a = arena.empty((1000,))
    a[...] = 7
    view = a[10:20]
    del a
    b = arena.empty((1000,))  # the first mapping is still used by the view
    b[...] = 9
    assert np.all(view == 7)
    del view, b
    arena.empty((500,))  # now free: reused, no new mapping
    assert len(arena._maps) == 2 and arena.nbytes == 2 * 8192


def test_arena_reuses_free_mappings_across_batches_without_growing():
    arena = forks.Arena()
    sizes = [(784, 64), (980, 64), (100, 64)]
    for _ in range(3):  # three "batches" allocating the same sizes in the same order
        held = [arena.empty(s) for s in sizes]
        for h in held:
            h[...] = 1
        del held, h
    assert arena.nbytes <= sum(int(np.prod(s)) * 8 for s in sizes) + len(sizes) * forks.PAGE


def test_parallel_shares_the_work_and_children_write_into_the_arena():
    arena = forks.Arena()
    out = arena.empty((10,))
    out[...] = 0

    def work(lo: int, hi: int, slot: int) -> None:
        out[lo:hi] = np.arange(lo, hi) * 10 + slot

    forks.parallel(10, work, 3)
    bounds = forks.shares(10, 3)
    expected = np.concatenate([np.arange(bounds[k], bounds[k + 1]) * 10 + k for k in range(3)])
    assert np.array_equal(out, expected)


def test_a_failing_child_fails_the_operation():
    def work(lo: int, hi: int, slot: int) -> None:
        if slot == 1:
            raise ValueError("child failed")

    with pytest.raises(RuntimeError, match="1 of the 2 processes"):
        forks.parallel(4, work, 2)
