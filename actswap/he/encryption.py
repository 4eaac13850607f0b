"""How the data owner encrypts its samples: SEAL's own two encryptions, one
record each (``he-run --encryption``, ``he.run(encryption=...)``).

Both are SEAL's ``Encryptor`` (through ``tenseal.sealapi``) on the keys the
TenSEAL context generated, at the same 128-bit parameters; they are TenSEAL's
two ``ENCRYPTION_TYPE``s (ASYMMETRIC, SYMMETRIC). Nothing here is actswap's
own cryptography: a record names which key SEAL's encryptor takes and which of
its methods encrypts.

* **public-key** (the default): ``Encryptor(context, public_key).encrypt``.
  Anyone holding the public context can encrypt. SEAL encrypts at the key
  level and switches the modulus down: ~35 NTTs per ciphertext at N = 8192.
* **secret-key**: ``Encryptor(context, secret_key).encrypt_symmetric``. Only
  the secret key's holder can encrypt, which in ``he-run`` is the data owner,
  who decrypts the results anyway. The ciphertext's second polynomial is
  uniform randomness SEAL can send as its seed, so a ciphertext as sent is
  half the size. Measured on this project's 2-core machine: 2.6 ms per
  ciphertext at N = 8192 with 6 primes, against 5.4 ms for public-key.

Why secret-key encryption is no weaker: both are RLWE encryptions under the
same parameters. A public key is itself a secret-key encryption of zero, and a
public-key ciphertext is a sum of such encryptions plus fresh noise.
Distinguishing either kind of ciphertext from uniform is the same decision-RLWE
problem, whose hardness the 128-bit parameter choice (:mod:`.limits`) is
about. What changes is who can encrypt, not what a ciphertext reveals.

The evaluating side never encrypts samples. Where it needs a fresh encryption
of zero (an output whose weights all encode to zero), it uses the public key
in both modes (:class:`~.seal.Seal`'s ``encryptor``).

This module imports nothing heavy: the command line reads it before
TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Encryption:
    """One way of encrypting samples: SEAL's ``Encryptor`` on the TenSEAL context's
    ``key`` (``public_key`` or ``secret_key``), encrypting with ``method``."""

    name: str
    key: str
    method: str
    seeded: bool  # as sent: the random polynomial replaced by its seed (SEAL's Serializable)
    summary: str


ENCRYPTIONS: dict[str, Encryption] = {e.name: e for e in (
    Encryption("public-key", "public_key", "encrypt", False,
               "SEAL's public-key encryption (anyone with the public context can encrypt)"),
    Encryption("secret-key", "secret_key", "encrypt_symmetric", True,
               "SEAL's secret-key encryption by the data owner (seeded: half the bytes sent)"),
)}

DEFAULT_ENCRYPTION = "public-key"


def encryption_named(name: str | None) -> Encryption:
    """The record called ``name`` (None: the default). Raises :class:`UserError`
    naming the choices."""
    if name is None:
        return ENCRYPTIONS[DEFAULT_ENCRYPTION]
    if name not in ENCRYPTIONS:
        raise UserError(f"encryption (he-run --encryption) must be one of {', '.join(ENCRYPTIONS)}, got {name!r}")
    return ENCRYPTIONS[name]
