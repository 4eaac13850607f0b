"""The encrypted run on models that are not chains: residual branches and attention.

The compiler turns them into a graph of stages (affine maps over several
values, polynomials, products of two encrypted vectors); batch mode evaluates
it under CKKS. References are independent of the compiler: ``numpy.einsum``
for the products' index pairs, and the Keras model itself for the numbers.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L
from typer.testing import CliRunner

import actswap
from actswap.cli import app
from actswap.he import encrypted, program as he_program
from actswap.he.attention import einsum_pairs
from actswap.he.limits import OutOfScopeError, ParameterError
from actswap.he.stages import Bilinear, Poly

runner = CliRunner()
SOURCES = "all"  # GELU, LayerNorm, the attention softmax (the output softmax stays: client-side)


def mini_vit(blocks: int = 1, seed: int = 0) -> keras.Model:
    """8x8 images, 4 patches of 4x4, dim 4, 2 heads, MLP 8: a transformer whose
    encrypted run takes seconds."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = L.Reshape((4, 4))(L.Conv2D(4, 4, strides=4, name="patches")(inp))
    for b in range(blocks):
        n = L.LayerNormalization(name=f"ln{b}a")(h)
        h = L.Add(name=f"res{b}a")([h, L.MultiHeadAttention(2, 2, name=f"mha{b}")(n, n)])
        n = L.LayerNormalization(name=f"ln{b}b")(h)
        m = L.Dense(8, activation="gelu", name=f"mlp{b}")(n)
        h = L.Add(name=f"res{b}b")([h, L.Dense(4, name=f"proj{b}")(m)])
    h = L.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="probs")(h))


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 1)).astype("float32")


def polynomial_vit(blocks: int = 1):
    x = images(64, seed=0)
    converted, _ = actswap.convert(mini_vit(blocks), to="approx", sources=SOURCES, calibrate=x)
    return converted


@pytest.mark.parametrize("equation,a,b", [
    ("aecd,abcd->acbe", (1, 5, 2, 3), (1, 4, 2, 3)),  # MultiHeadAttention's QKᵀ (key, query)
    ("acbe,aecd->abcd", (1, 2, 4, 5), (1, 5, 2, 3)),  # its weights x V
    ("ij,jk->ik", (3, 4), (4, 2)),
])
def test_einsum_pairs_sum_what_numpy_einsum_sums(equation, a, b):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=a), rng.normal(size=b)
    pairs, shape = einsum_pairs(equation, a, b)
    mine = (x.reshape(-1)[pairs[..., 0]] * y.reshape(-1)[pairs[..., 1]]).sum(-1).reshape(shape)
    np.testing.assert_allclose(mine, np.einsum(equation, x, y), rtol=1e-12, atol=1e-12)


