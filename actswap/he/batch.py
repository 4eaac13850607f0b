"""Batch mode: SIMD across samples (the CryptoNets packing).

Packing: every vector the program computes is held as one ciphertext *per
element*; slot j of each ciphertext belongs to sample j. A ciphertext batch so
holds up to N/2 samples (4,096 at N=8192); more samples make further batches.
An affine stage is, per output element, a sum of ciphertext x plain scalar
products over the non-zero weights of its column plus a plain bias, rescaled
once; a polynomial is the same element-wise operations as in latency mode, on
every element's ciphertext. No rotations, hence no Galois keys: the public
context is a fraction of latency mode's. A product of two encrypted vectors
(attention's QKᵀ, weights x V) is, per output element, its ciphertext x
ciphertext products summed before one rescale; values read together are first
brought to one level by modulus switching.

Two backends compute this, with the same invariants (:mod:`.batch_seal`'s
docstring), so the shared evaluator's level/factor bookkeeping and drift
compensation hold for both:

* :mod:`.batch_rns` (the default): the linear maps as exact integer matrix
  products on the ciphertexts' RNS data, SEAL for everything that needs a key,
  randomness or an NTT; each operation's elements shared out among processes
  forked once per run (:class:`~.forks.Workers`), batches one after another.
* :mod:`.batch_seal`: one ``multiply_plain`` call per product (issue 18), the
  reference the first is tested against bit for bit, and the fallback where
  :func:`~.seal.layout_ok` finds a ciphertext's data out of reach.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .evaluate import _evaluate, _evaluate_from, _PlainBackend
from .seal import Seal
from .stages import Affine, Bilinear, Poly, Program, inputs_of, last_uses


def packing(batch_size: int, inputs: int) -> str:
    """What the report says of this packing."""
    return (f"batch (CryptoNets): one ciphertext per input element, sample j in slot j of each; "
            f"{batch_size} samples per batch of {inputs} ciphertexts; ciphertext x plain scalar products "
            "over non-zero weights as integer matrix products on the ciphertexts' RNS data, one rescale "
            "per output; no rotations (no Galois keys)")


def peak_bytes(program: Program, params: Any, processes: int | None = None) -> int:
    """The shared memory :mod:`.batch_rns` holds at its peak for one batch (what its
    arena grows to), counted from the program. Each value is held until its last
    reader as (elements x parts x primes of its level x N x 8) bytes: 2 parts once
    settled; a lone ciphertext x ciphertext product (x²) holds nothing of its own
    (it is computed by its reader), sums of products (attention) 3 parts one
    level up. A stage adds its output and its scratch: an affine stage each
    process's unrescaled column chunk (or, reading deferred products of a dense
    layer, each process's chunk of products, its float64 sums and its partial
    result), the copy joining several inputs; a polynomial its powers."""
    from .batch_rns import COLUMN_CHUNK
    from .deferred import DENSE, ROW_CHUNK
    from .rns import plan

    levels: dict[int, int] = {}
    _evaluate(program, _PlainBackend(), np.zeros((1, program.input_size)), levels)
    n_primes = len(params.coeff_mod_bit_sizes) - 1  # the special prime is in the keys only
    ring = params.poly_modulus_degree * 8
    processes = max(1, processes or os.cpu_count() or 1)

    def count(value: int) -> int:
        return program.input_size if value == 0 else program.stages[value - 1].size

    def primes(level: int) -> int:
        return n_primes - level

    def lone_product(s: Any) -> bool:  # a Poly the backend leaves deferred: ±x^2
        if not isinstance(s, Poly):
            return False
        c = s.coefficients
        return c.ndim == 1 and c.shape[0] == 3 and c[0] == 0 and c[1] == 0 and abs(c[2]) == 1

    held: dict[int, int] = {0: count(0) * 2 * primes(0) * ring}  # bytes each value holds
    for i, s in enumerate(program.stages):
        level = levels[i + 1]
        if isinstance(s, Bilinear):
            held[i + 1] = s.size * 3 * primes(level - 1) * ring
        elif lone_product(s):
            held[i + 1] = 0
        else:
            held[i + 1] = s.size * 2 * primes(level) * ring

    def settled_copy(v: int) -> int:  # what settling a deferred value makes (a product or sums of them)
        if v and (lone_product(program.stages[v - 1]) or isinstance(program.stages[v - 1], Bilinear)):
            return count(v) * 2 * primes(levels[v]) * ring
        return 0

    last, live, peak = last_uses(program.stages), {0}, 0
    for k, s in enumerate(program.stages):  # a deferred product keeps its input until it is read
        if lone_product(s):
            (v,) = inputs_of(s, k)
            last[v] = max(last[v], last.get(k + 1, k))
    for i, s in enumerate(program.stages):
        ins = inputs_of(s, i)
        now = sum(held[v] for v in live) + held[i + 1]
        top = max(levels[v] for v in ins)
        if isinstance(s, Affine):
            deferred = [v for v in ins if v and lone_product(program.stages[v - 1])]
            if deferred and len(ins) == 1:
                L = primes(top - 1)  # the products' own level, one above where they are counted
                n_in = s.matrix.shape[0]
                dense = np.count_nonzero(s.matrix) >= DENSE * s.matrix.size
                if dense and processes * s.size <= n_in:
                    nw = plan(2 ** params.scale_bits - 1, n_in).nw  # float64 sums: nw per output
                    now += processes * (min(ROW_CHUNK, n_in) * 3 * L * ring + (nw + 1) * s.size * 3 * L * ring)
                else:
                    now += n_in * 3 * L * ring  # computed whole before the products
            else:
                width = 3 if len(ins) == 1 and settled_copy(ins[0]) else 2
                now += processes * min(COLUMN_CHUNK, s.size) * width * primes(top) * ring
            if len(ins) > 1:  # each deferred input settled, then all of them joined in one copy
                now += sum(settled_copy(v) + count(v) * 2 * primes(top) * ring for v in ins)
        elif isinstance(s, Poly) and not lone_product(s):
            # the input settled (if deferred); then at most the running sum, a term and their sum
            now += settled_copy(ins[0]) + 3 * s.size * 2 * primes(top) * ring
        elif isinstance(s, Bilinear):
            now += sum(settled_copy(v) for v in set(ins))
        peak = max(peak, now)
        live = {v for v in live | {i + 1} if last.get(v, -1) > i}
    return peak


@dataclass
class BatchResult:
    logits: np.ndarray  # (samples, outputs), decrypted and divided by the output factor
    times: list[dict[str, float]]  # per batch: encrypt, evaluate, decrypt seconds
    batch_sizes: list[int]
    workers: int
    wall_seconds: float
    sizes: dict[str, int] = field(default_factory=dict)  # per batch: input, output; one ciphertext: each
    # Bytes: "main" this process's peak RSS, "worker" the largest forked helper's, "shared"
    # the shared memory their arrays live in (the arena; pages of it count in the RSS
    # of whichever process maps them).
    peak_rss: dict[str, int] = field(default_factory=dict)
    stage_seconds: list[float] = field(default_factory=list)  # per program stage, summed over the batches
    finish_seconds: float = 0.0  # settling the output (relinearised, as sent back), summed
    backend: str = "rns"  # which backend ran: "rns" (batch_rns) or "seal" (batch_seal, the fallback)
    setup_seconds: float = 0.0  # keys (set by the worker that makes them)


def run_batches(
    program: Program, context: Any, params: Any, x: np.ndarray, *, batch_size: int | None = None,
    workers: int | None = None, progress: Callable[[int, int], None] | None = None,
    encryption: str | None = None, backend_name: str | None = None,
) -> BatchResult:
    """Encrypt ``x`` (samples, ...) in batches of ``batch_size`` (default: all the
    slots), evaluate ``program`` on each and decrypt, one batch after another,
    each operation's elements shared out among ``workers`` processes [default:
    one per core]. ``encryption`` names how the samples are encrypted
    (:data:`~.encryption.ENCRYPTIONS`; default public-key). ``backend_name``
    "seal" runs issue 18's backend (one SEAL call per product: the benchmark's
    same-run reference); None, the products on ciphertext data where this
    TenSEAL's layout allows. The output leaves the evaluation relinearised
    (``backend.finish``), as a server would send it back."""
    from .batch_rns import RnsBatchBackend
    from .forks import own_peak_rss
    from .batch_seal import SealBatchBackend
    from .seal import layout_ok

    flat = np.asarray(x, "float64").reshape(len(x), -1)
    slots = params.poly_modulus_degree // 2
    size = min(batch_size or slots, slots)
    batches = [flat[i:i + size] for i in range(0, len(flat), size)]
    workers = max(1, workers or os.cpu_count() or 1)
    fast = backend_name != "seal" and layout_ok(context)
    backend: Any = (RnsBatchBackend(context, workers, encryption) if fast
                    else SealBatchBackend(context, workers, encryption))
    stage_seconds = [0.0] * len(program.stages)

    def on_stage(i: int, seconds: float) -> None:
        stage_seconds[i] += seconds

    logits, times, sizes, finish = [], [], {}, 0.0
    start = time.perf_counter()
    try:
        for index, xb in enumerate(batches):
            t0 = time.perf_counter()
            held = [backend.encrypt(xb)]
            t1 = time.perf_counter()
            if index == 0:  # what the data owner sends: one input ciphertext, as its encryption makes it
                n_in, one_in = len(held[0]), backend.sent_bytes(xb[:, 0])
            # The only reference goes to the evaluator, which frees the input after its last reader.
            out = _evaluate_from(program, backend, held.pop(), on_stage=on_stage)
            settling = time.perf_counter()
            data = backend.finish(out.data)
            t2 = time.perf_counter()
            finish += t2 - settling
            logits.append(backend.decrypt(data, len(xb)) / out.factor)
            t3 = time.perf_counter()
            if index == 0:
                one_out = len(Seal.serialize(backend.ciphertext(data[0])))
                sizes = {"input": one_in * n_in, "output": one_out * len(data),
                         "input_ciphertext": one_in, "output_ciphertext": one_out}
            times.append({"encrypt": t1 - t0, "evaluate": t2 - t1, "decrypt": t3 - t2})
            del out, data
            if progress is not None:
                progress(sum(len(b) for b in batches[:index + 1]), len(flat))
        wall = time.perf_counter() - start
    finally:
        backend.close()
    rss = {"main": own_peak_rss()}
    if backend.helpers_peak_rss():
        rss["worker"] = backend.helpers_peak_rss()
    if fast:
        rss["shared"] = backend.arena.nbytes  # not RSS of one process: the arena all of them map
    return BatchResult(
        logits=np.concatenate(logits), times=times, batch_sizes=[len(b) for b in batches], workers=workers,
        wall_seconds=wall, sizes=sizes, peak_rss=rss, stage_seconds=stage_seconds, finish_seconds=finish,
        backend="rns" if fast else "seal",
    )
