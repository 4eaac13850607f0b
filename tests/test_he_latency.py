"""Latency mode (issue 18): one sample per ciphertext, matrix products by sparse
diagonals with baby-step giant-step rotations (actswap/he/latency.py).

The planner is checked in numpy (a plan applied with np.roll must equal x @ M
for any matrix and input layout), the backend under CKKS against the plaintext
program on a few samples of small models with odd sizes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from actswap.activations import Polynomial, Square  # noqa: E402
from actswap.he import encrypted as he_encrypted  # noqa: E402
from actswap.he import diagonals as he_diagonals  # noqa: E402
from actswap.he import evaluate as he_evaluate  # noqa: E402
from actswap.he import latency as he_latency  # noqa: E402
from actswap.he import params as he_params  # noqa: E402
from actswap.he import tenseal_mm as he_mm  # noqa: E402
from actswap.he import program as he_program  # noqa: E402

L = keras.layers

# CKKS at the scales chosen here (2^26..2^40) keeps ~4-5 significant digits of the
# logits through two or three levels of squares; 1e-3 of the largest logit (at least
# 1) leaves a margin of ~10x over what is measured (~1e-4).
HE_TOL = 1e-3


def simulate(plan: he_diagonals._Plan, x_slots: np.ndarray) -> np.ndarray:
    """The plan applied to a plaintext slot vector, rotation for rotation:
    SEAL's rotate_vector(ct, k)[s] = ct[s + k] is np.roll(ct, -k)."""
    rot = lambda v, k: np.roll(v, -k)  # noqa: E731
    total = np.zeros_like(x_slots)
    for (g, b), mask in plan.masks.items():
        total += rot(mask * rot(x_slots, b), g)
    step = plan.period
    for _ in range(int(np.log2(plan.fold))):
        total = total + rot(total, step)
        step *= 2
    return total


@pytest.mark.parametrize("n_in, n_out, density, slots, layout", [
    (37, 53, 0.2, 128, "contiguous"),
    (53, 11, 1.0, 128, "contiguous"),
    (11, 5, 1.0, 64, "offset"),  # inputs near the end of the slots: the rotations wrap
    (60, 3, 1.0, 256, "scattered"),
    (1, 1, 1.0, 8, "contiguous"),
    (9, 9, 0.0, 32, "contiguous"),  # an all-zero matrix
])
def test_plan_equals_the_product(n_in, n_out, density, slots, layout):
    rng = np.random.default_rng(n_in * 100 + n_out)
    m = rng.normal(size=(n_in, n_out)) * (rng.random((n_in, n_out)) < density)
    if layout == "contiguous":
        pos = np.arange(n_in)
    elif layout == "offset":
        pos = (np.arange(n_in) + slots - 4) % slots
    else:
        pos = rng.choice(slots, n_in, replace=False)
    plan = he_diagonals.plan_product(m, pos, slots)
    x = rng.normal(size=n_in)
    x_slots = rng.normal(size=slots) * 100  # garbage everywhere else must not leak in
    x_slots[pos] = x
    y = simulate(plan, x_slots)[plan.out_pos]
    np.testing.assert_allclose(y, x @ m, atol=1e-9)
    assert len(set(plan.out_pos.tolist())) == n_out


def conv_matrix():
    """The fixture's first product: Conv2D(5, 5, strides=2, 'same') on 28x28, flattened."""
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(5, 5, strides=2, padding="same"), L.Flatten()])
    return he_program.compile_model(model).stages[0].matrix


def test_plans_rotate_far_less_than_once_per_input():
    """mm rotates 784 + 980 + 100 times per CryptoNets digit; the plans' key switches
    (with power-of-two Galois keys, NAF steps) stay a small fraction of that."""
    rng = np.random.default_rng(0)
    conv = he_diagonals.plan_product(conv_matrix(), np.arange(784), 4096)
    dense = he_diagonals.plan_product(rng.normal(size=(980, 100)), np.arange(980), 4096)
    last = he_diagonals.plan_product(rng.normal(size=(100, 10)), dense.out_pos, 4096)
    assert len(conv.masks) <= 400 and conv.bsgs.key_switches <= 60, conv.describe()
    assert len(dense.masks) <= 128 and dense.bsgs.key_switches + np.log2(dense.fold) <= 40, dense.describe()
    assert last.bsgs.key_switches + np.log2(last.fold) <= 15, last.describe()


