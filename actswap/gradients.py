"""Gradient modes for polynomial activations, parsed without TensorFlow.

A mode is a string so that it serializes into a layer config and round-trips
through every saved format:

* ``"exact"``: the true derivative (for x², ``2x * dy``).
* ``"clip:C"``: the local derivative clipped to ``[-C, C]`` before it is
  multiplied by ``dy``; ``C`` is a positive finite number.

The Python API also accepts a callable ``grad(x, dy) -> dx`` (see
:mod:`actswap.activations`); it is not a string and is not parsed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import UserError

MODES = ("exact", "clip:C")


def normalize(spec: str) -> str:
    """Return the canonical form of a gradient-mode string, or raise UserError."""
    if not isinstance(spec, str):
        raise UserError(f"gradient mode must be a string, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s == "exact":
        return "exact"
    if s.startswith("clip:"):
        try:
            c = float(s[5:])
        except ValueError:
            c = math.nan
        if math.isfinite(c) and c > 0:
            return f"clip:{c:g}"
        raise UserError(
            f"invalid clip bound in gradient mode '{spec}'; use clip:C with C a positive "
            "number, e.g. --grad clip:1"
        )
    raise UserError(f"unknown gradient mode '{spec}'; use one of: exact, clip:C (e.g. clip:1)")


def clip_bound(spec: str) -> float | None:
    """The clip bound of a normalized mode, or None for ``exact``."""
    return None if spec == "exact" else float(spec[5:])


def resolve(grad: Any, exact: Callable[..., Any], clipped: Callable[[float], Callable[..., Any]]) -> Any:
    """A gradient mode string, or a user ``grad(x, dy) -> dx`` (returned as it is),
    to a backward function: ``exact``, or ``clipped(C)`` for ``clip:C``. Each
    implementation (Keras ops, TensorFlow graphs) passes its own two."""
    if callable(grad):
        return grad
    bound = clip_bound(normalize(grad))
    return exact if bound is None else clipped(bound)
