"""``run``: compile, choose parameters, encrypt, evaluate, decrypt, compare."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from . import batch, latency
from .evaluate import _evaluate_from
from .encryption import encryption_named
from .limits import OutOfScopeError, ParameterError
from .params import CKKSParameters, choose_parameters, depth_and_magnitudes, make_context
from .program import _softmax, compile_model
from .worker import run_in_worker


# The decrypted logits may differ from the plaintext program's by this much, relative to
# their largest magnitude: CKKS noise at the chosen scales measures 2e-5 to 7e-5
# (docs/benchmarks.md); a parameter or evaluator fault is O(1).
MAX_REL_LOGIT_ERROR = 1e-2


@dataclass
class HERunReport:
    samples: int
    parameters: CKKSParameters
    stages: list[str]
    agreement: float
    max_abs_logit_error: float
    max_rel_logit_error: float
    plaintext_accuracy: float | None
    encrypted_accuracy: float | None
    compile_check: float  # largest |softmax(program) - model| (or logits) on the samples
    latency: dict[str, dict[str, float]]  # phase -> mean, max seconds a sample waits (batch mode: its batch's)
    sizes: dict[str, int]  # bytes (serialized; batch mode: per batch); empty when not measured (notes)
    setup_seconds: float
    final_softmax: bool
    disagreements: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = "latency"
    packing: str = ""
    throughput: float = 0.0  # samples per second, encrypt + evaluate + decrypt, wall clock
    wall_seconds: float = 0.0
    batches: int = 0
    batch_size: int = 1  # samples per ciphertext batch
    batch_latency: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> mean, max per batch
    workers: int = 1
    encryption: str = "public-key"  # how the samples were encrypted (.encryption.ENCRYPTIONS)
    # Bytes: "main" the process that encrypted and evaluated (batch mode: its own worker
    # process), "worker" its largest forked helper, "shared" batch mode's shared memory
    # (the ciphertext data, mapped by those processes), "caller" this process.
    peak_rss: dict[str, int] = field(default_factory=dict)
    # Batch mode: seconds per phase and per program stage, summed over the batches, in order.
    stage_times: dict[str, float] = field(default_factory=dict)
    # Per sample (not in to_dict): decrypted logits and the plaintext program's.
    encrypted_logits: np.ndarray | None = None
    plaintext_logits: np.ndarray | None = None

    def failure(self) -> str | None:
        """Why the encrypted run did not reproduce the plaintext one, or None:
        non-finite decrypted logits, or logits further than :data:`MAX_REL_LOGIT_ERROR`
        (relative) from the plaintext program's."""
        logits = self.encrypted_logits
        if logits is not None and not np.all(np.isfinite(logits)):
            return f"{int(np.size(logits) - np.isfinite(logits).sum())} decrypted logit(s) are NaN/Inf"
        if not self.max_rel_logit_error <= MAX_REL_LOGIT_ERROR:
            return (f"the decrypted logits differ from plaintext by {self.max_rel_logit_error:.3g} of their "
                    f"largest magnitude (allowed: {MAX_REL_LOGIT_ERROR:g}); the encrypted run does not reproduce "
                    "the model")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "failure": self.failure(),
            "samples": self.samples, "parameters": self.parameters.to_dict(), "stages": list(self.stages),
            "top1_agreement": self.agreement, "max_abs_logit_error": self.max_abs_logit_error,
            "max_rel_logit_error": self.max_rel_logit_error,
            "plaintext_accuracy": self.plaintext_accuracy, "encrypted_accuracy": self.encrypted_accuracy,
            "plaintext_check": self.compile_check, "latency_seconds": self.latency,
            "ciphertext_bytes": self.sizes, "setup_seconds": self.setup_seconds,
            "final_softmax": self.final_softmax, "disagreements": list(self.disagreements),
            "notes": list(self.notes), "mode": self.mode, "packing": self.packing,
            "throughput_per_second": self.throughput, "wall_seconds": self.wall_seconds,
            "batches": self.batches, "batch_size": self.batch_size, "batch_latency_seconds": self.batch_latency,
            "workers": self.workers, "peak_rss_bytes": dict(self.peak_rss), "stage_seconds": dict(self.stage_times),
            "encryption": self.encryption,
        }


