"""Batch mode of the encrypted run (actswap.he.batch): many samples per ciphertext.

References are independent of the code under test: the Keras model itself (a
twin with a linear last layer for the logits, see test_he_run.logits_of) or
the numpy program, never values the batch evaluator computed.
"""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

ts = pytest.importorskip("tenseal")

from typer.testing import CliRunner  # noqa: E402

from actswap.activations import Square  # noqa: E402
from actswap.cli import app  # noqa: E402
from actswap.he import batch as he_batch  # noqa: E402
from actswap.he import batch_seal as he_batch_seal  # noqa: E402
from actswap.he import encrypted as he_encrypted  # noqa: E402
from actswap.he import params as he_params  # noqa: E402
from actswap.he import tenseal_mm as he_mm  # noqa: E402
from actswap.he import program as he_program  # noqa: E402
from actswap.activations import PolynomialActivation  # noqa: E402
from test_he_run import POLY_CASES, logits_of, rand, randomize, tiny_model  # noqa: E402

L = keras.layers

# CKKS at scale 2^26 keeps ~6 significant digits per operation; through the
# tiny model's depth 6 (two squares, a per-channel degree-2 polynomial) the
# decrypted logits are measured ~1e-4 of their largest magnitude off, so 1e-3
# of it (as in test_he_run) leaves a 10x margin. An evaluator error is O(1):
# a missing weight, a sample in the wrong slot, an uncompensated factor.
HE_TOL = 1e-3


def close(got, reference):
    err = np.abs(got - reference).max()
    assert err <= HE_TOL * max(1.0, np.abs(reference).max()), err


def setup(model, x):
    program = he_program.compile_model(model)
    depth, magnitude = he_params.depth_and_magnitudes(program, x)
    params = he_params.choose_parameters(depth, 1, magnitude)
    return program, params, he_params.make_context(params, galois=False)


def small_model(inputs=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((inputs,)), L.Dense(3), Square(), L.Dense(2, activation="softmax")])
    return randomize(model, seed=3)


def test_odd_batch_with_per_element_polynomial_matches_the_model():
    model = tiny_model()  # conv, BatchNorm, x², dense, per-channel polynomial, dense, softmax
    x = rand((7, 3, 3, 1), seed=9)
    program, params, ctx = setup(model, x)
    assert any(isinstance(s, he_program.Poly) and s.coefficients.ndim == 2 for s in program.stages)
    out = he_batch.run_batches(program, ctx, params, x, workers=1)
    assert out.logits.shape == (7, 3) and out.batch_sizes == [7]
    close(out.logits, logits_of(model, x))


BATCH_POLY_CASES = dict(POLY_CASES, negated_square=lambda: keras.Sequential(
    [keras.Input((4,)), L.Dense(3, activation=PolynomialActivation([0.5, 0, -1])), L.Dense(2)]))


@pytest.mark.parametrize("case", sorted(BATCH_POLY_CASES))
def test_polynomials_in_batch_mode_match_the_model(case):
    # x^3 = x^2 * x multiplies ciphertexts of two levels; a*x^2 + b*x adds terms of two
    # levels; -x^2 + c negates; scaled squares fold the scale into a coefficient.
    model = BATCH_POLY_CASES[case]()
    randomize(model, seed=7)
    x = rand((3,) + tuple(model.inputs[0].shape[1:]), seed=12)
    program, params, ctx = setup(model, x)
    out = he_batch.run_batches(program, ctx, params, x, workers=1)
    close(out.logits, np.asarray(model(x), "float64").reshape(len(x), -1))


def test_batches_split_across_processes_keep_sample_order():
    model = tiny_model()
    x = rand((7, 3, 3, 1), seed=4)
    program, params, ctx = setup(model, x)
    out = he_batch.run_batches(program, ctx, params, x, batch_size=3, workers=2)
    assert out.batch_sizes == [3, 3, 1] and out.workers == 2 and len(out.times) == 3
    close(out.logits, logits_of(model, x))