def test_naf_weight():
    assert [he_diagonals._naf_weight(k) for k in (0, 1, 2, 3, 7, 13, 1024, -5)] == [0, 1, 1, 2, 2, 3, 1, 2]


def per_channel_poly(channels, degree=2, seed=3):
    p = Polynomial([0.2, 0.5, 0.1, 0.02][: degree + 1], trainable_coefficients=True, per_channel=True,
                   channels=channels)
    p.coefficient_weights.assign(
        np.random.default_rng(seed).normal(0, 0.3, (degree + 1, channels)).astype("float32"))
    return p


def randomize(model, seed=1, std=0.3):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "coefficient" not in w.path:
            w.assign(rng.normal(0, std, w.shape).astype(w.dtype))
    return model


MODELS = {
    # A small CryptoNets: strided conv with padding on an odd image, x², dense, x², dense.
    "conv": lambda: randomize(keras.Sequential(
        [keras.Input((9, 9, 1)), L.Conv2D(3, 3, strides=2, padding="same"), L.Flatten(), Square(),
         L.Dense(13), Square(), L.Dense(5)])),
    # Dense with odd sizes and a per-element cubic (coefficients per element, levels differ per term).
    "dense_poly": lambda: randomize(keras.Sequential(
        [keras.Input((23,)), L.Dense(17), per_channel_poly(17, degree=3), L.Dense(7)]), seed=2),
    # A polynomial first (the input layout meets element-wise operations before any product).
    "poly_first": lambda: randomize(keras.Sequential(
        [keras.Input((6,)), Polynomial([0.1, -0.5, 0.25]), L.Dense(3)]), seed=4),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_latency_evaluation_matches_plaintext(case):
    keras.utils.set_random_seed(0)
    model = MODELS[case]()
    program = he_program.compile_model(model)
    x = np.random.default_rng(7).uniform(0, 1, (3,) + program.input_shape).astype("float32")
    reference = program.plain(x)
    depth, magnitude = he_params.depth_and_magnitudes(program, x)
    params = he_params.choose_parameters(depth, he_mm.slots_needed(program), magnitude)
    backend = he_latency.LatencyBackend(he_params.make_context(params))
    assert backend.packing == he_latency.PACKING and "diagonals" in backend.packing
    flat = x.reshape(len(x), -1).astype("float64")
    for i in range(len(x)):
        out = he_evaluate._evaluate_from(program, backend, backend.encrypt(flat[i]))
        got = np.asarray(out.data.decrypt()) / out.factor
        err = np.abs(got - reference[i]).max()
        assert err <= HE_TOL * max(1.0, np.abs(reference[i]).max()), (case, i, err, reference[i])
    # The exact drift factors are TenSEAL's measured ones (to CKKS precision).
    measured = he_mm.measure_drift(backend.context, params.depth)
    np.testing.assert_allclose([backend.drift(k + 1) for k in range(params.depth)], measured, rtol=1e-5)


def test_run_reports_with_the_latency_backend():
    keras.utils.set_random_seed(0)
    model = randomize(keras.Sequential(
        [keras.Input((5, 5, 1)), L.Conv2D(2, 3, padding="same"), L.Flatten(), Square(),
         L.Dense(3, activation="softmax")]))
    x = np.random.default_rng(3).uniform(0, 1, (2, 5, 5, 1)).astype("float32")
    report = he_encrypted.run(model, x)
    assert report.agreement == 1.0
    assert report.max_rel_logit_error <= HE_TOL
    assert report.latency["evaluate"]["mean"] < 5.0


def test_prepare_plans_once_and_vectors_serialize():
    keras.utils.set_random_seed(0)
    program = he_program.compile_model(MODELS["conv"]())
    x = np.random.default_rng(5).uniform(0, 1, (2, program.input_size))
    depth, magnitude = he_params.depth_and_magnitudes(program, x)
    params = he_params.choose_parameters(depth, he_mm.slots_needed(program), magnitude)
    backend = he_latency.LatencyBackend(he_params.make_context(params)).prepare(program)
    plans = backend.describe()
    assert len(plans) == 3 and all("diagonals" in p for p in plans), plans
    enc = backend.encrypt(x[0])
    out = he_evaluate._evaluate_from(program, backend, enc)
    assert backend.describe() == plans  # the sample reused the prepared plans
    got = np.asarray(out.data.decrypt()) / out.factor
    reference = program.plain(x[:1])[0]
    assert np.abs(got - reference).max() <= HE_TOL * max(1.0, np.abs(reference).max())
    assert len(enc.serialize()) > 100_000 and len(out.data.serialize()) < len(enc.serialize())


def test_latency_slots_fit_where_mm_would_not():
    """A chain whose mm rule needs more slots than the ring has (100 + 450 - 1 > 512)
    runs in latency mode with 512 slots: only the largest vector must fit."""
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(0, 0.1, (100, 450)), rng.normal(0, 0.1, (450, 10))
    program = he_program.Program(
        [he_program.Affine(m1, np.zeros(450), ["a"], (100,), (450,)),
         he_program.Affine(m2, np.zeros(10), ["b"], (450,), (10,))], (100,), 10, False)
    assert he_latency.slots_needed(program) == 450 < 512 < he_mm.slots_needed(program)
    x = rng.uniform(0, 1, 100)
    plan1 = he_diagonals.plan_product(m1, np.arange(100), 512)
    x_slots = np.zeros(512)
    x_slots[:100] = x
    h = simulate(plan1, x_slots)
    plan2 = he_diagonals.plan_product(m2, plan1.out_pos, 512)
    np.testing.assert_allclose(simulate(plan2, h)[plan2.out_pos], x @ m1 @ m2, atol=1e-9)


def test_weights_below_the_mask_resolution_give_the_bias():
    """Every weight rounds to zero at the mask scale: no product is left (SEAL refuses
    a transparent ciphertext); the result is an encryption of zero plus the bias."""
    bias = np.array([0.5, -1.0, 2.0])
    program = he_program.Program(
        [he_program.Affine(np.full((4, 3), 1e-12), bias, ["tiny"], (4,), (3,)),
         he_program.Poly(np.array([0.0, 0.0, 1.0]), "square", 3)], (4,), 3, False)
    params = he_params.choose_parameters(2, 8, {1: 2.0, 2: 4.0})
    backend = he_latency.LatencyBackend(he_params.make_context(params))
    out = he_evaluate._evaluate_from(program, backend, backend.encrypt(np.ones(4)))
    assert backend.stats["products"] == 0
    np.testing.assert_allclose(np.asarray(out.data.decrypt()) / out.factor, bias**2, atol=1e-3)


def test_mm_reference_backend_still_agrees():
    """The packing before issue 18 (CKKSVector.mm) stays available as the reference."""
    keras.utils.set_random_seed(0)
    program = he_program.compile_model(MODELS["dense_poly"]())
    x = np.random.default_rng(8).uniform(0, 1, (1, program.input_size))
    depth, magnitude = he_params.depth_and_magnitudes(program, x)
    params = he_params.choose_parameters(depth, he_mm.slots_needed(program), magnitude)
    ctx = he_params.make_context(params)
    backend = he_mm.MMBackend(ctx, he_mm.measure_drift(ctx, params.depth))
    assert backend.packing.startswith("tenseal-mm")
    out = he_evaluate._evaluate_from(program, backend, backend.encrypt(x[0]))
    reference = program.plain(x)[0]
    got = np.asarray(out.data.decrypt()) / out.factor
    assert np.abs(got - reference).max() <= HE_TOL * max(1.0, np.abs(reference).max())
