"""Real architectures from keras.applications (weights=None, 32x32 inputs).

x² compounds through depth, so with random weights the outputs of deep nets
under- or overflow and a parity check would compare zeros with zeros. The
weights are first *tamed* (test-side, LSUV-style: each kernel rescaled so its
output has RMS 0.1 on the sample batch (below 1/4, so that residual x² paths settle instead of exploding), computed with the independent
reference), and the check requires a finite, non-constant reference.

Site counts are written down from the architectures: ResNet50 has one ReLU
after the stem and three per bottleneck block (1 + 16*3 = 49); VGG16 one per
conv (13); DenseNet121 one after the stem, two per conv block (58 blocks),
one per transition (3) and a final one (1 + 116 + 3 + 1 = 121);
MobileNetV3Small uses plain ReLU in its first three blocks (2 each) and in the
8 squeeze-excite blocks of the hard-swish stages (14 in all), and ReLU(6) in
each of its 9 squeeze-excite hard-sigmoids (skipped).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import relu_as_square, relu_forbidden, weights_bytes

import actswap

A = keras.applications
ARCHS = {
    "ResNet50": (A.ResNet50, 49, 0),
    "VGG16": (A.VGG16, 13, 0),
    "DenseNet121": (A.DenseNet121, 121, 0),
    "MobileNetV3Small": (A.MobileNetV3Small, 14, 9),
}


def tame(model, x, target_rms=0.1):
    """Scale each layer with a kernel, in graph order, so that its output on ``x``
    has RMS ``target_rms`` with every ReLU computing x² and the layers before it
    already scaled (so that x² does not overflow through deep stacks).

    One pass through the functional graph, each layer run on its inputs' values
    as Keras' own ``Functional.call`` does (``_run_through_graph``): a layer with a
    kernel is measured, scaled and run again. The same weights as building a probe
    model per layer (the old way: 21 s of DenseNet121's 30), in one forward pass."""

    def operation_fn(layer):
        def call(*args, **kwargs):
            if getattr(layer, "_call_has_training_arg", False):
                kwargs["training"] = False
            y = layer(*args, **kwargs)
            if getattr(layer, "kernel", None) is None:
                return y
            rms = float(np.sqrt(np.mean(np.square(np.asarray(y, "float64")))))
            if rms > 0 and np.isfinite(rms):
                factor = target_rms / rms
                for w in layer.weights:
                    if w.trainable:
                        w.assign(w.numpy() * factor)
                y = layer(*args, **kwargs)  # not y * factor: an inline activation is not linear
            return y

        return call

    with relu_as_square():
        model._run_through_graph(x, operation_fn=operation_fn)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_application_converts_with_counts_structure_and_parity(name):
    factory, n_relu, n_relu6 = ARCHS[name]
    keras.utils.set_random_seed(0)
    model = factory(weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    tame(model, x)
    w_before = weights_bytes(model)

    converted, report = actswap.convert(model, to="square")

    assert report.replaced == n_relu
    assert report.skipped_relu_like == n_relu6
    assert weights_bytes(model) == w_before
    assert [b for _, b in weights_bytes(converted)] == [b for _, b in w_before]
    after = [s.activation for s in actswap.inspect(converted).sites]
    assert after.count("square") == n_relu and "relu" not in after
    with relu_as_square():
        ref = model(x, training=False).numpy()
    with relu_forbidden():
        got = converted(x, training=False).numpy()
    assert np.all(np.isfinite(ref)) and ref.std() > 0, "degenerate reference"
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * scale)