def test_a_wide_matrix_shared_out_by_columns_between_processes():
    keras.utils.set_random_seed(0)
    model = randomize(keras.Sequential([keras.Input((4,)), L.Dense(300), Square(), L.Dense(5)]), seed=5)
    for w in model.layers[-1].weights:  # keep the sum of 300 squares O(1)
        w.assign(w.numpy() / 30)
    x = rand((5, 4), seed=8)
    program, params, ctx = setup(model, x)
    out = he_batch.run_batches(program, ctx, params, x, workers=2)  # one batch: this process and a fork
    assert out.batch_sizes == [5] and out.workers == 2
    close(out.logits, np.asarray(model(x), "float64"))


def test_more_samples_than_slots_go_into_further_ciphertexts():
    model = small_model()
    program = he_program.compile_model(model)
    depth, magnitude = he_params.depth_and_magnitudes(program, rand((8, 4)))
    slots = he_params.choose_parameters(depth, 1, magnitude).poly_modulus_degree // 2
    x = rand((slots + 5, 4), seed=6)  # the last 5 in a second ciphertext batch
    report = he_encrypted.run(model, x, mode="batch", workers=1)
    assert report.mode == "batch" and report.batches == 2 and report.batch_size == slots
    assert report.parameters.poly_modulus_degree // 2 == slots
    close(report.encrypted_logits, logits_of(model, x))
    assert report.agreement == 1.0
    assert report.throughput > 0 and set(report.batch_latency) == {"encrypt", "evaluate", "decrypt"}


@pytest.mark.parametrize("mode", ["batch", "latency"])
def test_secret_key_encryption_matches_the_model_and_sends_half_the_bytes(mode):
    """``encryption="secret-key"``: SEAL's symmetric encryption by the data owner. The
    decrypted logits are the model's (its own layers, independent of the evaluator),
    and a ciphertext as sent is seeded: its second polynomial goes as a seed, so it
    takes about half the bytes of the public-key ciphertext of the same values
    (which only a secret-key encryption can do: a public-key one's second
    polynomial is a product with the public key, not seed-generated)."""
    model = tiny_model()
    x = rand((9, 3, 3, 1), seed=13)
    secret = he_encrypted.run(model, x, mode=mode, workers=1 if mode == "batch" else None, encryption="secret-key")
    public = he_encrypted.run(model, x, mode=mode, workers=1 if mode == "batch" else None)
    assert (secret.mode, secret.encryption, public.encryption) == (mode, "secret-key", "public-key")
    close(secret.encrypted_logits, logits_of(model, x))
    assert secret.agreement == 1.0 and secret.to_dict()["encryption"] == "secret-key"
    if mode == "batch":  # sizes measured in the encrypted run's own process
        ratio = secret.sizes["input_ciphertext"] / public.sizes["input_ciphertext"]
        assert 0.45 < ratio < 0.55, (secret.sizes, public.sizes)
        assert secret.sizes["input"] == secret.sizes["input_ciphertext"] * 9  # one per input element (3x3x1)
    else:  # this process loaded TensorFlow before TenSEAL: no sizes, and the report says why
        assert not secret.sizes and any("not measured" in n for n in secret.notes)


@pytest.mark.parametrize("encryption", ["public-key", "secret-key"])
def test_processes_sharing_the_encryption_draw_their_own_randomness(encryption):
    """The forked process that encrypts half the columns is a copy of this one, SEAL
    objects and all: were its randomness a copy too, two ciphertexts of the same
    values would share their random polynomials (and their difference would be the
    difference of the plaintexts). Equal columns, one encrypted here and one there,
    in two batches: every ciphertext part differs from every other."""
    from actswap.he.batch_rns import RnsBatchBackend

    _, _, ctx = setup(small_model(), rand((4, 4), seed=5))
    backend = RnsBatchBackend(ctx, 2, encryption)
    try:
        data = [backend.encrypt(np.zeros((8, 2))).copy() for _ in range(2)]  # column 0 here, 1 in the child
    finally:
        backend.close()
    parts = [d[i, j] for d in data for i in range(2) for j in range(2)]
    assert all(not np.array_equal(a, b) for k, a in enumerate(parts) for b in parts[k + 1:])
    decrypted = backend.decrypt(data[0], 8)
    assert np.abs(decrypted).max() < 1e-3  # and they are encryptions of zero


