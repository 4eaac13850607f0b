"""HE-readiness: what a CKKS engineer needs to know before encrypting a model.

Two findings, for Sequential/Functional Keras models (nested ones included):

* every operation that is not a polynomial of its inputs (MaxPooling, Softmax,
  sigmoid/tanh/... activations, LayerNormalization, layers actswap does not
  know), with its path;
* the multiplicative depth: the longest chain of multiplications along any
  path from input to output, as two counts.

Counting rule (stated in the README too):

* ciphertext x plaintext (``ct_pt``): 1 for each Dense, Conv*, Depthwise*,
  BatchNormalization (its scale), Rescaling/Normalization, AveragePooling,
  GlobalAveragePooling and Average (a sum times a constant); SeparableConv is 2
  (the table is :data:`actswap.he.layers.AFFINE_LAYERS`).
* ciphertext x ciphertext (``ct_ct``): a polynomial activation of degree d
  costs ceil(log2 d) (x² is 1, degree 3 or 4 is 2, degree 8 is 3: one level
  per doubling of the degree, as in Paterson-Stockmeyer/tree evaluation);
  coefficients other than 0/1 add 1 ct_pt (so the scaled square ``s·x²``
  that recovery leaves is 1 ct_ct + 1 ct_pt): each target's cost is declared
  in its catalog record (:mod:`actswap.catalog`); a Multiply of two tensors is 1.
* attention: the query projection (1 ct_pt), QKᵀ (1 ct_ct), the softmax
  (actswap's s·(x + c)²: 1 ct_ct + 1 ct_pt; Keras' own is not a polynomial and
  is listed), the weights times V (1 ct_ct) and the output projection (1 ct_pt)
  along the chain; the report names each part (``parts``).
* a softmax that is the model's last op is the client's, after decryption:
  listed under ``client_side``, it does not block ``he_ready``.
* Flatten, Reshape, Add, Concatenate, padding, cropping, dropout and the
  input cost nothing.

The chain reported is the one with the most multiplications in all; its two
counts are given (``ct_ct``, ``ct_pt``), and ``depth`` is their sum.

Invariant: reads the model, changes nothing.

:func:`actswap.he.run` goes one step further and runs the model on
CKKS-encrypted data (TenSEAL), comparing with plaintext
(:mod:`actswap.he.encrypted`), whose evaluator counts levels by the same rule (x² 1, a matrix 1, a
polynomial's coefficients 1 more), measured rather than estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras

from .. import catalog
from ..sites import find_sites, is_graph_model
from .layers import AFFINE_LAYERS, ATTENTION_LAYERS, CT_CT_LAYERS, NON_POLYNOMIAL_LAYERS, PASS_THROUGH, polynomial_cost

# Views of the one table in :mod:`.layers`, under the names this module always had.
CT_PT_LAYERS = {name: n for name, n in AFFINE_LAYERS.items() if n}
FREE_LAYERS = {name for name, n in AFFINE_LAYERS.items() if not n} | PASS_THROUGH


@dataclass(frozen=True, order=True)
class Depth:
    total: int = 0
    ct_ct: int = 0
    ct_pt: int = 0

    def plus(self, ct_ct: int = 0, ct_pt: int = 0) -> Depth:
        return Depth(self.total + ct_ct + ct_pt, self.ct_ct + ct_ct, self.ct_pt + ct_pt)


@dataclass
class HEReport:
    """``non_polynomial`` blocks an encrypted run; ``client_side`` does not (a
    softmax that is the model's last op: the client decrypts the logits and
    applies it); ``parts`` names the cost of each part of a layer that is more
    than one product (attention: QKᵀ, the softmax, the weights times V)."""

    non_polynomial: list[dict[str, str]] = field(default_factory=list)
    depth: Depth = Depth()
    client_side: list[dict[str, str]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "non_polynomial": list(self.non_polynomial),
            "client_side": list(self.client_side),
            "parts": list(self.parts),
            "multiplicative_depth": {
                "depth": self.depth.total, "ct_ct": self.depth.ct_ct, "ct_pt": self.depth.ct_pt,
            },
            "he_ready": not self.non_polynomial,
        }


def _leaf_cost(leaf: Any) -> tuple[int, int]:
    """(ct_ct, ct_pt) of one layer or op, its activation included (the catalog
    prices actswap's own polynomials, layers and ``activation=`` values alike)."""
    own = polynomial_cost(leaf)
    if own is not None:
        return own
    name = type(leaf).__name__
    if name in ATTENTION_LAYERS:  # its softmax is a site of its own (not a polynomial yet)
        from ..rules import attention_parts

        rest = [p for p in attention_parts(leaf) if not p[0].startswith("softmax")]
        return sum(p[1] for p in rest), sum(p[2] for p in rest)
    ct_ct, ct_pt = CT_CT_LAYERS.get(name, 0), CT_PT_LAYERS.get(name, 0)
    if name == "Rescaling" and getattr(leaf, "scale", 1.0) == 1.0:
        ct_pt = 0
    a_ct, a_pt = polynomial_cost(getattr(leaf, "activation", None)) or (0, 0)
    return ct_ct + a_ct, ct_pt + a_pt


def _walk(model: Any, inputs: list[Depth]) -> list[Depth]:
    """Depth of each output of ``model`` given the depths of its inputs."""
    if isinstance(model, keras.Sequential):
        d = max(inputs) if inputs else Depth()
        for layer in model.layers:
            d = _walk(layer, [d])[0] if is_graph_model(layer) else d.plus(*_leaf_cost(layer))
        return [d]

    def call(op: Any, *args: Any, **kwargs: Any) -> list[Depth]:
        found = [x for x in keras.tree.flatten((args, kwargs)) if isinstance(x, Depth)]
        if is_graph_model(op):
            outs = _walk(op, found)
            return outs + [outs[-1]] * 16
        d = max(found) if found else Depth()
        return [d.plus(*_leaf_cost(op))] * 16  # zipped against the node's outputs

    outs = model._run_through_graph(inputs, operation_fn=lambda op: op, call_fn=call)
    return [o for o in keras.tree.flatten(outs) if isinstance(o, Depth)]


CLIENT_SIDE = "output softmax: client-side, applied after decryption"


def _non_polynomial(model: Any, client_side: list[dict[str, str]]) -> list[dict[str, str]]:
    """What blocks an encrypted run; a final softmax goes to ``client_side``
    instead (no other op may: everything else runs on ciphertexts)."""
    from ..sites import iter_nodes

    found: list[dict[str, str]] = []
    activation_sites = {s.path: s for s in find_sites(model)}
    for s in activation_sites.values():
        if s.activation == "softmax" and s.at_output:
            client_side.append({"path": s.path, "op": f"{s.activation} ({s.form})", "why": CLIENT_SIDE})
        elif not catalog.is_polynomial(s.activation):
            found.append({"path": s.path, "op": f"{s.activation} ({s.form})", "why": "not a polynomial"})
    nodes = list(iter_nodes(model)) if is_graph_model(model) else []
    for path, obj in nodes:
        if is_graph_model(obj) or path in activation_sites:
            continue
        name = type(obj).__name__
        if name in NON_POLYNOMIAL_LAYERS or name in catalog.ACTIVATION_LAYERS:  # (those are sites)
            found.append({"path": path, "op": name, "why": "not a polynomial"})
        elif not (name in FREE_LAYERS or name in CT_PT_LAYERS or name in CT_CT_LAYERS
                  or name in catalog.OWN_LAYERS):
            found.append({"path": path, "op": name, "why": "unknown to actswap: check it by hand"})
    return found


def he_report(model: Any) -> HEReport:
    """Remaining non-polynomial operations and the multiplicative depth of ``model``."""
    if not is_graph_model(model):
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError("the HE report needs a Sequential or Functional model")
    n_inputs = len(keras.tree.flatten(model.inputs))
    outs = _walk(model, [Depth()] * n_inputs)
    client_side: list[dict[str, str]] = []
    found = _non_polynomial(model, client_side)
    return HEReport(found, max(outs) if outs else Depth(), client_side, _parts(model))


def _parts(model: Any) -> list[dict[str, Any]]:
    """The cost of each part of every attention layer, polynomial or not."""
    from ..rules import attention_parts
    from ..sites import iter_nodes

    out: list[dict[str, Any]] = []
    for path, obj in iter_nodes(model) if is_graph_model(model) else []:
        name = type(obj).__name__
        if name in ATTENTION_LAYERS or name in catalog.OWN_LAYERS and catalog.OWN_LAYERS[name] == "poly_attention":
            for part, ct_ct, ct_pt in attention_parts(obj):
                polynomial = name not in ATTENTION_LAYERS or not part.startswith("softmax")
                out.append({"path": path, "part": part, "ct_ct": ct_ct if polynomial else None,
                            "ct_pt": ct_pt if polynomial else None})
    return out
