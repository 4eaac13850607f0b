"""SEAL itself, on the keys of a TenSEAL context: what the batch and latency
backends share.

TenSEAL's vectors rescale after every product, rotate only inside ``mm`` and
expose no rescale, which is where the time goes (issue 18). TenSEAL's wheel
ships SEAL's own Python binding, ``tenseal.sealapi``: its ``Evaluator`` works
on the very ciphertexts and keys of a TenSEAL context, so both backends drive
SEAL directly and decide when to rescale and rotate.

Invariant kept by :meth:`Seal.rescale` (what :mod:`.evaluate`'s level and
factor bookkeeping assumes of every backend): after a rescale the ciphertext's
scale is set back to exactly 2^s, as TenSEAL does, so the value is multiplied
by ``2^s / q`` for the prime q dropped: :meth:`Seal.drift` gives that factor
from the primes themselves (tests check it against TenSEAL's own vectors,
:func:`~.tenseal_mm.measure_drift`).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from typing import Any

import numpy as np

from .encryption import encryption_named


class Seal:
    """Evaluator, encoder, encryptor, decryptor (a private context only) and keys of
    a TenSEAL CKKS ``context`` with a global scale."""

    def __init__(self, context: Any, encryption: str | None = None) -> None:
        """``encryption``: how samples are encrypted, a name in
        :data:`~.encryption.ENCRYPTIONS` (None: the default, public-key)."""
        from tenseal import sealapi as sa

        self.sa, self.context = sa, context
        self.seal = context.seal_context().data
        self.evaluator = sa.Evaluator(self.seal)
        self.encoder = sa.CKKSEncoder(self.seal)
        self.slots = self.encoder.slot_count()
        self.scale = float(context.global_scale)
        self.relin = context.relin_keys().data
        self.galois = context.galois_keys().data if context.has_galois_keys() else None
        # The evaluating side's fresh encryptions of zero: the public key, whatever
        # encrypts the samples (see .encryption).
        self.encryptor = sa.Encryptor(self.seal, context.public_key().data)
        self.encryption = encryption_named(encryption)
        self._client = sa.Encryptor(self.seal, getattr(context, self.encryption.key)().data)
        # encrypt_into(plaintext, ciphertext): the samples' encryption.
        self.encrypt_into = getattr(self._client, self.encryption.method)
        self.decryptor = sa.Decryptor(self.seal, context.secret_key().data) if context.is_private() else None
        self.parms, primes = [], []  # per level (rescales so far): its parms_id, its last prime
        data = self.seal.first_context_data()
        while data is not None:
            self.parms.append(data.parms_id())
            primes.append(data.parms().coeff_modulus()[-1].value())
            data = data.next_context_data()
        self._drift = [self.scale / q for q in primes[:-1]]  # into level l: level l-1's last prime
        # Per level: its primes, in SEAL's order (the level's ciphertexts hold one residue array each).
        self.primes = [[m.value() for m in self.seal.get_context_data(p).parms().coeff_modulus()]
                       for p in self.parms]

    def drift(self, level: int) -> float:
        """The factor a rescale into ``level`` leaves in the value (2^s / q)."""
        return self._drift[level - 1]

    def level(self, ct: Any) -> int:
        """Rescales (or modulus switches) ``ct`` has been through."""
        return len(self.parms) - 1 - self.seal.get_context_data(ct.parms_id()).chain_index()

    def new(self) -> Any:
        return self.sa.Ciphertext()

    def plain(self, values: Any, parms_id: Any, scale: float | None = None) -> Any:
        """``values`` (a float: every slot; else a list over the slots) encoded at
        ``parms_id`` and ``scale`` (default 2^s)."""
        pt = self.sa.Plaintext()
        v = float(values) if isinstance(values, float) else list(values)
        self.encoder.encode(v, parms_id, self.scale if scale is None else scale, pt)
        return pt

    def encrypt(self, values: Any) -> Any:
        """``values`` encrypted as a sample is (:attr:`encryption`), at the first level."""
        ct = self.new()
        self.encrypt_into(self.plain(values, self.parms[0]), ct)
        return ct

    def sent_bytes(self, values: Any) -> int:
        """The bytes of ``values`` encrypted as the data owner sends them: SEAL's
        save, with its default compression; seeded (the random polynomial as its
        seed) for secret-key encryption."""
        if self.encryption.seeded:  # SEAL's Serializable: only its save() writes the seed
            return len(self.serialize(getattr(self._client, self.encryption.method)(self.plain(values, self.parms[0]))))
        return len(self.serialize(Seal.encrypt(self, values)))  # not a backend's encrypt (a batch)

    def close(self) -> None:
        """Release what a backend holds besides memory (forked processes); here, nothing."""

    def helpers_peak_rss(self) -> int:
        """The largest peak RSS (bytes) of the processes this backend forked (0: none)."""
        from .forks import children_peak_rss

        return children_peak_rss()

    def decrypt(self, ct: Any) -> list[float]:
        pt = self.sa.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return self.encoder.decode_double(pt)

    def rescale(self, ct: Any) -> Any:
        """``ct`` rescaled in place, its scale set back to 2^s; returns it."""
        self.evaluator.rescale_to_next_inplace(ct)
        ct.scale = self.scale
        return ct

    def rescaled(self, ct: Any) -> Any:
        """A rescaled copy of ``ct`` (which is kept)."""
        out = self.new()
        self.evaluator.rescale_to_next(ct, out)
        out.scale = self.scale
        return out

    def aligned(self, a: Any, b: Any) -> tuple[Any, Any]:
        """``a`` and ``b`` at the same level: the higher one's copy mod-switched down
        (no rescale: the value and scale are unchanged)."""
        la, lb = self.level(a), self.level(b)
        if la == lb:
            return a, b
        low, high = (a, b) if la < lb else (b, a)
        moved = self.new()
        self.evaluator.mod_switch_to(low, high.parms_id(), moved)
        return (moved, b) if la < lb else (a, moved)

    def rotate(self, ct: Any, step: int) -> Any:
        out = self.new()
        self.evaluator.rotate_vector(ct, int(step), self.galois, out)
        return out

    @staticmethod
    def serialize(ct: Any) -> bytes:
        """``ct`` (a ciphertext, or SEAL's Serializable of one) as SEAL saves it (its
        default compression)."""
        fd, path = tempfile.mkstemp(suffix=".ct")
        os.close(fd)
        try:
            ct.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)


# --- a ciphertext's data as a numpy array ------------------------------------------
#
# TenSEAL's binding exposes a ciphertext's data one coefficient at a time (``data(i)``
# returns a value, ``dyn_array()[k]`` one element) and serializes it only compressed
# (~4 ms per ciphertext at N=8192), so batch mode reads and writes it in place.
# Where it lies is read from the objects: the binding's instance holds a pointer to
# SEAL's ``Ciphertext``, whose fields are SEAL 4's (parms_id, is_ntt_form, size,
# poly_modulus_degree, coeff_modulus_size, scale, correction_factor, then the
# ``DynArray``: pool handle, capacity, size, data pointer). :func:`layout_ok` checks
# every one of them against the binding's own accessors, in a forked process (a
# wrong guess there cannot harm this one), before batch mode relies on it.

_HOLDER = 16  # pybind11 instance: PyObject_HEAD, then the pointer to the C++ object
_FIELDS = {"size": 40, "degree": 48, "primes": 56, "scale": 64, "count": 104, "data": 112}


def _object(ct: Any) -> int:
    return ctypes.c_void_p.from_address(id(ct) + _HOLDER).value or 0


def ciphertext_data(ct: Any) -> np.ndarray:
    """``ct``'s data in place, as a (parts, primes, N) uint64 array (no copy), valid
    until ``ct`` is resized or freed. Raises ``RuntimeError`` if the element count
    SEAL holds is not parts x primes x N (never read or write past it)."""
    obj = _object(ct)
    shape = (ct.size(), ct.coeff_modulus_size(), ct.poly_modulus_degree())
    count = ctypes.c_size_t.from_address(obj + _FIELDS["count"]).value
    if not obj or count != shape[0] * shape[1] * shape[2] or count == 0:
        raise RuntimeError(f"ciphertext data of {count} elements, its shape says {shape}")
    ptr = ctypes.c_void_p.from_address(obj + _FIELDS["data"]).value
    return np.ctypeslib.as_array((ctypes.c_uint64 * count).from_address(ptr)).reshape(shape)


def _probe(context: Any) -> bool:
    """Whether :func:`ciphertext_data` reads and writes what the binding reads."""
    seal = Seal(context)
    ct = seal.encrypt([0.25] * seal.slots)
    obj = _object(ct)
    field = {k: ctypes.c_size_t.from_address(obj + o).value for k, o in _FIELDS.items()}
    if (field["size"], field["degree"], field["primes"]) != (ct.size(), ct.poly_modulus_degree(),
                                                           ct.coeff_modulus_size()):
        return False
    if ctypes.c_double.from_address(obj + _FIELDS["scale"]).value != ct.scale:
        return False
    if field["count"] != ct.size() * ct.coeff_modulus_size() * ct.poly_modulus_degree():
        return False
    data, flat = ciphertext_data(ct), ct.dyn_array()
    n = data.size
    if any(int(data.reshape(-1)[k]) != flat[k] for k in (0, 1, n // 2, n - 1)):
        return False
    if any(int(data[i, 0, 0]) != ct.data(i) for i in range(ct.size())):
        return False
    q = np.array(seal.primes[0], np.uint64)[None, :, None]
    data[...] = np.where(data == 0, data, q - data)  # negated in place: SEAL must decrypt -0.25
    return ct.data(0) == int(data[0, 0, 0]) and abs(seal.decrypt(ct)[0] + 0.25) < 1e-3


_LAYOUT: dict[tuple[int, int], bool] = {}


def layout_ok(context: Any) -> bool:
    """:func:`_probe` in a forked child (a segfault there is a "no"); cached."""
    key = (os.getpid(), id(context))
    if key not in _LAYOUT:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if _probe(context) else 1
            finally:
                os._exit(code)
        _LAYOUT[key] = os.waitpid(pid, 0)[1] == 0
    return _LAYOUT[key]
