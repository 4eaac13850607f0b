"""Batch mode's SEAL backend: every product a ``multiply_plain`` call through
``tenseal.sealapi`` (issue 18). Kept as the reference the array backend
(:mod:`.batch_rns`) is tested against, bit for bit, and as the fallback where
that backend cannot reach a ciphertext's data (:func:`~.seal.layout_ok`).

Invariants (what :class:`SealBatchBackend` guarantees the shared evaluator,
:func:`~.evaluate._evaluate_from`, so its level/factor bookkeeping and drift
compensation carry over unchanged):

* every ciphertext the evaluator sees at level l has been rescaled l times (it is
  at SEAL chain index ``depth - l``; checked after each rescale) and has scale
  exactly 2^s;
* a rescale into level l divides by the prime q dropped there and the scale is
  then set back to 2^s, so the value is multiplied by ``drift(l) = 2^s / q`` --
  the factor TenSEAL leaves too, here computed from the primes, not measured;
* the products of one output element are added unrescaled (all at scale 2^2s)
  and rescaled *once*; weights whose encoding rounds to zero (|w| 2^s < 1/2) are
  skipped, they contribute nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np

from .seal import Seal


# A matrix is shared out by columns among forked processes when its columns have at
# least this many products on average: the output ciphertexts come back through
# files (~10 ms each), next to ~0.4 ms per product.
SPLIT_PRODUCTS_PER_OUTPUT = 200


class SealBatchBackend(Seal):
    """The evaluator's backend on lists of SEAL ciphertexts, one per vector element."""

    poly_chunk = 32  # a polynomial runs on this many ciphertexts at a time (memory; see _poly_stage)

    def __init__(self, context: Any, split: int = 1, encryption: str | None = None) -> None:
        super().__init__(context, encryption)
        self.split = split  # processes sharing a wide matrix's columns (see matmul)

    def note(self, level: int, value: Any) -> None:
        pass  # magnitudes are the plaintext backend's business

    def _rescale(self, ct: Any, level: int) -> Any:
        self.rescale(ct)
        if self.level(ct) != level:
            raise AssertionError(f"ciphertext at level {self.level(ct)}, the evaluator counts {level}")
        return ct

    def _plain(self, value: float, parms_id: Any) -> Any:
        return self.plain(float(value), parms_id)

    def _zero(self, level: int) -> Any:
        ct = self.new()
        self.encryptor.encrypt_zero(self.parms[level], ct)
        ct.scale = self.scale
        return ct

    # client side
    def encrypt(self, x: np.ndarray) -> list[Any]:
        """``x`` (samples, n) -> n ciphertexts, ciphertext i holding column i."""
        return [super(SealBatchBackend, self).encrypt(column.tolist()) for column in np.asarray(x, "float64").T]

    def decrypt(self, cts: list[Any], samples: int) -> np.ndarray:
        out = np.empty((samples, len(cts)))
        for i, ct in enumerate(cts):
            out[:, i] = super().decrypt(ct)[:samples]
        return out

    # the evaluator's operations
    def matmul(self, x: list[Any], m: np.ndarray, level: int) -> list[Any]:
        keep = np.abs(m) * self.scale >= 0.5
        columns = np.arange(m.shape[1])
        if self.split < 2 or keep.sum() < SPLIT_PRODUCTS_PER_OUTPUT * len(columns) or len(columns) < self.split:
            return self._columns(x, m, keep, columns, level)
        # Wide sums (a dense layer): forked children take shares of the columns and hand
        # their outputs back through files; cheap next to ~1,000 products per output.
        parts = np.array_split(columns, self.split)
        folder = tempfile.mkdtemp(prefix="actswap-he-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        children: list[int] = []
        try:
            for part in parts[1:]:
                pid = os.fork()
                if pid == 0:  # the child: compute, save, leave without running any Python exit handler
                    code = 1
                    try:
                        for j, ct in zip(part, self._columns(x, m, keep, part, level)):
                            ct.save(os.path.join(folder, str(j)))
                        code = 0
                    finally:
                        os._exit(code)
                children.append(pid)
            try:
                out = self._columns(x, m, keep, parts[0], level)
            finally:
                failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
            if failed:
                raise RuntimeError(f"{len(failed)} of the processes computing a matrix's columns failed")
            for j in np.concatenate(parts[1:]):
                ct = self.new()
                ct.load(self.seal, os.path.join(folder, str(j)))
                out.append(ct)
            return out
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _columns(self, x: list[Any], m: np.ndarray, keep: np.ndarray, columns: np.ndarray, level: int) -> list[Any]:
        parms_id, tmp, out = x[0].parms_id(), self.new(), []
        for j in columns:
            rows = np.flatnonzero(keep[:, j])
            if rows.size == 0:
                out.append(self._zero(level))
                continue
            acc = self.new()
            self.evaluator.multiply_plain(x[rows[0]], self._plain(m[rows[0], j], parms_id), acc)
            for i in rows[1:]:
                self.evaluator.multiply_plain(x[i], self._plain(m[i, j], parms_id), tmp)
                self.evaluator.add_inplace(acc, tmp)
            out.append(self._rescale(acc, level))
        return out

    def mul_vector(self, x: list[Any], v: np.ndarray, key: Any, level: int) -> list[Any]:
        out = []
        for ct, c in zip(x, np.broadcast_to(v, (len(x),))):
            if abs(c) * self.scale < 0.5:
                out.append(self._zero(level))
                continue
            r = self.new()
            self.evaluator.multiply_plain(ct, self._plain(c, ct.parms_id()), r)
            out.append(self._rescale(r, level))
        return out

    def mul_scalar(self, x: list[Any], c: float, level: int) -> list[Any]:
        return self.mul_vector(x, np.asarray(c), None, level)

    def mul(self, a: list[Any], b: list[Any], level: int) -> list[Any]:
        out = []
        for p, q in zip(a, b):
            r = self.new()
            if a is b:
                self.evaluator.square(p, r)
            else:
                self.evaluator.multiply(*self.aligned(p, q), r)
            self.evaluator.relinearize_inplace(r, self.relin)
            out.append(self._rescale(r, level))
        return out

    def bilinear(self, a: list[Any], b: list[Any], pairs: np.ndarray, level: int) -> list[Any]:
        """Per output, its products summed before one relinearisation and one rescale
        (a sum of unrelinearised products is still a valid 3-part ciphertext)."""
        out, tmp = [], self.new()
        for terms in pairs:
            acc = self.new()
            self.evaluator.multiply(a[terms[0, 0]], b[terms[0, 1]], acc)
            for i, j in terms[1:]:
                self.evaluator.multiply(a[i], b[j], tmp)
                self.evaluator.add_inplace(acc, tmp)
            self.evaluator.relinearize_inplace(acc, self.relin)
            out.append(self._rescale(acc, level))
        return out

    def join(self, parts: list[list[Any]]) -> list[Any]:
        return [ct for part in parts for ct in part]

    def lower(self, x: list[Any], level: int) -> list[Any]:
        """``x`` at ``level``: copies of the ciphertexts above it mod-switched down
        (value and scale unchanged); ``x`` itself is kept for its other readers."""
        if all(self.level(ct) == level for ct in x):
            return x
        out = []
        for ct in x:
            if self.level(ct) == level:
                out.append(ct)
                continue
            moved = self.new()
            self.evaluator.mod_switch_to(ct, self.parms[level], moved)
            out.append(moved)
        return out

    def add(self, a: list[Any], b: list[Any]) -> list[Any]:
        out = []
        for p, q in zip(a, b):
            r = self.new()
            self.evaluator.add(*self.aligned(p, q), r)
            out.append(r)
        return out

    def add_vector(self, x: list[Any], v: np.ndarray, key: Any) -> list[Any]:
        out = []
        for ct, c in zip(x, np.broadcast_to(v, (len(x),))):
            r = self.new()
            self.evaluator.add_plain(ct, self._plain(c, ct.parms_id()), r)
            out.append(r)
        return out

    def add_scalar(self, x: list[Any], c: float) -> list[Any]:
        return self.add_vector(x, np.asarray(c), None)

    def neg(self, a: list[Any]) -> list[Any]:
        out = []
        for ct in a:
            r = self.new()
            self.evaluator.negate(ct, r)
            out.append(r)
        return out

    def finish(self, cts: list[Any]) -> list[Any]:
        """The output as it leaves the server (already relinearised here)."""
        return cts

    def ciphertext(self, ct: Any) -> Any:
        """One element as a SEAL ciphertext (it already is one)."""
        return ct
