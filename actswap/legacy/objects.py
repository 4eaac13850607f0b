"""actswap's tf_keras objects: ``Square`` and ``SquareActivation``.

They are registered as ``actswap_legacy>Square`` and
``actswap_legacy>SquareActivation`` (names stored in converted files, which
must keep loading) the moment ``tf_keras`` is imported, or at once if it
already is, so that after ``import actswap.legacy`` a converted model reloads
with plain ``tf_keras.models.load_model`` and no ``custom_objects``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any


from .. import gradients
from ..importhook import after_import
from ..classify import LEGACY_PACKAGE as PACKAGE

# The classes' public home: converted files name it, so it must not move.
HOME = "actswap.legacy"


@functools.lru_cache(maxsize=None)
def objects() -> Any:
    """Define and register actswap's tf_keras classes (once, on first use)."""
    import tf_keras

    from ..tf_ops import grad_function, square_op

    register = tf_keras.saving.register_keras_serializable

    def _mode(grad: Any) -> str:
        return gradients.normalize(grad)

    class SquareActivation:
        """x² as a tf_keras activation object carrying its gradient mode."""

        def __init__(self, grad: str = "exact") -> None:
            self.grad = _mode(grad)
            self._backward = grad_function(self.grad)

        def __call__(self, x: Any) -> Any:
            return square_op(x, self._backward)

        def get_config(self) -> dict[str, Any]:
            return {"grad": self.grad}

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> SquareActivation:
            return cls(grad=config.get("grad", "exact"))

        def __repr__(self) -> str:
            return f"SquareActivation(grad={self.grad!r})"

    class Square(tf_keras.layers.Layer):
        """tf_keras layer computing x² with gradient mode ``grad``; passes masks.

        ``cast_inputs=False`` computes in the input's dtype, as the ``tf.nn.relu``
        op it may replace did.
        """

        def __init__(self, grad: str = "exact", cast_inputs: bool = True, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.supports_masking = True
            self.cast_inputs = bool(cast_inputs)
            self._autocast = self.cast_inputs
            self.grad = _mode(grad)
            self._backward = grad_function(self.grad)

        def call(self, inputs: Any, mask: Any = None, **kwargs: Any) -> Any:
            # kwargs: a replaced TFOpLambda node passes the op's ``name=None``.
            return square_op(inputs, self._backward)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
            return mask

        def get_config(self) -> dict[str, Any]:
            config = super().get_config()
            config["grad"] = self.grad
            config["cast_inputs"] = self.cast_inputs
            return config

    for cls in (SquareActivation, Square):
        cls.__module__ = HOME
        cls.__qualname__ = cls.__name__
        register(package=PACKAGE, name=cls.__name__)(cls)
    # tf_keras writes an activation object into an .h5 config under its class
    # __name__ but reads it back (legacy scope) by looking that name up in the
    # registry, whose key is "package>Name": so the name must be the key.
    SquareActivation.__name__ = f"{PACKAGE}>SquareActivation"
    return type("LegacyObjects", (), {"Square": Square, "SquareActivation": SquareActivation})



def _register_on_import(_module: Any) -> None:
    # Never raise from an import hook: it would break `import tf_keras`.
    try:
        objects()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"actswap could not register its tf_keras objects: {e}", stacklevel=2)


after_import("tf_keras", _register_on_import)

