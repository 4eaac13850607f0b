"""Ciphertext x ciphertext products deferred to their reader (batch mode, issue 25).

A square or product (:class:`Product`, nothing computed yet) or a sum of
products (:class:`Pending`, computed but neither relinearised nor rescaled) is
handed to the evaluator as is. An affine stage or a plain scalar product that
reads it folds the products, unrescaled and unrelinearised (3-part ciphertexts
are linear in their parts), into its own sums, then relinearises and rescales
each *output* twice. The fixture's 980 squares so cost 980 products and 100 key
switches, not 980 of each plus 980 rescales, and a product is never rescaled
as a 3-part ciphertext (whose rounding error meets s², measured 50x the usual
noise). Any other reader settles them first (:meth:`DeferredProducts.settled`):
relinearised, then rescaled, as SEAL's usual order.

Rescaling twice at scale 2^3s fits the modulus wherever the once-rescaled value
does: the two primes it drops are the two the value would have used anyway,
so the parameters chosen for the program (its levels and magnitudes) hold.

:class:`DeferredProducts` is a part of :class:`~.batch_rns.RnsBatchBackend`;
it uses the backend's ``_load``, ``_ct``, ``_finish``, ``_zero``,
``_buffers``, ``_level``, ``_prepared``, ``arena``, ``workers``, ``primes``,
``scale`` and ``processes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rns
from .forks import shares, single_threaded_blas
from .seal import ciphertext_data


# Deferred products made at once per process before their rows are added into an
# affine stage's sums (128 x 3 x 5 x 8192 x 8 B = 126 MB at the fixture's level).
ROW_CHUNK = 128

# Deferred products go into an affine stage's sums chunk by chunk (never stored
# whole) when at least this share of its weights is non-zero (dense layers).
DENSE = 0.5


@dataclass
class Product:
    """Element-wise ciphertext x ciphertext products not computed yet: element i is
    ``a[i] * b[i]`` (``b`` None: ``a[i]²``), ``a`` and ``b`` 2-part data of one level;
    the evaluator counts the product at ``level`` (one rescale below them)."""

    a: np.ndarray
    b: np.ndarray | None
    level: int

    def __len__(self) -> int:
        return len(self.a)


@dataclass
class Pending:
    """Sums of products computed but neither relinearised nor rescaled: 3-part data
    one level above ``level`` (where the evaluator counts them), scale 2^2s."""

    data: np.ndarray
    level: int

    def __len__(self) -> int:
        return len(self.data)




class DeferredProducts:
    """Computing, folding and settling deferred products (see the module docstring)."""

    def _product(self, p: Product, i: int) -> Any:
        """Element i of ``p`` as an unrelinearised SEAL product (scale 2^2s)."""
        here = self._level(p.a)
        prod = self._ct("product", 3, here)
        if p.b is None:
            self.evaluator.square(self._load(p.a[i]), prod)
        else:
            self.evaluator.multiply(self._load(p.a[i]), self._load(p.b[i], "b"), prod)
        return prod

    def settled(self, x: Any) -> np.ndarray:
        """``x`` as 2-part data at its level: deferred products relinearised and rescaled."""
        if not isinstance(x, (Product, Pending)):
            return x
        first = x.a if isinstance(x, Product) else x.data
        out = self.arena.empty((len(x), 2, first.shape[2] - 1, first.shape[3]))

        def work(lo: int, hi: int, slot: int) -> None:
            for i in range(lo, hi):
                ct = self._product(x, i) if isinstance(x, Product) else self._load(x.data[i], scale=self.scale**2)
                ct.scale = self.scale**2
                self._finish(ct, x.level, out[i])

        self.workers.parallel(len(x), work)
        return out

    def _pending(self, p: Product) -> Pending:
        """``p`` computed: 3-part unrescaled data (for a reader that needs it whole)."""
        out = self.arena.empty((len(p), 3) + p.a.shape[2:])

        def work(lo: int, hi: int, slot: int) -> None:
            for i in range(lo, hi):
                out[i] = ciphertext_data(self._product(p, i))

        self.workers.parallel(len(p), work)
        return Pending(out, p.level)

    def _matmul_rows(self, p: Product, m: np.ndarray, level: int, add_bias: Any) -> np.ndarray:
        """An affine stage over deferred products, the products never stored: each
        process computes its share of the rows' products, a chunk at a time, and adds
        their part of every output into its own partial sums; the partial sums are
        added, relinearised and rescaled twice."""
        primes = self.primes[self._level(p.a)]
        q = np.array(primes, np.uint64)[:, None]
        n_out, shape = m.shape[1], (3,) + p.a.shape[2:]
        slots = len(shares(len(p), self.processes)) - 1
        partial = self.arena.empty((slots, n_out) + shape)
        sums = [[self.arena.empty(s, "float64") for s in rns.RowSums.sums_shapes(m, primes, shape)]
                for _ in range(slots)]
        bufs = self._buffers((min(ROW_CHUNK, len(p)),) + shape)

        weights = self._prepared("rows", m, primes, lambda: rns.RowSums.weights(m, self.scale, primes))

        def rows(lo: int, hi: int, slot: int) -> None:
            acc = rns.RowSums(m, self.scale, primes, shape[::2], sums[slot], weights)
            buf = bufs[slot]
            for r0 in range(lo, hi, ROW_CHUNK):
                r1 = min(hi, r0 + ROW_CHUNK)
                for k in range(r0, r1):
                    buf[k - r0] = ciphertext_data(self._product(p, k))
                acc.add(buf[:r1 - r0], r0)
            acc.result(partial[slot])

        with single_threaded_blas(self.processes > 1):
            self.workers.parallel(len(p), rows, slots)
        zero = set(np.flatnonzero(~(rns.encode(m, self.scale) != 0).any(axis=0)).tolist())
        out = self.arena.empty((n_out, 2, len(self.primes[level]), p.a.shape[3]))

        def finish(lo: int, hi: int, slot: int) -> None:
            for j in range(lo, hi):
                if j in zero:
                    out[j] = self._zero(level)
                else:  # the processes' partial sums added here, in parallel too
                    total = partial[0][j]
                    for other in partial[1:]:
                        total = rns.addmod(total, other[j], q)
                    self._finish(self._load(total, scale=self.scale**3), level, out[j])
                if add_bias is not None:
                    add_bias(j, out[j])

        self.workers.parallel(n_out, finish)
        return out
