"""What the HE modules know about Keras layers: one table for the readiness
report (:mod:`.readiness`, which costs them) and the compiler (:mod:`.program`,
which runs them); activations come from the catalog (:mod:`actswap.catalog`).

Invariant: every layer the compiler accepts as affine is costed by the same
entry the readiness report reads, so the two never disagree on what a layer is.
"""

from __future__ import annotations

import inspect
from typing import Any

from .. import catalog, registry

# Keras layer classes that are affine maps of their input -> ciphertext x plaintext
# multiplications: 1 for a matrix or a sum times a constant (Dense, Conv*,
# BatchNormalization's scale, average pooling, Average), 2 for SeparableConv
# (depthwise then pointwise), 0 for layers that only move, copy, drop or add
# values (dropout is the identity at inference).
AFFINE_LAYERS: dict[str, int] = {
    "Dense": 1, "EinsumDense": 1, "Conv1D": 1, "Conv2D": 1, "Conv3D": 1, "Conv1DTranspose": 1,
    "Conv2DTranspose": 1, "Conv3DTranspose": 1, "DepthwiseConv1D": 1, "DepthwiseConv2D": 1,
    "SeparableConv1D": 2, "SeparableConv2D": 2, "BatchNormalization": 1, "Rescaling": 1,
    "Normalization": 1, "AveragePooling1D": 1, "AveragePooling2D": 1, "AveragePooling3D": 1,
    "GlobalAveragePooling1D": 1, "GlobalAveragePooling2D": 1, "GlobalAveragePooling3D": 1, "Average": 1,
    "Flatten": 0, "Reshape": 0, "Permute": 0, "RepeatVector": 0, "Dropout": 0, "SpatialDropout1D": 0,
    "SpatialDropout2D": 0, "SpatialDropout3D": 0, "GaussianNoise": 0, "GaussianDropout": 0,
    "AlphaDropout": 0, "ZeroPadding1D": 0, "ZeroPadding2D": 0, "ZeroPadding3D": 0, "Cropping1D": 0,
    "Cropping2D": 0, "Cropping3D": 0, "Concatenate": 0, "Add": 0, "Subtract": 0, "Identity": 0,
}
# Affine layers the compiler does not run yet (it refuses them as out of scope);
# the readiness report costs them all the same.
NOT_COMPILED = frozenset({"Normalization", "RepeatVector"})
# Products of two tensors: one ciphertext x ciphertext multiplication.
CT_CT_LAYERS: dict[str, int] = {"Multiply": 1, "Dot": 1}
# Attention layers whose softmax is a site (not a polynomial until replaced);
# the rest (QKᵀ, the weights times V, projections) is costed part by part
# (:func:`actswap.rules.attention_parts`).
ATTENTION_LAYERS = frozenset({"MultiHeadAttention", "Attention"})
# Layers that cost nothing in themselves: the input, and Keras's activation
# layers, whose cost is that of their activation (a site, or linear).
PASS_THROUGH = frozenset({"InputLayer", "Activation", "ReLU"})
# Layers that are no polynomial of their input (besides the catalog's activation layers).
NON_POLYNOMIAL_LAYERS = frozenset(registry.POOL_SWAPS) | {
    "LayerNormalization", "GroupNormalization", "UnitNormalization", "Maximum", "Minimum",
    "MultiHeadAttention", "Attention", "AdditiveAttention", "Lambda",
}


def own_activation(obj: Any) -> catalog.OwnActivation | None:
    """The catalog record of ``obj`` when it is one of actswap's own layers or
    activation objects (found by its Keras registered name), else None."""
    if obj is None:
        return None
    import keras

    key = obj if inspect.isfunction(obj) else type(obj)
    source = catalog.OWN_OBJECTS.get(keras.saving.get_registered_name(key))
    return catalog.OWN.get(source) if source is not None else None


def polynomial_cost(obj: Any) -> tuple[int, int] | None:
    """(ct_ct, ct_pt) of ``obj`` when it is one of actswap's polynomials, else None."""
    own = own_activation(obj)
    return own.he_cost(obj) if own is not None and own.he_cost is not None else None
