"""actswap: swap ReLU activations of trained Keras models for polynomials (x²).

Importing ``actswap`` is cheap: TensorFlow and Keras are imported only when an
API function is first used. actswap's Keras objects are registered the moment
Keras is imported (a post-import hook), so after ``import actswap``,
``keras.models.load_model`` reads converted models without ``custom_objects``,
whichever of the two was imported first.

Public API: :func:`convert`, :func:`inspect`, :func:`load`, :func:`save`,
:func:`export_onnx`, :func:`verify`; the modules :mod:`actswap.activations`
(``square``, ``SquareActivation``, ``Square``, ``Polynomial``...) and
:mod:`actswap.recover` (accuracy recovery).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .importhook import after_import

__version__ = "0.1.0"
__all__ = [
    "convert", "inspect", "load", "save", "export_onnx", "verify", "Report", "Site", "ActswapError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import convert, inspect, load, save  # noqa: F401
    from .export import export_onnx  # noqa: F401
    from .verify import verify  # noqa: F401
    from .errors import ActswapError  # noqa: F401
    from .report import Report, Site  # noqa: F401

_LAZY = {
    "convert": "actswap.api",
    "inspect": "actswap.api",
    "load": "actswap.api",
    "save": "actswap.api",
    "export_onnx": "actswap.export",
    "verify": "actswap.verify",
    "Report": "actswap.report",
    "Site": "actswap.report",
    "ActswapError": "actswap.errors",
}


def __getattr__(name: str) -> Any:
    if name == "he":  # the module, for actswap.he.run (imports Keras only when used)
        return importlib.import_module("actswap.he")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actswap' has no attribute '{name}'")


def _register_with_keras(keras_module: Any) -> None:
    # Every Keras object actswap writes is written with keras.ops: registered on
    # every backend. Never raise from an import hook: that would break
    # `import keras` for the user; actswap's API reports a real problem itself.
    for module in ("actswap.activations", "actswap.transformer", "actswap.normalization",
                   "actswap.recover.blend_layer"):  # Blend: a recovery's model saves mid-way
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - see above
            pass


after_import("keras", _register_with_keras)
