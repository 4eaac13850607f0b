"""Which sites a conversion replaces: one rule, shared by every backend.

No TensorFlow here.
"""

from __future__ import annotations

from . import registry
from .report import Site


def decide(site: Site, target: registry.Target, sources: frozenset[str]) -> str | None:
    """None if the site is to be replaced, else the (short) reason it is skipped."""
    fam = registry.family(site.activation)
    if site.activation.startswith("custom"):
        return "unrecognised custom activation"
    if fam == "polynomial":
        return f"already {site.activation}"
    if site.activation not in sources and fam not in sources:
        return f"not selected (converting {', '.join(sorted(sources))})"
    return target.refuses(site.activation, site.detail)
