"""Which sites a conversion replaces: one rule, shared by every backend.

No TensorFlow here.
"""

from __future__ import annotations

from . import registry, rules
from .report import Site

# Parity tolerance for ONNX-vs-TF and verify checks, relative to the output's
# largest magnitude. float32 rounding differences between runtimes are ~1e-7
# per op, but every x² doubles a relative error, so a few squares deep it is
# ~1e-5 (measured: 1.2e-5 for the 3-square MNIST fixture on real digits).
# Deep x² networks amplify it past any bound (see the README's known limits).
PARITY_TOL = 1e-4

# ONNX export writes the weights to a data file beside the .onnx (ONNX external
# data) from this size on, unless told otherwise (--external-data/--single-file).
# Below it, one self-contained file, as before. A single file also costs memory:
# the whole model is one protobuf when written, checked and loaded.
ONNX_EXTERNAL_DATA_BYTES = 100 * 1024 * 1024


def decide(
    site: Site,
    target: registry.Target,
    sources: frozenset[str],
    *,
    more_sources: str | None = "--from adds others",
) -> str | None:
    """None if the site is to be replaced, else the (short) reason it is skipped.

    ``more_sources`` is how the caller's user selects other sources, appended to
    a "not selected" reason; None for a caller that offers no choice (tf_keras
    files convert ReLU only, so pointing at ``--from`` there would mislead)."""
    fam = registry.family(site.activation)
    if site.activation.startswith("custom"):
        return "unrecognised custom activation"
    if fam == "polynomial":
        return f"already {site.activation}"
    refusal = rules.refusal(site.activation, site.detail, target, site)
    if site.activation not in sources:
        # A member of a selected family (relu6 when converting relu) is reported
        # with the target's own reason when it has one: that is the real why.
        if refusal and fam in sources:
            return refusal
        hint = f"; {more_sources}" if more_sources else ""
        return f"not selected (converting {', '.join(sorted(sources))}{hint})"
    return refusal