MODES = ("batch", "latency")


BATCH_ABOVE = 8  # the default mode: batch for more samples than this, latency otherwise


# Memory a batch run needs beyond its ciphertext data's peak (batch.peak_bytes): the
# arena's placement (measured: 1.54 GB held for 1.45 GB predicted on the fixture,
# 1.90 for 1.82 on the 8-filter network), and each process's own memory.
MEMORY_MARGIN = 1.15
PROCESS_BYTES = 500_000_000


def refuse_not_polynomial(model: Any) -> None:
    """Refuse, before compiling, a model with attention whose parts are not yet
    polynomials: one line naming the first such op and the convert command."""
    from ..sites import is_graph_model
    from .readiness import he_report

    if not is_graph_model(model):
        return
    report = he_report(model)
    if report.parts and report.non_polynomial:
        item = report.non_polynomial[0]
        raise OutOfScopeError(
            f"'{item['path']}': {item['op']} is not a polynomial; convert the model first: "
            "`actswap convert MODEL --from all --to approx` (or `actswap recover ... --to approx --from all`)"
        )


def refuse_depth(program: Any, depth: int) -> None:
    """Refuse a compiled program deeper than any 128-bit-secure CKKS setting holds,
    in one line: the depth needed (and its ciphertext x ciphertext products) and
    the most available."""
    from .limits import MAX_MODULUS_BITS, MIN_SCALE_BITS, max_depth
    from .stages import Bilinear

    available = max_depth()
    if depth > available:
        products = sum(isinstance(s, Bilinear) for s in program.stages)
        raise ParameterError(
            f"multiplicative depth {depth} needed ({products} stages of ciphertext x ciphertext products), at most "
            f"{available} available at 128-bit security (N={max(MAX_MODULUS_BITS)}, "
            f"{max(MAX_MODULUS_BITS.values())}-bit modulus, 2^{MIN_SCALE_BITS} scale): use fewer blocks or "
            "lower-degree polynomials"
        )


