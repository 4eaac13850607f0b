"""Batch mode's linear maps on ciphertext data (actswap.he.rns, actswap.he.batch_rns).

Two independent references: exact Python integers for the modular arithmetic,
and SEAL itself (one ``multiply_plain``/``add`` call per product, the
``batch_seal`` backend) for the affine stages, which must agree bit for bit.
End to end, the decrypted results are compared with plaintext numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actswap.he import rns

# Primes of the sizes actswap's parameters use: 25-40-bit scales, up to 60-bit first primes.
PRIMES = [33554393, 134176769, 1099511480321, (1 << 50) - 27, 1152921504606846883]


def reference_matmul(x: np.ndarray, ints: np.ndarray, q: int) -> np.ndarray:
    """sum_i W[i, j] x[i] mod q with Python integers: x (k, D) uint64, ints (k, n)."""
    k, n = ints.shape
    W = [[int(v) for v in row] for row in ints]
    X = [[int(v) for v in row] for row in x]
    return np.array([[sum(W[i][j] * X[i][c] for i in range(k)) % q for c in range(x.shape[1])]
                     for j in range(n)], dtype=object)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(PRIMES), st.integers(0, 2**32), st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20))
def test_mulmod_is_exact(q, seed, values):
    t = seed % q
    a = np.array([v % q for v in values], np.uint64)
    got = rns.mulmod(a, t, rns.shoup(t, q), q)
    assert [int(v) for v in got] == [(int(v) * t) % q for v in a]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(PRIMES), st.integers(1, 3000))
def test_every_digit_plan_keeps_partial_sums_exact(q, inner):
    d = rns.plan(q, inner)
    b = q.bit_length()
    data = 2.0**b if d.nx == 1 else d.nx * 2.0 ** (d.bx - 1)
    assert inner * data * 2.0 ** (d.bw - 1) < rns.EXACT
    assert d.nx * d.bx >= b and d.nw * d.bw >= b


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(PRIMES), st.integers(0, 2**32))
def test_digits_rebuild_the_centred_residues(q, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, q, 50, dtype=np.uint64)
    d = rns.plan(q, 100)
    c = rns.centered(a, q)
    parts = rns.digits(c, d.bw, d.nw)
    assert np.abs(parts).max() <= 2 ** (d.bw - 1)
    rebuilt = sum(int(v) << (i * d.bw) for i, v in enumerate(parts[:, 0]))
    assert rebuilt == int(c[0]) and (rebuilt - int(a[0])) % q == 0


def test_encode_rounds_halves_away_from_zero_like_seal():
    # C's round(): 2.5 -> 3, -2.5 -> -3 (numpy's round would give 2 and -2).
    assert list(rns.encode([2.5, -2.5, 0.49999999999999994, -0.5, 1e20], 1.0)) == [3, -3, 0, -1, 1e20]
    assert [int(v) for v in rns.residues(np.array([-3.0, 1e20]), 97)] == [94, int(1e20) % 97]


@pytest.mark.parametrize("q", PRIMES)
def test_modular_matrix_equals_integer_arithmetic(q):
    """Sparse (a convolution-like band, zero columns, weights that round to zero),
    negative weights, both layouts of digits, against Python integers."""
    rng = np.random.default_rng(q % 1000)
    k, n, D = 40, 13, 37
    m = rng.normal(size=(k, n)) * (np.abs(np.arange(k)[:, None] - 3 * np.arange(n)[None, :]) < 6)
    m[:, 4] = 0  # a zero column
    m[5, 6] = 1e-12  # encodes to 0 at scale 2^27: skipped, like SEAL's multiply by 0
    x = rng.integers(0, q, (k, 2, 1, D), dtype=np.uint64)
    mm = rns.ModularMatrix(m, 2.0**27, [q])
    out = np.empty((n, 2, 1, D), np.uint64)
    mm.apply(x, out)
    ints = rns.encode(m, 2.0**27)
    for p in range(2):
        assert (out[:, p, 0, :].astype(object) == reference_matmul(x[:, p, 0, :], ints, q)).all()
    cols = np.array([7, 2, 11])  # a subset, in any order
    part = np.empty((3, 2, 1, D), np.uint64)
    mm.apply(x, part, cols)
    assert np.array_equal(part, out[cols])


def test_row_sums_over_chunks_equal_integer_arithmetic():
    # Two primes at once (a 27-bit one taken whole, a 40-bit one cut into digits), so
    # each prime's residues are a strided slice of the chunk, as in a real level.
    primes = [134176769, 1099511480321]
    rng = np.random.default_rng(1)
    k, n, D = 30, 4, 21
    m = rng.normal(size=(k, n)) * 3
    x = np.stack([rng.integers(0, q, (k, 3, D), dtype=np.uint64) for q in primes], axis=2)
    sums = rns.RowSums(m, 2.0**27, primes, (3, D))
    for lo in range(0, k, 7):  # rows arriving in chunks
        sums.add(x[lo:lo + 7], lo)
    out = np.empty((n, 3, 2, D), np.uint64)
    sums.result(out)
    ints = rns.encode(m, 2.0**27)
    for l, q in enumerate(primes):
        for p in range(3):
            assert (out[:, p, l, :].astype(object) == reference_matmul(x[:, p, l, :], ints, q)).all()


# --- against SEAL: the affine stages bit for bit ------------------------------------

ts = pytest.importorskip("tenseal")

from actswap.he import batch as he_batch  # noqa: E402
from actswap.he import batch_rns, batch_seal, seal as he_seal  # noqa: E402
from actswap.he import params as he_params  # noqa: E402

# CKKS noise at scale 2^33 is ~1e-6 of the values (products, relinearisation,
# rescales); 1e-4 leaves a wide margin, while a wrong residue is O(1) or more.
NOISE = 1e-4


@pytest.fixture(scope="module")
def backends():
    params = he_params.choose_parameters(4, 1, {4: 10.0})
    ctx = he_params.make_context(params, galois=False)
    assert he_seal.layout_ok(ctx)  # this TenSEAL's ciphertexts are the layout batch_rns reads
    return params, batch_rns.RnsBatchBackend(ctx, 2), batch_seal.SealBatchBackend(ctx)


def as_data(cts):
    return np.stack([he_seal.ciphertext_data(c).copy() for c in cts])


def weights(rng, k, n, scale):
    m = rng.normal(size=(k, n))
    m[0] = 0.0  # zero weights
    m[1, ::2] *= -5  # negative ones, larger
    m[2, 1] = 0.4 / scale  # encodes to 0 (|w| 2^s < 1/2): skipped by both
    m[:, 3] = 0.2 / scale  # a whole column that encodes to 0: an encryption of zero
    return m


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_affine_stage_equals_seal_multiply_plain_at_every_level(backends, level):
    params, rns_b, seal_b = backends
    rng = np.random.default_rng(level)
    samples = 7  # an odd batch: the slots past it hold zeros
    x = rng.uniform(-1, 1, (samples, 9))
    cts = seal_b.lower(seal_b.encrypt(x), level - 1)
    m, bias = weights(rng, 9, 6, rns_b.scale), rng.normal(size=6)
    ref = seal_b.add_vector(seal_b.matmul(cts, m, level), bias, None)
    got = rns_b.matmul_bias(as_data(cts), m, bias, level)
    zero = 3
    keep = [j for j in range(6) if j != zero]
    assert np.array_equal(got[keep], as_data(ref)[keep])  # bit for bit
    # The rescale leaves its drift on the products (the evaluator folds it into the weights).
    plain = (x @ m) * rns_b.drift(level) + bias
    decrypted = rns_b.decrypt(got, samples)
    np.testing.assert_allclose(decrypted, plain, atol=NOISE * np.abs(plain).max())
    assert np.abs(decrypted[:, zero] - bias[zero]).max() < NOISE  # the zero column: its bias only


def test_largest_magnitude_the_parameters_allow(backends):
    """Values at the bound the parameter choice covers (2^(integer bits - 1 - margin))
    through two affine stages: bit-identical to SEAL, and decrypted exactly enough."""
    from actswap.he.limits import MARGIN_BITS

    biggest = 2.0 ** (14 - 1 - MARGIN_BITS)
    params = he_params.choose_parameters(2, 1, {1: biggest, 2: biggest})
    assert params.integer_bits >= 14
    ctx = he_params.make_context(params, galois=False)
    rns_b, seal_b = batch_rns.RnsBatchBackend(ctx, 1), batch_seal.SealBatchBackend(ctx)
    x = np.array([[biggest, -biggest, biggest / 3], [-biggest, biggest, 1.0]])
    m = np.array([[1.0, -0.5], [-0.0, 0.5], [0.25, 1.0]])
    cts = seal_b.encrypt(x)
    ref = seal_b.matmul(seal_b.matmul(cts, m, 1), np.eye(2), 2)
    got = rns_b.matmul(rns_b.matmul(as_data(cts), m, 1), np.eye(2), 2)
    assert np.array_equal(got, as_data(ref))
    f = rns_b.drift(1) * rns_b.drift(2)
    np.testing.assert_allclose(rns_b.decrypt(got, 2) / f, x @ m, rtol=1e-6, atol=1e-6 * biggest)


@pytest.mark.parametrize("wide", [False, True])
def test_products_deferred_into_the_next_affine_stage(backends, wide):
    """x² then a dense layer: the squares are folded into the layer's sums before
    any rescale (row by row when the layer is narrow, whole when it is wide);
    the decrypted result matches plaintext like SEAL's relinearise-then-rescale path."""
    params, rns_b, seal_b = backends
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (5, 6))
    m = rng.normal(size=(6, 40 if wide else 2))
    f1, f2 = rns_b.drift(1), rns_b.drift(2)
    cts = seal_b.encrypt(x)
    product = rns_b.mul(as_data(cts), as_data(cts), 1)
    assert isinstance(product, batch_rns.Product)  # nothing computed yet
    got = rns_b.decrypt(rns_b.matmul(product, m / (f1 * f2), 2), 5)
    seal_got = seal_b.decrypt(seal_b.matmul(seal_b.mul(cts, cts, 1), m / (f1 * f2), 2), 5)
    plain = (x**2) @ m
    assert np.abs(got - plain).max() < NOISE * np.abs(plain).max()
    assert np.abs(seal_got - plain).max() < NOISE * np.abs(plain).max()


