"""The rules registry (actswap.rules): a new kind of replacement is one record,
registered from outside actswap; max pooling -> average pooling is one of them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import actswap
from actswap import catalog, rules


def _noisy_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(5, name="fc")(inp)
    h = keras.layers.GaussianNoise(0.3, name="noise")(h)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(h))


@pytest.fixture
def toy_rule():
    """A toy rule: GaussianNoise -> Identity (the same function at inference),
    under --to approx only: one catalog record and one rule, from this module alone."""
    source = catalog.register_source(catalog.Source("toy_noise", keras_layers=("GaussianNoise",), elementwise=False))
    rule = rules.register_rule(rules.Rule(
        "toy noise -> identity", source.name, "the identity", targets=frozenset({"approx"}),
        layer=lambda site, node, blend: keras.layers.Identity(name=node["config"]["name"]),
    ))
    try:
        yield rule
    finally:
        rules.unregister_rule(source.name)
        catalog.unregister_source(source.name)


def test_a_rule_registered_from_outside_is_found_decided_and_built(toy_rule, tmp_path):
    model = _noisy_model()
    report = actswap.inspect(model, sources={"toy_noise"}, to="approx")
    (site,) = [s for s in report.sites if s.path == "noise"]
    assert site.activation == "toy_noise" and site.replaceable
    # Another target does not serve it: the rule says which targets it is for.
    _, square = actswap.convert(model, to="square", sources={"toy_noise", "relu"})
    (skipped,) = [s for s in square.sites if s.path == "noise"]
    assert skipped.action == "skipped" and "--to approx" in skipped.reason

    converted, rep = actswap.convert(model, to="approx", sources={"toy_noise"})
    # Structure: the layer is the rule's; numbers: equal to the original at inference
    # (GaussianNoise is the identity there, an independent reference); round trip.
    assert type(converted.get_layer("noise")).__name__ == "Identity"
    assert [s.action for s in rep.sites if s.path == "noise"] == ["replaced"]
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x, training=False), rtol=1e-6, atol=1e-6)
    actswap.save(converted, tmp_path / "toy.keras")
    again = keras.saving.load_model(tmp_path / "toy.keras")
    np.testing.assert_allclose(again(x), model(x, training=False), rtol=1e-6, atol=1e-6)


def test_the_toy_rule_is_gone_after_unregistering(toy_rule):
    pass  # the fixture's teardown runs here; the next test checks its effect


def test_unregistered_rule_leaves_nothing_behind():
    assert "toy_noise" not in rules.RULES and "toy_noise" not in catalog.RECORDS
    assert "GaussianNoise" not in catalog.ACTIVATION_LAYERS


def test_pool_avg_is_a_rule_whose_sites_are_listed_only_when_selected(fixtures_dir):
    rule = rules.RULES[catalog.POOL_SOURCE]
    assert not rule.listed and "MaxPooling2D" in rule.layer_classes
    model = actswap.load(fixtures_dir / "mnist_cnn.keras")
    assert not [s for s in actswap.inspect(model).sites if s.activation == catalog.POOL_SOURCE]
    _, report = actswap.convert(model, pool="avg")
    assert [s.reason for s in report.sites if s.activation == catalog.POOL_SOURCE] == [
        "MaxPooling2D -> AveragePooling2D (--pool avg)"] * 2


def test_a_rule_for_an_unknown_source_is_refused():
    with pytest.raises(ValueError, match="not in the catalog"):
        rules.register_rule(rules.Rule("nothing", "no_such_source", "", layer=lambda *a: None))
