"""ONNX export with proven parity.

Every export proves itself before it is written: the ONNX graph must pass
``onnx.checker.check_model(full_check=True)``, contain only standard ONNX ops
(tf2onnx's Python API continues on errors and may leave TF ops behind), and
its onnxruntime outputs must equal TensorFlow's on the same inputs within a
tolerance. Otherwise nothing is written.

Invariants: the model is only read; the output appears (by renames) only after
every check passed on the very files renamed, and the .onnx only once its data
file is in place. The converter never holds the weights (:mod:`actswap.onnx_build`):
peak memory is about the model's own plus a fixed amount (issue 28).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from .errors import ConversionError, OutOfMemoryError, UserError
from .paths import (
    check_output_onnx, disk_full, ensure_memory, ensure_space, hold_before_rename, is_disk_full, megabytes,
    move_into_place, read_arrays, staging_dir,
)
from .onnx_build import QUIET, ort_failure, refuse_foreign_ops
from .policy import PARITY_TOL


class ExportCheckError(ConversionError):
    """An export that failed a check; ``report`` holds what was measured."""

    def __init__(self, message: str, report: "ExportReport | None" = None) -> None:
        super().__init__(message)
        self.report = report

DEFAULT_TOL = PARITY_TOL
UNKNOWN_DIM = 2  # what an unknown (batch) dimension becomes in the random sample


@dataclass
class Parity:
    """ONNX-vs-TF comparison on the same inputs."""

    max_abs: float | None
    max_rel: float | None
    tol: float
    samples: int
    nonfinite: str = ""  # which side produced NaN/Inf, if any

    @property
    def ok(self) -> bool:
        return not self.nonfinite and self.max_rel is not None and self.max_rel <= self.tol

    def describe(self) -> str:
        if self.nonfinite:
            return f"not comparable: {self.nonfinite}"
        return f"max abs error {self.max_abs:.3g}, max relative error {self.max_rel:.3g} (tolerance {self.tol:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs, "max_rel": self.max_rel, "tol": self.tol,
            "samples": self.samples, "nonfinite": self.nonfinite or None, "ok": self.ok,
        }


@dataclass
class ExportReport:
    output: str | None
    opset: int
    op_counts: dict[str, int]
    parity: Parity
    notes: list[str] = field(default_factory=list)
    # "Op 'node'" of every node CKKS cannot evaluate, but an output softmax (the client's).
    non_polynomial: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    data: str | None = None  # the external data file beside ``output``, if the weights are there

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "data": self.data,
            "weight_bytes": self.weight_bytes,
            "opset": self.opset,
            "op_counts": dict(sorted(self.op_counts.items())),
            "relu_nodes": self.op_counts.get("Relu", 0),
            "pow_nodes": self.op_counts.get("Pow", 0),
            "mul_nodes": self.op_counts.get("Mul", 0),
            "non_polynomial_nodes": list(self.non_polynomial),
            "parity": self.parity.to_dict(),
            "notes": list(self.notes),
        }


@dataclass
class _Callable:
    function: Any  # tf.function over flat tensors, input_signature set
    specs: list[tf.TensorSpec]
    output_names: list[str]


def _keras_callable(model: Any) -> _Callable:
    import keras

    inputs = keras.tree.flatten(model.inputs)
    specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name) for t in inputs]
    single = len(specs) == 1

    def run(*xs: Any) -> list[Any]:
        out = model(xs[0] if single else list(xs), training=False)
        return keras.tree.flatten(out)

    names = [t._keras_history[0].name for t in keras.tree.flatten(model.outputs)]
    return _Callable(tf.function(run, input_signature=specs, autograph=False), specs, names)


def _signature_callable(fn: Any) -> _Callable:
    kw = fn.structured_input_signature[1]
    names = sorted(kw)
    specs = [tf.TensorSpec(kw[n].shape, kw[n].dtype, name=n) for n in names]
    out_names = sorted(fn.structured_outputs)

    def run(*xs: Any) -> list[Any]:
        out = fn(**dict(zip(names, xs)))
        return [out[k] for k in out_names]

    return _Callable(tf.function(run, input_signature=specs, autograph=False), specs, out_names)


def tf_callable(obj: Any, signature: str | None = None, what: str = "ONNX export") -> tuple[_Callable, Any]:
    """A flat tf.function for a Keras model, a converted SavedModel module, or a
    loaded SavedModel; also returns what must stay referenced while it is used.
    A Keras model on another backend is refused, naming ``what`` needed it."""
    import keras

    if isinstance(obj, keras.Model):
        from .keras_setup import require_tensorflow

        require_tensorflow(what)  # a tf.function over the model: TensorFlow tensors only
        return _keras_callable(obj), obj
    from .formats.tf_graphs import signatures_of

    sigs = signatures_of(obj)
    if not sigs:
        raise UserError(f"cannot export a {type(obj).__name__}: it has no signatures")
    name = signature or ("serving_default" if "serving_default" in sigs else sorted(sigs)[0])
    if name not in sigs:
        raise UserError(f"--signature '{name}' not found; the model has: {', '.join(sorted(sigs))}")
    return _signature_callable(sigs[name]), obj


def sample_inputs(specs: list[tf.TensorSpec], sample: str | os.PathLike[str] | None, seed: int = 0) -> list[np.ndarray]:
    """The inputs parity is checked on: user data from an .npz/.npy, or seeded random."""
    if sample is not None:
        path = Path(sample)
        arrays = read_arrays(path, "sample data")
        out = []
        for i, spec in enumerate(specs):
            key = spec.name if spec.name in arrays else ("x" if "x" in arrays and len(specs) == 1 else f"x{i}")
            if key not in arrays:
                raise UserError(
                    f"sample data '{path}' has arrays {sorted(arrays)}, but input '{spec.name}' needs one "
                    f"named '{spec.name}' (or 'x' for a single input)"
                )
            out.append(np.asarray(arrays[key]).astype(spec.dtype.as_numpy_dtype))
        return out
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = [UNKNOWN_DIM if d is None else d for d in spec.shape.as_list()]
        if spec.dtype.is_floating:
            out.append(rng.uniform(0.0, 1.0, shape).astype(spec.dtype.as_numpy_dtype))
        elif spec.dtype.is_integer:
            out.append(rng.integers(0, 2, shape).astype(spec.dtype.as_numpy_dtype))
        else:
            raise UserError(f"input '{spec.name}' has dtype {spec.dtype.name}; pass --sample data")
    return out


def compare(tf_out: list[np.ndarray], onnx_out: list[np.ndarray], tol: float, samples: int) -> Parity:
    """Max absolute and relative (to each output's largest |value|) differences."""
    bad = []
    for i, (a, b) in enumerate(zip(tf_out, onnx_out)):
        for side, arr in (("TensorFlow", a), ("onnxruntime", b)):
            if not np.all(np.isfinite(arr)):
                n = int(np.size(arr) - np.isfinite(arr).sum())
                bad.append(f"{side} output {i} has {n} NaN/Inf value(s)")
    if bad:
        return Parity(None, None, tol, samples, "; ".join(bad) + " (x² overflows in deep networks: use real data with --sample, or fine-tune)")
    max_abs = max_rel = 0.0
    for a, b in zip(tf_out, onnx_out):
        if a.shape != b.shape:
            return Parity(None, None, tol, samples, f"shapes differ: TensorFlow {a.shape}, onnxruntime {b.shape}")
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return Parity(max_abs, max_rel, tol, samples)


def op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ONNX ops that are no polynomial of their inputs (what HE cannot evaluate).
NON_POLYNOMIAL_OPS = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax",
    "LayerNormalization", "Max", "Min", "MaxPool", "GlobalMaxPool", "Abs", "Sign", "Clip",
})


