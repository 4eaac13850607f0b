"""The compiled program's records: affine stages, element-wise polynomials,
products of two encrypted vectors, and the :class:`Program` that wires them.

Values are numbered: 0 is the program's input, stage k's output is value k + 1.
A stage's ``inputs`` names the values it reads; ``None`` means the previous
stage's output, so a chain (every CNN before transformers) reads as it always
did. An :class:`Affine` with several inputs reads their concatenation (a
residual ``x + f(x)`` is one affine stage over ``x`` and ``f``'s last value).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


# A compiled stage may differ from the float32 layers it replaces by this much,
# relative to the largest value of the layers' output (at least 1): float32
# rounding of the layers is ~1e-6 of it; a wrong matrix is off by O(1).
COMPILE_TOL = 1e-4


@dataclass
class Affine:
    """``y = concat(inputs) @ matrix + bias`` on flattened (row-major) vectors; float64."""

    matrix: np.ndarray  # (n_in, n_out)
    bias: np.ndarray  # (n_out,)
    layers: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    check_error: float = 0.0  # largest difference from the float32 layers on the probes
    inputs: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return int(self.matrix.shape[1])

    def describe(self) -> str:
        names = ", ".join(self.layers) or "identity"
        return f"affine {self.matrix.shape[0]} -> {self.matrix.shape[1]} ({names})"


@dataclass
class Poly:
    """``y = sum_k coefficients[k] * x**k``; coefficients (d+1,) shared or (d+1, n) per element."""

    coefficients: np.ndarray
    layer: str
    size: int
    inputs: tuple[int, ...] | None = None

    @property
    def degree(self) -> int:
        return self.coefficients.shape[0] - 1

    def describe(self) -> str:
        if self.coefficients.ndim == 1:
            c = ", ".join(f"{v:.4g}" for v in self.coefficients)
            return f"polynomial degree {self.degree} [{c}] ({self.layer})"
        return f"polynomial degree {self.degree}, per element ({self.layer})"

    def apply(self, x: np.ndarray) -> np.ndarray:
        c = self.coefficients
        y = np.broadcast_to(c[-1], x.shape).astype("float64")
        for k in range(c.shape[0] - 2, -1, -1):
            y = y * x + c[k]
        return y


@dataclass
class Bilinear:
    """``y[k] = sum_t a[pairs[k, t, 0]] * b[pairs[k, t, 1]]``: products of two
    encrypted vectors (attention's QKᵀ and weights × V), one ciphertext x
    ciphertext product per term, one relinearisation and rescale per output."""

    pairs: np.ndarray  # (n_out, terms, 2) int
    layer: str
    out_shape: tuple[int, ...]
    inputs: tuple[int, int]

    @property
    def size(self) -> int:
        return int(self.pairs.shape[0])

    def describe(self) -> str:
        return f"products {self.size} x {self.pairs.shape[1]} terms ({self.layer})"

    def apply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a[:, self.pairs[..., 0]] * b[:, self.pairs[..., 1]]).sum(axis=-1)


Stage = Affine | Poly | Bilinear


def inputs_of(stage: Stage, index: int) -> tuple[int, ...]:
    """The values stage ``index`` reads (its own ``inputs``, else the previous output)."""
    return tuple(stage.inputs) if stage.inputs is not None else (index,)


def last_uses(stages: list[Stage]) -> dict[int, int]:
    """Value -> index of the last stage that reads it (the output: past the end)."""
    last = {}
    for k, s in enumerate(stages):
        for v in inputs_of(s, k):
            last[v] = k
    last[len(stages)] = len(stages)
    return last


def input_first(stages: list[Stage]) -> list[Stage]:
    """``stages`` in an order that runs each reader of the input (value 0) as soon
    as its other inputs exist, so the input's ciphertexts (the widest, at the top
    level) are freed early; otherwise the order kept, the output stage last.
    Values are renumbered to the new order."""
    deps = [set(inputs_of(s, k)) for k, s in enumerate(stages)]
    order: list[int] = []
    done, remaining = {0}, list(range(len(stages)))
    while remaining:
        ready = [k for k in remaining if deps[k] <= done and (k != len(stages) - 1 or len(remaining) == 1)]
        first = next((k for k in ready if 0 in deps[k]), ready[0])
        order.append(first)
        remaining.remove(first)
        done.add(first + 1)
    new = {0: 0, **{k + 1: pos + 1 for pos, k in enumerate(order)}}
    return [replace(stages[k], inputs=tuple(new[v] for v in inputs_of(stages[k], k))) for k in order]


@dataclass
class Program:
    """The model as stages on flat vectors. Invariant: ``plain(x)`` equals the
    model's logits (its output before a final softmax) within :data:`COMPILE_TOL`."""

    stages: list[Stage]
    input_shape: tuple[int, ...]
    output_size: int
    final_softmax: bool

    @property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def is_chain(self) -> bool:
        """Every stage reads only the previous one's output (what latency mode runs)."""
        return all(inputs_of(s, k) == (k,) for k, s in enumerate(self.stages))

    def plain(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch ``x`` of shape (N, *input_shape), in float64."""
        values = {0: np.asarray(x, "float64").reshape(len(x), -1)}
        last = last_uses(self.stages)
        for k, s in enumerate(self.stages):
            xs = [values[v] for v in inputs_of(s, k)]
            if isinstance(s, Affine):
                values[k + 1] = np.concatenate(xs, axis=1) @ s.matrix + s.bias
            elif isinstance(s, Bilinear):
                values[k + 1] = s.apply(*xs)
            else:
                values[k + 1] = s.apply(xs[0])
            for v in inputs_of(s, k):
                if last[v] == k:
                    values.pop(v, None)
        return values[len(self.stages)]


def is_identity(matrix: np.ndarray, bias: np.ndarray) -> bool:
    return matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(matrix.shape[0])) \
        and not np.any(bias)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