def test_other_readers_settle_products_first(backends):
    """A product read by a plain scalar product, a negation or an addition."""
    params, rns_b, seal_b = backends
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, (3, 4))
    data = as_data(seal_b.encrypt(x))
    f1, f2 = rns_b.drift(1), rns_b.drift(2)
    v = np.array([0.5, -2.0, 0.0, 1.5])
    scaled = rns_b.decrypt(rns_b.mul_vector(rns_b.mul(data, data, 1), v / (f1 * f2), None, 2), 3)
    np.testing.assert_allclose(scaled, x**2 * v, atol=NOISE)
    negated = rns_b.decrypt(rns_b.finish(rns_b.neg(rns_b.mul(data, data, 1))), 3) / f1
    np.testing.assert_allclose(negated, -(x**2), atol=NOISE)
    summed = rns_b.decrypt(rns_b.add(rns_b.mul(data, data, 1), rns_b.mul(data, data, 1)), 3) / f1
    np.testing.assert_allclose(summed, 2 * x**2, atol=NOISE)


def test_layout_probe_and_the_seal_fallback(monkeypatch):
    """If a ciphertext's data cannot be read in place, batch mode runs on SEAL's
    per-product path instead, and says so."""
    import keras

    from test_he_run import randomize

    keras.utils.set_random_seed(0)
    L = keras.layers
    from actswap.activations import Square

    model = randomize(keras.Sequential([keras.Input((4,)), L.Dense(3), Square(), L.Dense(2)]), seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 4)).astype("float32")
    from actswap.he import program as he_program

    program = he_program.compile_model(model)
    depth, magnitude = he_params.depth_and_magnitudes(program, x)
    params = he_params.choose_parameters(depth, 1, magnitude)
    ctx = he_params.make_context(params, galois=False)
    reference = np.asarray(model(x), "float64")
    fast = he_batch.run_batches(program, ctx, params, x, workers=1)
    chosen = he_batch.run_batches(program, ctx, params, x, workers=1, backend_name="seal")  # the benchmark's reference
    monkeypatch.setattr(he_seal, "layout_ok", lambda context: False)
    slow = he_batch.run_batches(program, ctx, params, x, workers=1)
    assert (fast.backend, slow.backend, chosen.backend) == ("rns", "seal", "seal")
    for out in (fast, slow, chosen):
        assert np.abs(out.logits - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())
    assert len(fast.stage_seconds) == len(program.stages) and all(t >= 0 for t in fast.stage_seconds)


def test_a_failing_worker_process_is_an_error_naming_its_cause():
    """The encrypted run's own process (actswap.he.worker) failing is an error
    carrying its last line, not a silent result."""
    from actswap.he.worker import run_in_worker

    with pytest.raises(RuntimeError, match=r"encrypted batch run failed \(exit 1\): AttributeError"):
        run_in_worker(None, None, np.zeros((2, 3)), batch_size=None, workers=1)