def test_a_residual_branch_compiles_to_a_graph_and_latency_mode_refuses_it():
    inp = keras.Input((4,))
    h = L.Dense(4, name="fc")(inp)
    out = L.Dense(3, name="head")(L.Add(name="skip")([actswap.activations.Square(name="sq")(h), h]))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype("float32")
    program = he_program.compile_model(model, x[:4])
    # Structure: fc, its square, then one affine stage over both values (the skip and the head).
    assert [type(s).__name__ for s in program.stages] == ["Affine", "Poly", "Affine"]
    assert set(program.stages[2].inputs) == {1, 2} and not program.is_chain
    # Numbers: against the Keras model.
    np.testing.assert_allclose(program.plain(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    pytest.importorskip("tenseal")
    with pytest.raises(OutOfScopeError, match="latency mode runs chains.*--mode batch"):
        encrypted.run(model, x[:2], mode="latency")
    report = encrypted.run(model, x, mode="batch", workers=1)
    assert report.mode == "batch" and report.agreement == 1.0 and report.max_abs_logit_error < 1e-4


def test_a_polynomial_transformer_compiles_to_products_of_ciphertexts():
    converted = polynomial_vit()
    x = images(32)
    program = he_program.compile_model(converted, x[:8])
    kinds = [type(s).__name__ for s in program.stages]
    products = [s for s in program.stages if isinstance(s, Bilinear)]
    # QKᵀ: 2 heads x 4 queries x 4 keys, each a sum over key_dim 2; weights x V: 4 x 2 x 2 outputs of 4 terms.
    assert [(s.size, s.pairs.shape[1]) for s in products] == [(32, 2), (16, 4)], program.stages
    assert kinds.count("Poly") == 2 and not program.is_chain  # the attention's s·(x + c)², the GELU's fit
    # Every value is read after it is made; the input is read only at the start (then freed).
    for k, s in enumerate(program.stages):
        assert all(v <= k for v in s.inputs)
    readers = [k for k, s in enumerate(program.stages) if 0 in s.inputs]
    assert readers == list(range(len(readers)))
    np.testing.assert_allclose(he_program._softmax(program.plain(x)), converted.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-6)


def test_he_run_evaluates_a_polynomial_transformer_encrypted(tmp_path):
    pytest.importorskip("tenseal")
    converted = polynomial_vit()
    path = tmp_path / "poly_vit.keras"
    actswap.save(converted, path)
    x = images(40)
    np.savez(tmp_path / "x.npz", x=x, y=np.zeros(len(x), "int64"))
    r = runner.invoke(app, ["he-run", str(path), "--data", str(tmp_path / "x.npz"), "--workers", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    import json

    data = json.loads(r.stdout)
    assert data["mode"] == "batch" and data["samples"] == 40 and data["top1_agreement"] == 1.0
    assert data["max_abs_logit_error"] < 1e-3 and data["parameters"]["depth"] >= 9
    assert data["wall_seconds"] > 0


def test_he_run_refuses_a_transformer_too_deep_in_one_line(tmp_path):
    pytest.importorskip("tenseal")
    converted = polynomial_vit(blocks=4)
    path = tmp_path / "deep.keras"
    actswap.save(converted, path)
    np.savez(tmp_path / "x.npz", x=images(4), y=np.zeros(4, "int64"))
    r = runner.invoke(app, ["he-run", str(path), "--data", str(tmp_path / "x.npz")])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert "needed" in lines[0] and "at most 32 available" in lines[0]


def test_he_run_refuses_when_the_ciphertexts_would_not_fit_in_memory(monkeypatch):
    pytest.importorskip("tenseal")
    converted = polynomial_vit()
    monkeypatch.setattr(encrypted, "_available_memory", lambda: 10**8)  # 0.1 GB
    with pytest.raises(ParameterError, match=r"GB at its peak.*one batch of ciphertexts at a time.*more than the 0\.1 GB") as info:
        encrypted.run(converted, images(16), workers=1)
    assert "\n" not in str(info.value)


def test_hidden_softmax_and_the_fixed_norms_compile_to_polynomials_and_affine_maps():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = L.RMSNormalization(name="rms")(L.Dense(5, name="embed")(inp))
    h = L.Softmax(name="gate")(h)
    h = L.Dense(4, activation="softmax", name="mix")(h)
    h = L.LayerNormalization(name="ln")(h)
    model = keras.Model(inp, L.Dense(3, name="logits")(h))
    x = np.random.default_rng(0).uniform(-1, 1, (64, 6)).astype("float32")
    converted, report = actswap.convert(model, to="approx", sources="softmax,rmsnorm,layernorm", calibrate=x)
    assert {s.path for s in report.sites if s.action == "replaced"} == {"rms", "gate", "mix", "ln"}
    program = he_program.compile_model(converted, x[:8])
    # The two softmaxes are element-wise s·(x + c)² (Poly stages); the norms fold into the affine maps.
    assert [type(s).__name__ for s in program.stages] == ["Affine", "Poly", "Affine", "Poly", "Affine"]
    assert all(s.degree == 2 for s in program.stages if isinstance(s, Poly))
    np.testing.assert_allclose(program.plain(x), converted.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