def test_cli_secret_key_encryption_and_an_unknown_one(tmp_path):
    from conftest import assert_user_error

    model, data = saved(tmp_path)
    result = runner.invoke(app, ["he-run", model, "--data", data, "--limit", "9", "--mode", "batch",
                                 "--encryption", "secret-key"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert re.search(r"encryption\s+.\s+secret-key", result.stdout), result.stdout
    result = runner.invoke(app, ["he-run", model, "--data", data, "--encryption", "symmetric"])
    assert_user_error(result, "--encryption) must be one of public-key, secret-key, got 'symmetric'")


def test_drift_is_the_one_tenseal_leaves():
    """The factor each rescale leaves, computed from the primes, equals the one
    TenSEAL's own vectors show (tenseal_mm.measure_drift, an independent measurement)."""
    params = he_params.choose_parameters(4, 1, {4: 10.0})
    ctx = he_params.make_context(params, galois=False)
    backend = he_batch_seal.SealBatchBackend(ctx)
    measured = he_mm.measure_drift(ctx, params.depth)
    computed = [backend.drift(level) for level in range(1, params.depth + 1)]
    np.testing.assert_allclose(computed, measured, rtol=1e-6)
    assert all(abs(f - 1) > 1e-6 for f in computed)  # compensation is not a no-op


def test_default_mode_depends_on_the_sample_count():
    model = small_model(3)
    few = he_encrypted.run(model, rand((2, 3), seed=1))
    many = he_encrypted.run(model, rand((he_encrypted.BATCH_ABOVE + 1, 3), seed=1))
    assert (few.mode, many.mode) == ("latency", "batch")
    assert few.batches == 2 and many.batches == 1
    assert "no Galois keys" in many.packing and "baby-step giant-step" in few.packing
    close(many.encrypted_logits, logits_of(model, rand((he_encrypted.BATCH_ABOVE + 1, 3), seed=1)))


runner = CliRunner()


def saved(tmp_path, samples=12):
    path = tmp_path / "m.keras"
    small_model(3).save(path)
    np.savez(tmp_path / "d.npz", x=rand((samples, 3), seed=2), y=np.arange(samples) % 2)
    return str(path), str(tmp_path / "d.npz")


def test_cli_batch_mode_reports_mode_and_throughput(tmp_path):
    model, data = saved(tmp_path)
    result = runner.invoke(app, ["he-run", model, "--data", data, "--limit", "9", "--mode", "batch", "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    r = json.loads(result.stdout)
    assert r["mode"] == "batch" and r["samples"] == 9 and r["batches"] == 1 and r["batch_size"] == 9
    assert r["throughput_per_second"] > 0 and r["top1_agreement"] == 1.0
    assert r["batch_latency_seconds"]["evaluate"]["mean"] > 0 and r["peak_rss_bytes"]["main"] > 0
    assert r["ciphertext_bytes"]["input"] > 0 and r["plaintext_accuracy"] is not None
    # The time per stage: encryption, each program stage in order, the output's settling, decryption.
    times = r["stage_seconds"]
    assert list(times)[0] == "encrypt" and list(times)[-1] == "decrypt"
    assert [k.split(": ", 1)[1] for k in list(times)[1:1 + len(r["stages"])]] == r["stages"]
    assert all(v >= 0 for v in times.values()) and times["encrypt"] > 0
    assert r["peak_rss_bytes"]["caller"] > 0 and r["peak_rss_bytes"]["shared"] > 0


def test_cli_default_mode_and_table(tmp_path):
    model, data = saved(tmp_path)
    result = runner.invoke(app, ["he-run", model, "--data", data, "--limit", "9"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert re.search(r"batch\s+mode", result.stdout) and "throughput" in result.stdout
    assert "packing: batch" in result.stdout
    assert re.search(r"stage 1: affine .* \([0-9.e-]+ s\)", result.stdout)  # each stage's time


def test_cli_refuses_an_unknown_mode(tmp_path):
    model, data = saved(tmp_path)
    result = runner.invoke(app, ["he-run", model, "--data", data, "--mode", "nonsense"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--mode" in lines[0] and "batch" in lines[0]


def test_cli_refuses_workers_in_latency_mode(tmp_path):
    from conftest import assert_user_error

    model, data = saved(tmp_path)
    result = runner.invoke(app, ["he-run", model, "--data", data, "--mode", "latency", "--workers", "2"])
    assert_user_error(result, "--workers 2 is for batch mode")
