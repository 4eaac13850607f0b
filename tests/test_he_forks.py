"""Batch mode's shared memory and the processes that share its operations (actswap.he.forks)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from actswap.he import forks


def test_arena_never_hands_out_memory_an_array_or_view_still_uses():
    arena = forks.Arena()
    a = arena.empty((1000,))
    a[...] = 7
    view = a[10:20]
    del a
    b = arena.empty((1000,))  # the first chunk is still used by the view
    b[...] = 9
    assert np.all(view == 7)
    del view, b
    arena.empty((500,))  # now free: reused, no new chunk
    assert len(arena._chunks) == 2 and arena.nbytes == 2 * 8192


def test_arena_reuses_free_chunks_across_batches_without_growing():
    arena = forks.Arena()
    sizes = [(784, 64), (980, 64), (100, 64)]
    for _ in range(3):  # three "batches" allocating the same sizes in the same order
        held = [arena.empty(s) for s in sizes]
        for h in held:
            h[...] = 1
        del held, h
    assert arena.nbytes <= sum(int(np.prod(s)) * 8 for s in sizes) + len(sizes) * forks.PAGE
    assert arena.regions == 1


def test_arena_grows_into_a_new_region_when_the_last_is_full():
    arena = forks.Arena(reserve=4 * forks.PAGE)
    a = arena.empty((3 * forks.PAGE // 8,))
    b = arena.empty((2 * forks.PAGE // 8,))  # does not fit in the first region's last page
    a[...], b[...] = 1, 2
    assert arena.regions == 2
    assert arena.locate(a)[0] == 0 and arena.locate(b)[0] == 1
    assert arena.locate(np.zeros(3)) is None


class Owner:
    """What operations belong to: unpicklable (a lock), so it must go as the child's copy."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tag = 5


def _expected(n: int, processes: int, f) -> np.ndarray:
    bounds = forks.shares(n, processes)
    return np.concatenate([f(np.arange(bounds[k], bounds[k + 1]), k) for k in range(processes)])


def test_children_take_their_shares_stay_across_operations_and_see_later_arrays():
    arena, owner = forks.Arena(), Owner()
    workers = forks.Workers(3, arena, owner)
    try:
        pids = arena.empty((3,), np.int64)
        for round_ in range(2):
            out = arena.empty((10,))  # made after the children were forked (second round)
            view = out[::-1]  # a view goes by its place and strides

            def work(lo: int, hi: int, slot: int) -> None:
                assert owner.tag == 5  # the child's own copy of the owner, lock and all
                view[lo:hi] = np.arange(lo, hi) * 10 + slot + round_
                pids[slot] = os.getpid()

            workers.parallel(10, work)
            assert np.array_equal(out[::-1], _expected(10, 3, lambda i, k: i * 10 + k + round_))
            if round_ == 0:
                first = pids.copy()
        assert len(set(pids.tolist())) == 3 and pids[0] == os.getpid()
        assert np.array_equal(first, pids)  # the same children both times
        assert workers.peak_rss() > 0
    finally:
        workers.close()
    for pid in pids[1:]:
        with pytest.raises(ChildProcessError):  # waited for: gone
            os.waitpid(int(pid), os.WNOHANG)


def test_fewer_shares_than_processes_and_one_process_run_here():
    arena = forks.Arena()
    workers = forks.Workers(2, arena, None)
    out = arena.empty((1,), np.int64)

    def work(lo: int, hi: int, slot: int) -> None:
        out[lo:hi] = os.getpid()

    workers.parallel(1, work)  # one element: one share, here, no child forked
    assert out[0] == os.getpid() and not workers._children
    workers.close()


def test_children_are_replaced_when_the_arena_gets_a_region_they_cannot_see():
    arena = forks.Arena(reserve=4 * forks.PAGE)
    workers = forks.Workers(2, arena, None)
    try:
        pid = arena.empty((2,), np.int64)

        def work(lo: int, hi: int, slot: int) -> None:
            pid[slot] = os.getpid()

        workers.parallel(2, work)
        before = int(pid[1])
        late = arena.empty((4 * forks.PAGE // 8,))  # a second region
        assert arena.regions == 2

        def fill(lo: int, hi: int, slot: int) -> None:
            late[lo:hi] = slot + 1
            pid[slot] = os.getpid()

        workers.parallel(len(late), fill)
        assert int(pid[1]) != before
        assert np.array_equal(late, _expected(len(late), 2, lambda i, k: np.full(len(i), k + 1.0)))
    finally:
        workers.close()


def test_a_failing_child_fails_the_operation_and_the_next_one_runs_in_a_new_child():
    arena = forks.Arena()
    workers = forks.Workers(2, arena, None)
    out = arena.empty((4,))
    pid = arena.empty((1,), np.int64)

    def fail(lo: int, hi: int, slot: int) -> None:
        if slot == 1:
            pid[0] = os.getpid()
            raise ValueError("child failed")

    with pytest.raises(RuntimeError, match="1 of the 2 processes.*ValueError: child failed"):
        workers.parallel(4, fail)
    failed = int(pid[0])

    def work(lo: int, hi: int, slot: int) -> None:
        out[lo:hi] = slot
        if slot == 1:
            pid[0] = os.getpid()

    workers.parallel(4, work)
    assert np.array_equal(out, [0, 0, 1, 1])
    assert int(pid[0]) != failed  # the failed child was not trusted again
    workers.close()


def test_a_child_that_dies_fails_the_operation():
    workers = forks.Workers(2, forks.Arena(), None)

    def die(lo: int, hi: int, slot: int) -> None:
        if slot == 1:
            os._exit(3)

    with pytest.raises(RuntimeError, match="ended without answering"):
        workers.parallel(2, die)
    workers.close()


def test_a_child_cannot_allocate_from_the_arena():
    owner = Owner()
    owner.arena = forks.Arena()
    owner.arena.empty((10,))
    workers = forks.Workers(2, owner.arena, owner)

    def allocate(lo: int, hi: int, slot: int) -> None:
        if slot == 1:
            owner.arena.empty((10,))  # the child's copy of the arena's bookkeeping

    with pytest.raises(RuntimeError, match="allocated from its copy of the arena"):
        workers.parallel(2, allocate)
    workers.close()


def test_a_child_runs_blas_on_one_thread_and_shares_out_nothing_itself():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    owner = Owner()
    owner.workers = forks.Workers(2, forks.Arena(), owner)
    threads = owner.workers.arena.empty((2,), np.int64)

    def blas(lo: int, hi: int, slot: int) -> None:
        info = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        threads[slot] = max(info, default=1)

    owner.workers.parallel(2, blas)
    assert threads[1] == 1

    def nested(lo: int, hi: int, slot: int) -> None:
        if slot == 1:
            owner.workers.parallel(2, blas)  # the child's copy of the workers

    with pytest.raises(RuntimeError, match="share out an operation of its own"):
        owner.workers.parallel(2, nested)
    owner.workers.close()


def test_workers_do_not_keep_their_owner_alive():
    """The backend holds its workers; were they to hold it back, its arena (gigabytes
    in a real run) would wait for the garbage collector."""
    import gc
    import weakref

    gc.disable()
    try:
        owner = Owner()
        owner.workers = forks.Workers(2, forks.Arena(), owner)
        gone = weakref.ref(owner)
        del owner
        assert gone() is None
    finally:
        gc.enable()
