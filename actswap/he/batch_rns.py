"""Batch mode's backend on ciphertext data (issue 25): each value the program
computes is one numpy array ``(elements, parts, primes, N)`` of uint64, element i
the SEAL ciphertext of vector element i (slot j of it: sample j), in SEAL's own
RNS/NTT layout.

Who computes what:

* **numpy** (:mod:`.rns`), the public linear maps: an affine stage's products
  and sums (per prime one integer matrix product, BLAS on exact float64
  digits), plain additions, negation, scalar products, modulus switching (in
  NTT form, dropping a prime's residues). Bit for bit what SEAL's
  ``multiply_plain``/``add``/``add_plain``/``negate``/``mod_switch_to`` give.
* **SEAL** (``tenseal.sealapi``, on the TenSEAL context's keys), everything
  that needs a key, randomness or an NTT: encryption, decryption, ciphertext x
  ciphertext products, relinearisation, rescaling. Each element is copied into
  a reused SEAL ciphertext, operated on, and copied out
  (:func:`~.seal.ciphertext_data`).

Products are deferred to their reader (:mod:`.deferred`).

Invariants (those of :mod:`.batch_seal`, which the shared evaluator's level and
factor bookkeeping rely on): a value at level l has been rescaled l times and
has scale 2^s; a rescale into level l multiplies it by ``drift(l)``; an
element whose weights all encode to zero is a fresh encryption of zero.

Cores: SEAL's binding holds the GIL, so each operation's elements are shared
out among processes (:class:`~.forks.Workers`: this one and children forked once
per run) that write their share of the result into shared memory; BLAS runs
single-threaded inside them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from . import rns
from .deferred import DENSE, DeferredProducts, Pending, Product
from .forks import Arena, Workers, single_threaded_blas
from .seal import Seal, ciphertext_data


# Output columns of an affine stage computed at once per process (before their
# rescale): bounds the unrescaled temporaries (64 x 2 x 6 x 8192 x 8 B = 50 MB).
COLUMN_CHUNK = 64

class RnsBatchBackend(DeferredProducts, Seal):
    """The evaluator's backend on ciphertext data arrays (see the module docstring)."""

    poly_chunk = None  # polynomials stream element by element already

    def __init__(self, context: Any, processes: int = 1, encryption: str | None = None) -> None:
        super().__init__(context, encryption)
        self.processes = processes
        self.arena = Arena()  # every array, reused batch after batch (see forks)
        self.workers = Workers(processes, self.arena, self)  # forked at the first shared operation
        self._scratch: dict[tuple[str, int, int], Any] = {}
        self._kept: dict[tuple[Any, ...], Any] = {}

    def _prepared(self, kind: str, m: np.ndarray, primes: list[int], make: Any) -> Any:
        """``make()``'s result for these weights and primes, kept: every batch compiles
        the same matrices (the weights' encodings and digits are made once)."""
        key = (kind, m.shape, hashlib.blake2b(m.tobytes(), digest_size=16).digest(), tuple(primes))
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def _buffers(self, shape: tuple[int, ...], dtype: Any = np.uint64) -> list[np.ndarray]:
        """One scratch array per process slot, from the arena (so a forked process
        writes into pages already there)."""
        return [self.arena.empty(shape, dtype) for _ in range(self.processes)]

    def close(self) -> None:
        """The forked processes told to leave and waited for (the arena stays until
        this object goes)."""
        self.workers.close()

    def helpers_peak_rss(self) -> int:
        return self.workers.peak_rss()

    def note(self, level: int, value: Any) -> None:
        pass

    # --- SEAL on one element at a time ---------------------------------------
    def _level(self, data: np.ndarray) -> int:
        return len(self.primes[0]) - data.shape[2]

    def _fresh(self, parts: int, level: int) -> Any:
        """A new SEAL ciphertext (parts, level) in NTT form, its data to be overwritten."""
        ct = self.new()
        self.encryptor.encrypt_zero(self.parms[level], ct)
        if parts == 3:
            three = self.new()
            self.evaluator.square(ct, three)
            ct = three
        return ct

    def _ct(self, role: str, parts: int, level: int) -> Any:
        """A reused SEAL ciphertext (parts, level): the evaluator's elements go in
        and out through :func:`ciphertext_data`."""
        key = (role, parts, level)
        if key not in self._scratch:
            self._scratch[key] = self._fresh(parts, level)
        return self._scratch[key]

    def _load(self, element: np.ndarray, role: str = "a", scale: float | None = None) -> Any:
        ct = self._ct(role, element.shape[0], len(self.primes[0]) - element.shape[1])
        ciphertext_data(ct)[...] = element
        ct.scale = self.scale if scale is None else scale
        return ct

    def _zero(self, level: int) -> np.ndarray:
        """A fresh encryption of zero at ``level`` (an output whose weights all encode to 0)."""
        ct = self._fresh(2, level)
        return ciphertext_data(ct).copy()

    def _finish(self, ct: Any, level: int, out: np.ndarray) -> None:
        """``ct`` (a 3-part sum of products: relinearised first) rescaled into
        ``level`` (checked), its data written to ``out``."""
        if ct.size() == 3:
            two = self._ct("relin", 2, self.level(ct))
            self.evaluator.relinearize(ct, self.relin, two)
            ct = two
        while self.level(ct) < level:
            dest = self._ct("rescaled", 2, self.level(ct) + 1)
            self.evaluator.rescale_to_next(ct, dest)
            ct = dest
        if self.level(ct) != level:
            raise AssertionError(f"ciphertext at level {self.level(ct)}, the evaluator counts {level}")
        out[...] = ciphertext_data(ct)

    # --- client side -----------------------------------------------------------
    def encrypt(self, x: np.ndarray) -> np.ndarray:
        """``x`` (samples, n) -> data (n, 2, primes, N): element i encrypts column i."""
        columns = self.arena.empty(np.shape(x)[::-1], "float64")  # shared: children read it in place
        columns[...] = np.asarray(x, "float64").T
        out = self.arena.empty((len(columns), 2, len(self.primes[0]), self.slots * 2))

        def work(lo: int, hi: int, slot: int) -> None:
            # SEAL's own encode and encryption (public- or secret-key: .encryption), into
            # one reused plaintext and ciphertext: 20% faster than new objects per element
            # (measured).
            pt, ct = self.sa.Plaintext(), self.new()
            for i in range(lo, hi):
                self.encoder.encode(columns[i].tolist(), self.parms[0], self.scale, pt)
                self.encrypt_into(pt, ct)
                out[i] = ciphertext_data(ct)

        self.workers.parallel(len(columns), work)
        return out

    def finish(self, data: Any) -> np.ndarray:
        """The output as the server sends it back: settled 2-part ciphertexts."""
        return self.settled(data)

    def ciphertext(self, element: np.ndarray) -> Any:
        """One element as a SEAL ciphertext of its own (what a client receives)."""
        ct = self._fresh(element.shape[0], len(self.primes[0]) - element.shape[1])
        ciphertext_data(ct)[...] = element
        ct.scale = self.scale
        return ct

    def decrypt(self, data: np.ndarray, samples: int) -> np.ndarray:
        out = np.empty((samples, len(data)))
        for i in range(len(data)):
            out[:, i] = Seal.decrypt(self, self._load(data[i]))[:samples]
        return out

    # --- the evaluator's operations ----------------------------------------------
    def matmul(self, x: Any, m: np.ndarray, level: int) -> np.ndarray:
        return self.matmul_bias(x, m, None, level)

    def _bias(self, bias: np.ndarray | None, n: int, level: int) -> Any:
        """A function adding ``bias[j]`` (as ``add_plain`` of its encoding at 2^s) to
        output j's data at ``level``, in place; None without a bias."""
        if bias is None:
            return None
        q = np.array(self.primes[level], np.uint64)[:, None]
        ints = rns.encode(np.broadcast_to(bias, (n,)), self.scale)
        r = np.stack([rns.residues(ints, int(p)) for p in q[:, 0]], axis=1)[:, :, None]  # (n, L, 1)

        def add(j: int, data: np.ndarray) -> None:
            data[0] = rns.addmod(data[0], r[j], q)

        return add

    def matmul_bias(self, x: Any, m: np.ndarray, bias: np.ndarray | None, level: int) -> np.ndarray:
        """Per output, its products over the non-zero weights summed and rescaled once
        (over deferred products, at scale 2^2s: relinearised and rescaled twice),
        then its bias added."""
        dense = np.count_nonzero(m) >= DENSE * m.size
        if isinstance(x, Product) and (self.processes * m.shape[1] > len(x) or not dense):
            # Wide or sparse: each process's partial sums would outweigh the products.
            x = self._pending(x)
        add_bias = self._bias(bias, m.shape[1], level)
        if isinstance(x, Product):
            return self._matmul_rows(x, m, level, add_bias)
        data, scale = (x.data, self.scale**3) if isinstance(x, Pending) else (x, self.scale**2)
        primes = self.primes[self._level(data)]
        mm = self._prepared("columns", m, primes, lambda: rns.ModularMatrix(m, self.scale, primes))
        zero = set(mm.zero_columns.tolist())
        out = self.arena.empty((m.shape[1], 2, len(self.primes[level]), data.shape[3]))
        bufs = self._buffers((COLUMN_CHUNK,) + data.shape[1:])

        def work(lo: int, hi: int, slot: int) -> None:
            buf = bufs[slot]
            for c0 in range(lo, hi, COLUMN_CHUNK):
                cols = np.arange(c0, min(hi, c0 + COLUMN_CHUNK))
                mm.apply(data, buf[:len(cols)], cols)
                for k, j in enumerate(cols):
                    if j in zero:
                        out[j] = self._zero(level)
                    else:
                        self._finish(self._load(buf[k], scale=scale), level, out[j])
                    if add_bias is not None:
                        add_bias(j, out[j])

        with single_threaded_blas(self.processes > 1):
            self.workers.parallel(m.shape[1], work)
        return out

    def mul_vector(self, x: Any, v: np.ndarray, key: Any, level: int) -> np.ndarray:
        """Element i times the plain ``v[i]``, rescaled (deferred products: relinearised
        and rescaled twice)."""
        first = x.a if isinstance(x, Product) else x.data if isinstance(x, Pending) else x
        primes = self.primes[self._level(first)]
        ints = rns.encode(np.broadcast_to(v, (len(x),)), self.scale)
        r = np.stack([rns.residues(ints, q) for q in primes], axis=1)  # (n, L)
        r_shoup = np.stack([rns.shoup(r[:, l], q) for l, q in enumerate(primes)], axis=1)
        out = self.arena.empty((len(x), 2, len(self.primes[level]), first.shape[3]))
        deferred = isinstance(x, (Product, Pending))

        def work(lo: int, hi: int, slot: int) -> None:
            for i in range(lo, hi):
                if ints[i] == 0:
                    out[i] = self._zero(level)
                    continue
                if isinstance(x, Product):
                    element = ciphertext_data(self._product(x, i)).copy()
                else:
                    element = x.data[i] if deferred else x[i]
                y = np.stack([rns.mulmod(element[:, l], r[i, l], r_shoup[i, l], q)
                              for l, q in enumerate(primes)], axis=1)
                self._finish(self._load(y, scale=self.scale**(3 if deferred else 2)), level, out[i])

        self.workers.parallel(len(x), work)
        return out

    def mul_scalar(self, x: Any, c: float, level: int) -> np.ndarray:
        return self.mul_vector(x, np.asarray(c), None, level)

    def _aligned(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L = min(a.shape[2], b.shape[2])
        return a[:, :, :L], b[:, :, :L]

    def mul(self, a: Any, b: Any, level: int) -> Product:
        """Deferred: the reader computes the products (see :class:`Product`)."""
        if a is b:
            return Product(self.settled(a), None, level)
        a, b = self._aligned(self.settled(a), self.settled(b))
        return Product(a, b, level)

    def bilinear(self, a: Any, b: Any, pairs: np.ndarray, level: int) -> Pending:
        """Per output, its products summed (3-part, unrescaled: :class:`Pending`)."""
        a, b = self._aligned(self.settled(a), self.settled(b))
        out = self.arena.empty((len(pairs), 3) + a.shape[2:])
        here = self._level(a)

        def work(lo: int, hi: int, slot: int) -> None:
            acc, tmp = self._ct("acc", 3, here), self._ct("product", 3, here)
            for k in range(lo, hi):
                (i, j), rest = pairs[k][0], pairs[k][1:]
                self.evaluator.multiply(self._load(a[i]), self._load(b[j], "b"), acc)
                for i, j in rest:
                    self.evaluator.multiply(self._load(a[i]), self._load(b[j], "b"), tmp)
                    self.evaluator.add_inplace(acc, tmp)
                out[k] = ciphertext_data(acc)

        self.workers.parallel(len(pairs), work)
        return Pending(out, level)

    def join(self, parts: list[Any]) -> np.ndarray:
        parts = [self.settled(p) for p in parts]
        if len(parts) == 1:
            return parts[0]
        out = self.arena.empty((sum(len(p) for p in parts),) + parts[0].shape[1:])
        at = 0
        for p in parts:
            out[at:at + len(p)] = p
            at += len(p)
        return out

    def lower(self, x: Any, level: int) -> np.ndarray:
        """``x`` at ``level``: in NTT form a modulus switch (no rescale) drops the
        residues of the primes above it (a view; ``x`` is kept for other readers)."""
        return self.settled(x)[:, :, :len(self.primes[level])]

    def _q(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.primes[self._level(x)], np.uint64)[:, None]

    def add(self, a: Any, b: Any) -> np.ndarray:
        a, b = self._aligned(self.settled(a), self.settled(b))
        out, q = self.arena.empty(a.shape), self._q(a)
        for i in range(len(a)):  # element by element: temporaries of one ciphertext
            out[i] = rns.addmod(a[i], b[i], q)
        return out

    def add_vector(self, x: Any, v: np.ndarray, key: Any) -> np.ndarray:
        x = self.settled(x)
        q = self._q(x)
        ints = rns.encode(np.broadcast_to(v, (len(x),)), self.scale)
        r = np.stack([rns.residues(ints, int(p)) for p in q[:, 0]], axis=1)  # (n, L)
        out = self.arena.empty(x.shape)
        out[...] = x
        for i in range(len(x)):
            out[i, 0] = rns.addmod(x[i, 0], r[i][:, None], q)
        return out

    def add_scalar(self, x: Any, c: float) -> np.ndarray:
        return self.add_vector(x, np.asarray(c), None)

    def neg(self, a: Any) -> Any:
        if isinstance(a, Product):  # -(a b) = (-a) b: still deferred
            return Product(self.neg(a.a), a.a if a.b is None else a.b, a.level)
        a = self.settled(a)
        out, q = self.arena.empty(a.shape), self._q(a)
        for i in range(len(a)):
            out[i] = rns.negmod(a[i], q)
        return out