def _refuse_memory(program: Any, params: CKKSParameters, workers: int | None) -> None:
    """Refuse a batch run whose ciphertext data (:func:`.batch.peak_bytes`; batches
    run one after another) would not fit the memory available now."""
    need = batch.peak_bytes(program, params, workers) * MEMORY_MARGIN + PROCESS_BYTES
    available = _available_memory()
    if available is not None and need > available:
        raise ParameterError(
            f"batch mode would hold {need / 1e9:.1f} GB at its peak (N={params.poly_modulus_degree}, depth "
            f"{params.depth}, one batch of ciphertexts at a time), more than the {available / 1e9:.1f} GB of "
            "memory available: a smaller model (fewer blocks or narrower layers) or a machine with more memory"
        )


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None."""
    from .forks import proc_bytes

    return proc_bytes("/proc/meminfo", "MemAvailable")


def run(
    model: Any,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    limit: int | None = None,
    params: CKKSParameters | None = None,
    mode: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_parameters: Callable[[CKKSParameters], None] | None = None,
    encryption: str | None = None,
) -> HERunReport:
    """Run ``model`` (a Keras model or a path) on the samples ``x`` encrypted and
    compare with plaintext. ``mode`` "latency": one ciphertext per sample
    (:mod:`.latency`: products by generalized diagonals); "batch": one ciphertext
    per input element holding up to N/2 samples (:mod:`.batch`) on ``workers``
    processes [default: batch for more than :data:`BATCH_ABOVE` samples, and
    always for a model that is not a chain (residual branches, attention), which
    latency mode does not run].
    ``batch_size`` caps the samples per ciphertext. ``encryption`` is how the
    samples are encrypted, a name in :data:`~.encryption.ENCRYPTIONS`: SEAL's
    "public-key" encryption (the default) or its "secret-key" one (the data
    owner's, half the bytes sent, about twice as fast).

    The plaintext reference is the model itself: top-1 agreement is against its
    predictions, and the logits it compiles to (checked against its own outputs
    on these samples: ``plaintext_check``) are what the decrypted logits are
    compared with. ``progress(done, total)`` is called after each sample (batch
    mode: each batch); ``on_parameters`` once the parameters are chosen (before
    the slow part).
    """
    from ..keras_setup import require_tensorflow

    # The compiler runs the layers in float64 on TensorFlow tensors (JAX's default
    # is float32, which would lose the matrices' precision).
    require_tensorflow("the encrypted run")
    try:
        import cloudpickle  # noqa: F401  - batch mode's operations travel to its forked processes
        import tenseal  # noqa: F401
    except ImportError as e:
        raise UserError(f"the encrypted run needs {({'tenseal': 'TenSEAL'}).get(e.name, e.name)}: pip install 'actswap[he]'") from None
    if mode is not None and mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    encryption = encryption_named(encryption).name
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not hasattr(model, "inputs"):
        from ..formats import load_keras_model

        model = load_keras_model(model)[0]
    x = np.asarray(x)
    if y is not None and len(y) != len(x):
        raise UserError(f"x has {len(x)} samples but y has {len(y)} labels")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        x = x[:limit]
        y = None if y is None else np.asarray(y)[:limit]
    if len(x) == 0:
        raise UserError("no samples to run")
    chosen, mode = mode, mode or ("batch" if len(x) > BATCH_ABOVE else "latency")
    if mode == "latency" and (workers or 1) > 1:
        raise UserError(f"--workers {workers} is for batch mode; latency mode evaluates one sample at a time "
                        "on one core (SEAL's Python binding holds the GIL)")
    want = tuple(model.inputs[0].shape[1:]) if len(getattr(model, "inputs", [])) == 1 else None
    if want is not None and None not in want and tuple(x.shape[1:]) != want:
        if int(np.prod(x.shape[1:])) != int(np.prod(want)):
            raise UserError(f"the samples have shape {tuple(x.shape[1:])}, the model takes {want}")
        x = x.reshape((len(x),) + want)  # e.g. MNIST without its channel axis
    x = x.astype("float32")
    refuse_not_polynomial(model)
    program = compile_model(model, x[:16])
    if not program.is_chain:
        if chosen == "latency":
            raise OutOfScopeError(
                "latency mode runs chains of layers only; this model has residual branches or attention "
                "(stages reading several values): use --mode batch"
            )
        mode = "batch"
    plain_logits = program.plain(x)
    model_out = np.asarray(model.predict(x, batch_size=256, verbose=0), "float64").reshape(len(x), -1)
    mine = _softmax(plain_logits) if program.final_softmax else plain_logits
    compile_check = float(np.abs(mine - model_out).max())
    depth, magnitude = depth_and_magnitudes(program, x)
    refuse_depth(program, depth)
    slots = latency.slots_needed(program)
    if mode == "batch":
        # The smallest N that holds the depth (cheapest per batch); its slots hold the batch.
        n = params.poly_modulus_degree if params is not None else choose_parameters(depth, 1, magnitude).poly_modulus_degree
        slots = min(len(x), batch_size or n // 2, n // 2)
    if params is None:
        params = choose_parameters(depth, slots, magnitude)
    elif params.depth < depth or params.poly_modulus_degree // 2 < slots:
        raise UserError(
            f"the parameters given have depth {params.depth} and {params.poly_modulus_degree // 2} slots; "
            f"this model needs depth {depth} and {slots} slots"
        )
    if mode == "batch":
        _refuse_memory(program, params, workers)
    if on_parameters is not None:
        on_parameters(params)
    t0 = time.perf_counter()
    notes, stage_times = [], {}
    if mode == "batch":
        out = run_in_worker(program, params, x, batch_size=batch_size, workers=workers, progress=progress,
                            encryption=encryption)
        enc_logits, sizes, times = out.logits, dict(out.sizes), out.times
        setup = out.setup_seconds
        packing = batch.packing(out.batch_sizes[0], program.input_size)
        extra = dict(wall_seconds=out.wall_seconds, batches=len(out.batch_sizes), batch_size=out.batch_sizes[0],
                     workers=out.workers, peak_rss=dict(out.peak_rss, caller=_peak_rss()))
        stage_times = {"encrypt": sum(t["encrypt"] for t in times)}
        stage_times.update({f"{k + 1}: {s.describe()}": out.stage_seconds[k] for k, s in enumerate(program.stages)})
        stage_times["relinearise and send back"] = out.finish_seconds
        stage_times["decrypt"] = sum(t["decrypt"] for t in times)
        if out.backend != "rns":
            notes.append("the affine stages ran as one SEAL call per product (slower): this TenSEAL's "
                         "ciphertext memory layout is not the one actswap reads")
    else:
        ctx = make_context(params, galois=True)
        backend = latency.LatencyBackend(ctx, encryption).prepare(program)  # plans every product once
        setup = time.perf_counter() - t0
        enc_logits, times, sizes, wall = _latency_mode(program, backend, x, progress)
        packing = f"{backend.packing}; per product: {'; '.join(backend.describe())}"
        extra = dict(wall_seconds=wall, batches=len(x), batch_size=1, workers=1, peak_rss={"main": _peak_rss()})
        if _serialize_is_safe():
            sizes["public_context"] = len(ctx.serialize(save_public_key=True, save_secret_key=False,
                                                        save_galois_keys=True, save_relin_keys=True))
        else:
            what = "public context size" if sizes else "ciphertext sizes"
            notes.append(f"{what} not measured: TensorFlow was imported before TenSEAL, and then "
                         "TenSEAL's serialize() crashes (their protobuf libraries clash); import tenseal first")
    err = np.abs(enc_logits - plain_logits)
    rel = err.max() / max(1e-12, float(np.abs(plain_logits).max()))
    model_top1 = model_out.argmax(axis=1)
    enc_top1 = enc_logits.argmax(axis=1)
    agree = enc_top1 == model_top1
    per_batch = {k: {"mean": float(np.mean([t[k] for t in times])), "max": float(np.max([t[k] for t in times]))}
                 for k in ("encrypt", "evaluate", "decrypt")}
    return HERunReport(
        samples=len(x), parameters=params, stages=[s.describe() for s in program.stages],
        agreement=float(agree.mean()), max_abs_logit_error=float(err.max()), max_rel_logit_error=float(rel),
        plaintext_accuracy=None if y is None else float((model_top1 == y).mean()),
        encrypted_accuracy=None if y is None else float((enc_top1 == y).mean()),
        compile_check=compile_check, latency=per_batch, sizes=sizes, setup_seconds=setup,
        final_softmax=program.final_softmax, disagreements=[int(i) for i in np.flatnonzero(~agree)],
        notes=notes, encrypted_logits=enc_logits, plaintext_logits=plain_logits, mode=mode, packing=packing,
        throughput=len(x) / max(extra["wall_seconds"], 1e-9), batch_latency=per_batch, stage_times=stage_times,
        encryption=encryption, **extra,
    )


def _peak_rss() -> int:
    from .forks import own_peak_rss

    return own_peak_rss()


def _latency_mode(program: Any, backend: Any, x: np.ndarray, progress: Callable[[int, int], None] | None,
                  ) -> tuple[np.ndarray, list[dict[str, float]], dict[str, int], float]:
    """One ciphertext per sample: logits, per-sample phase times, sizes, wall seconds."""
    flat = x.reshape(len(x), -1).astype("float64")
    enc_logits = np.zeros((len(x), program.output_size))
    times, sizes = [], {}
    start = time.perf_counter()
    for i in range(len(x)):
        t = time.perf_counter()
        enc = backend.encrypt(flat[i])
        t1 = time.perf_counter()
        out = _evaluate_from(program, backend, enc)
        t2 = time.perf_counter()
        enc_logits[i] = np.asarray(out.data.decrypt()) / out.factor
        t3 = time.perf_counter()
        times.append({"encrypt": t1 - t, "evaluate": t2 - t1, "decrypt": t3 - t2})
        if i == 0 and _serialize_is_safe():  # the input as the data owner sends it (its encryption's form)
            sizes = {"input": backend.sent_bytes(flat[i]), "output": len(out.data.serialize())}
        if progress is not None:
            progress(i + 1, len(x))
    return enc_logits, times, sizes, time.perf_counter() - start


def _serialize_is_safe() -> bool:
    """Whether TenSEAL was loaded before TensorFlow (sys.modules keeps import order):
    the other way round, TenSEAL's serialize() segfaults (TF 2.21, TenSEAL 0.3.18)."""
    import sys

    names = list(sys.modules)
    return "tensorflow" not in sys.modules or names.index("tenseal") < names.index("tensorflow")
