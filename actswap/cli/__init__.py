"""The ``actswap`` command: parse, call the API, render the report.

One thin module per command (:mod:`.convert`, :mod:`.inspect`, :mod:`.export`,
:mod:`.verify`, :mod:`.scan`, :mod:`.fit`, :mod:`.recover`, :mod:`.he_run`),
each registering itself on the shared typer ``app`` of :mod:`.base`, which
also holds what they share (error mapping, console, pre-load scan, the quiet
TensorFlow import). Importing this package never imports TensorFlow.
"""

from __future__ import annotations

# Importing a command module registers its command; this order is --help's.
from . import convert, inspect, export, verify, scan, fit, recover, he_run  # noqa: F401, I001
from .base import app, main

__all__ = ["app", "main"]