def non_polynomial_nodes(proto: Any) -> list[str]:
    """Nodes of ``proto`` whose op is not a polynomial, as "Op 'name'", except a
    Softmax whose output is a graph output (through Identity nodes only): the
    output softmax the client applies after decryption."""
    outputs = {o.name for o in proto.graph.output}
    # A tensor reaches an output through Identity nodes only.
    identity = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "Identity" and n.input}

    def reaches_output(tensor: str) -> bool:
        seen = set()
        while tensor not in outputs and tensor in identity and tensor not in seen:
            seen.add(tensor)
            tensor = identity[tensor]
        return tensor in outputs

    return [f"{n.op_type} '{n.name}'" for n in proto.graph.node if n.op_type in NON_POLYNOMIAL_OPS
            and not (n.op_type == "Softmax" and all(reaches_output(o) for o in n.output))]


def run_onnx(model: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` (a ModelProto, or the path of an .onnx file, whose
    external data is read from beside it) in onnxruntime (CPU), in graph order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
        return [np.asarray(o) for o in session.run(None, feed)]
    except Exception as e:  # noqa: BLE001
        raise ort_failure(e, "onnxruntime cannot run the ONNX graph") from e


def check_parity(call: _Callable, model: Any, sample: Any, tol: float) -> Parity:
    """Run TF and onnxruntime (``model``: a ModelProto or a path) on the same inputs
    and compare. onnxruntime runs first and is released before TensorFlow runs."""
    inputs = sample_inputs(call.specs, sample)
    onnx_out = run_onnx(model, inputs)
    tf_out = [np.asarray(t) for t in call.function(*[tf.constant(x) for x in inputs])]
    return compare(tf_out, onnx_out, tol, int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1)


def check_graph(path: Path) -> Any:
    """The graph of the .onnx at ``path`` (without its weights), refused (ConversionError)
    if it keeps a non-standard op or ``onnx.checker`` (full check) rejects it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    refuse_foreign_ops(graph)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # a path: external data is checked too
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from e
    return graph


def export_onnx(
    obj: Any,
    out: str | os.PathLike[str],
    *,
    opset: int | None = None,
    sample: str | os.PathLike[str] | None = None,
    tol: float = DEFAULT_TOL,
    signature: str | None = None,
    overwrite: bool = False,
    external_data: bool | None = None,
) -> ExportReport:
    """Export ``obj`` (Keras model or SavedModel module) to ONNX at ``out``, proven equal.

    The weights go to ``out + '.data'`` beside it (ONNX external data) when
    ``external_data`` is True, or when None and they are at least
    :data:`actswap.policy.ONNX_EXTERNAL_DATA_BYTES`; otherwise one file.

    Raises ConversionError (exit 1), writing nothing, if the graph has
    non-standard ops, fails the checker, or differs from TF beyond ``tol``;
    DiskSpaceError or OutOfMemoryError (exit 1), writing nothing, when the disk
    or the memory runs out. The files are checked and run where they were
    written, in a staging directory beside ``out``, and renamed into place only
    then, the data file before the .onnx that names it.
    """
    from .onnx_build import build, data_name, memory_needed
    from .policy import ONNX_EXTERNAL_DATA_BYTES

    dest = check_output_onnx(out, overwrite=overwrite)
    if not (tol > 0):
        raise UserError(f"--tol must be positive, got {tol}")
    call, keep = tf_callable(obj, signature)
    weights = _weight_bytes(call)
    external = weights >= ONNX_EXTERNAL_DATA_BYTES if external_data is None else external_data
    data_dest = dest.with_name(data_name(dest))
    if external and data_dest.exists() and not overwrite:
        raise UserError(f"'{data_dest}' exists (the data file of '{dest.name}'); pass --force to overwrite it")
    ensure_space(dest.parent, 2 * weights, f"'{dest.name}'", ELSEWHERE)  # the raw and the final weights
    ensure_memory(memory_needed(weights, external), f"exporting '{dest.name}' ({megabytes(weights)} of weights)")
    try:
        with staging_dir(dest) as work:
            path, size = build(call, work, dest.name, opset, external)
            graph = check_graph(path)
            parity = check_parity(call, path, sample, tol)
            report = ExportReport(None, graph.opset_import[0].version, op_counts(graph), parity,
                                  non_polynomial=non_polynomial_nodes(graph), weight_bytes=size)
            if not parity.ok:
                raise ExportCheckError(
                    f"ONNX output differs from TensorFlow: {parity.describe()}; nothing written", report
                )
            staged = work / data_name(path)
            moves = [(path, dest)]
            if staged.exists():  # none if no initializer was large enough to go there
                moves.insert(0, (staged, data_dest))
                report.data = str(data_dest)
            # The data file of the OUT being replaced, when this export has none: it goes too.
            orphan = report.data is None and overwrite and data_dest.name in _data_files(dest)
            hold_before_rename(path)
            move_into_place(moves)
            if orphan:
                data_dest.unlink(missing_ok=True)
                report.notes.append(f"removed '{data_dest.name}', the weights of the '{dest.name}' replaced")
    except MemoryError as e:
        raise OutOfMemoryError(
            f"ran out of memory while exporting '{dest.name}' ({megabytes(weights)} of weights); "
            "nothing was written; close other programs or export on a machine with more memory"
        ) from e
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(dest, e, ELSEWHERE) from e
        raise
    del keep
    report.output = str(dest)
    return report


ELSEWHERE = "(another OUT)"  # how to write elsewhere, in a full disk's message


def _data_files(path: Path) -> set[str]:
    """The external data files an existing .onnx names (none if it is not one)."""
    import onnx

    if not path.is_file():
        return set()
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: it names nothing
        return set()
    return {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}


def _weight_bytes(call: _Callable) -> int:
    return sum(int(np.prod(v.shape, dtype=np.int64)) * v.dtype.size
               for v in call.function.get_concrete_function(*call.specs).graph.variables)
