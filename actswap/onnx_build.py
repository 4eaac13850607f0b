"""TensorFlow to ONNX with the weights kept out of the converter.

Driven the usual way (``tf2onnx.convert.from_function``), tf2onnx holds the
weights many times over: TF's freezer reads every variable and writes it into a
GraphDef, grappler copies that graph, and tf2onnx's own graph keeps a further
copy per optimizer pass (each pass rebuilds every node's protobuf in place, and
upb frees nothing until the whole message goes). Measured: 6.3 GB peak for
ResNet50's 102 MB of weights, about 55x (issue 28).

Here the converter only ever sees the graph's structure:

1. :func:`freeze`: the traced function becomes a GraphDef in which every large
   floating weight (rank >= 2: kernels, embeddings) is a ``Placeholder`` of its
   shape; its value is never read there. Vectors (biases, batch-norm
   statistics) stay constants, so grappler and tf2onnx fold them as before.
2. tf2onnx (its transpose optimizer fixed, :mod:`actswap.tf2onnx_fixes`)
   converts that graph; the weights arrive as graph inputs.
3. :func:`write_weights` streams the values, one tensor at a time, into a raw
   data file, and the inputs become initializers stored there (ONNX external
   data).
4. onnxruntime's basic graph optimizations (portable, standard ops only:
   constant folding, Conv+Mul and Conv+Add fusion) fold the layout changes and
   batch-norm arithmetic the weights now pass through, as TF's constant folding
   did before, and write the final model: one file, or ``.onnx`` plus a data file.

Invariants: the model is only read; everything is written inside ``workdir``
(the caller's staging directory), the raw files are removed once the final model
is written; the final graph holds only what onnxruntime's basic level emits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from .errors import ConversionError

# A weight leaves the converter when it is a floating tensor of rank >= 2 and at
# least this large. Smaller tensors stay constants: too small to matter for
# memory, and a constant is what some folding needs (measured on ResNet50: a
# 2048-channel batch-norm vector left as an input kept two Transposes and a Mul).
WEIGHT_MIN_BYTES = 4096

# Initializers at least this large go to the data file when it is used.
EXTERNAL_MIN_BYTES = 1024


@dataclass
class Weight:
    """A tensor the converter does not see: a variable, or a GraphDef constant."""

    name: str  # the Placeholder's name in the frozen graph
    dtype: np.dtype
    shape: tuple[int, ...]
    variable: Any = None  # read when written
    content: bytes | None = None  # a constant's bytes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def value(self) -> np.ndarray:
        if self.variable is not None:
            return np.ascontiguousarray(self.variable.numpy())
        return np.frombuffer(self.content or b"", self.dtype).reshape(self.shape)


@dataclass
class Frozen:
    graph_def: Any
    inputs: list[str]  # tensor names of the real inputs
    outputs: list[str]
    rename: dict[str, str]  # tensor name -> ONNX input/output name
    weights: list[Weight]

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)


def _leaves(dtype: Any, shape: Any) -> bool:
    dtype = tf.dtypes.as_dtype(dtype)
    if not dtype.is_floating or len(shape) < 2 or any(d is None for d in shape):
        return False
    return int(np.prod(shape, dtype=np.int64)) * dtype.size >= WEIGHT_MIN_BYTES


def _allow_inlining(graph_def: Any) -> None:
    # Keras' TensorFlow backend wraps grouped convolutions (ConvNeXt's depthwise
    # Conv2D) in tf.function(jit_compile=True). grappler never inlines an
    # XLA-compiled function, and tf2onnx cannot convert the call it leaves
    # (StatefulPartitionedCall). XLA is only how TF would run it: the body is
    # ordinary TF ops, inlined once these markers are gone.
    for function in graph_def.library.function:
        for key in ("_XlaMustCompile", "_noinline"):
            if key in function.attr:
                del function.attr[key]
    for node in graph_def.node:
        if "_XlaMustCompile" in node.attr:
            del node.attr["_XlaMustCompile"]


def freeze(call: Any) -> Frozen:
    """The weight-free GraphDef of ``call`` (an ``export._Callable``)."""
    from tf2onnx.convert import tensor_names_from_structed

    from . import tf_private

    concrete = call.function.get_concrete_function(*call.specs)
    graph_def, variables = tf_private.freeze(concrete, lambda v: _leaves(v.dtype, v.shape))
    _allow_inlining(graph_def)
    weights = [Weight(name, np.dtype(v.dtype.as_numpy_dtype), tuple(v.shape), variable=v)
               for name, v in variables.items()]
    for node in graph_def.node:  # constants baked into the graph (a SavedModel's)
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        shape = [d.size for d in tensor.tensor_shape.dim] if tensor is not None else []
        if tensor is None or not tensor.tensor_content or not _leaves(tensor.dtype, shape):
            continue
        dtype = tf.dtypes.as_dtype(tensor.dtype)
        weights.append(Weight(node.name, np.dtype(dtype.as_numpy_dtype), tuple(shape), content=tensor.tensor_content))
        name = node.name
        node.Clear()
        node.name, node.op = name, "Placeholder"
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["shape"].shape.CopyFrom(tf.TensorShape(shape).as_proto())
    # The explicit inputs come first; captured tensors follow (tf2onnx's own
    # from_function lists those too, and the ONNX graph then asks for them as inputs).
    inputs = [t.name for t in concrete.inputs[: len(call.specs)]]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    rename = tensor_names_from_structed(concrete, inputs, outputs)
    return Frozen(graph_def, inputs, outputs, rename, weights)


def convert(frozen: Frozen, opset: int) -> Any:
    """tf2onnx on the weight-free graph; the weights are graph inputs named ``name:0``."""
    import tf2onnx

    from .tf2onnx_fixes import patched

    try:
        with patched(), _tf_logs_quiet():
            proto, _ = tf2onnx.convert.from_graph_def(
                frozen.graph_def, input_names=frozen.inputs + [w.name + ":0" for w in frozen.weights],
                output_names=frozen.outputs, opset=opset, tensors_to_rename=frozen.rename,
            )
    except Exception as e:  # noqa: BLE001 - the converter's failure, reported as ours
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"tf2onnx could not convert the model: {first}") from e
    refuse_foreign_ops(proto)  # before onnxruntime, which would only say it cannot load the graph
    return proto


def non_standard_ops(model: Any) -> list[str]:
    """Nodes (at any depth) whose op is not a standard ONNX op; tf2onnx leaves TF ops it
    could not convert in the graph when it continues on errors."""
    import onnx

    found = []

    def walk(graph: Any) -> None:
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type):
                found.append(f"{node.op_type} (node '{node.name}', domain '{node.domain or 'ai.onnx'}')")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return found


def refuse_foreign_ops(proto: Any) -> None:
    """Raise ConversionError naming the first op that is not standard ONNX."""
    foreign = non_standard_ops(proto)
    if foreign:
        raise ConversionError(
            f"the ONNX graph keeps {len(foreign)} op(s) that are not standard ONNX, first {foreign[0]}; "
            "the model uses a TF op tf2onnx cannot convert"
        )


@contextlib.contextmanager
def _tf_logs_quiet() -> Iterator[None]:
    # tf2onnx freezes and prunes with TF1 APIs, whose deprecation notices TF logs
    # as warnings ("Instructions for updating: ..."): noise about tf2onnx's code.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def write_weights(weights: list[Weight], path: Path) -> dict[str, tuple[int, int]]:
    """Stream each weight's bytes into ``path`` (page-aligned, little-endian as ONNX
    requires); returns ``{name: (offset, length)}``. One tensor in memory at a time."""
    where: dict[str, tuple[int, int]] = {}
    with open(path, "wb") as f:
        for w in weights:
            f.seek((f.tell() + 4095) // 4096 * 4096)
            value = w.value()
            if value.dtype.byteorder == ">":
                value = value.astype(value.dtype.newbyteorder("<"))
            start = f.tell()
            f.write(memoryview(value).cast("B"))  # not ndarray.tofile: its short write has no errno
            where[w.name] = (start, f.tell() - start)
            del value
        f.flush()
        os.fsync(f.fileno())
    return where


def attach(proto: Any, where: dict[str, tuple[int, int]], location: str) -> None:
    """Make the weight inputs of ``proto`` initializers stored in ``location``."""
    from onnx import TensorProto

    kept = []
    for graph_input in proto.graph.input:
        name = graph_input.name[:-2] if graph_input.name.endswith(":0") else graph_input.name
        if name not in where:
            kept.append(graph_input)
            continue
        offset, length = where[name]
        init = proto.graph.initializer.add()
        init.name = graph_input.name
        init.data_type = graph_input.type.tensor_type.elem_type
        init.dims.extend(d.dim_value for d in graph_input.type.tensor_type.shape.dim)
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    kept = [_copy(k) for k in kept]  # before the field they live in is cleared
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def optimise(raw: Path, out: Path, external: bool) -> None:
    """onnxruntime's basic (portable) optimizations on ``raw``, written to ``out``
    with its initializers in ``out.name + '.data'`` beside it; without ``external``,
    then rewritten as one file (onnxruntime would keep pointing unchanged
    initializers at ``raw``'s data)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = QUIET  # its notes on unused initializers are not the user's
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name(out))
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(EXTERNAL_MIN_BYTES))
    options.add_session_config_entry("session.disable_prepacking", "1")  # never run: no packed copies
    try:
        session = ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=KEEP_AS_CONVERTED)
    except Exception as e:  # noqa: BLE001
        if "write" in str(e) and _nearly_full(out.parent):  # onnxruntime says which file, not why
            raise OSError(errno.ENOSPC, f"No space left on device writing '{out.name}'") from e
        raise ort_failure(e, "onnxruntime could not optimise the ONNX graph") from e
    del session
    if not external:
        import onnx

        model = onnx.load(str(out))  # the data read in, and marked as inline
        out.write_bytes(model.SerializeToString())
        del model
        (out.parent / data_name(out)).unlink(missing_ok=True)  # none when no initializer is large


# onnxruntime's basic rewrites left out: the graph keeps what tf2onnx wrote
# where no weight needs folding (a Dense stays MatMul + Add, not Gemm).
KEEP_AS_CONVERTED = ["MatMulAddFusion"]

# onnxruntime's log level for our sessions: fatal only. Its errors come back as
# exceptions, said in one line; printed too, they would be said twice.
QUIET = 4


def ort_failure(e: Exception, what: str) -> Exception:
    """The error to raise for onnxruntime's exception ``e``: a MemoryError when an
    allocation failed (onnxruntime reports std::bad_alloc as a runtime error),
    else a ConversionError saying ``what`` and onnxruntime's first line."""
    text = str(e)
    if isinstance(e, MemoryError) or any(s in text for s in ("bad_alloc", "bad allocation", "Failed to allocate")):
        return MemoryError(text)
    return ConversionError(f"{what}: {text.splitlines()[0] if text else type(e).__name__}")


def _nearly_full(directory: Path) -> bool:
    from .paths import SPACE_MARGIN

    try:
        return shutil.disk_usage(directory).free < SPACE_MARGIN
    except OSError:
        return False


def data_name(model: Path) -> str:
    """The name of ``model``'s external data file, beside it."""
    return model.name + ".data"


def memory_needed(weight_bytes: int, external: bool) -> int:
    """About what :func:`build` and the parity run add to the process's memory at
    their peak, from issue 28's measurements (peak minus RSS after loading):
    ResNet50 0.40 GB, ResNet152 0.90 GB, ConvNeXt-Base 0.95 GB with external
    data (2.5x the weights + 0.3 GB bounds them); ResNet50 as one file 0.58 GB
    (the whole model is then one protobuf when written, checked and loaded)."""
    return int((2.5 if external else 4.5) * weight_bytes) + 300 * 2**20


def build(call: Any, workdir: Path, name: str, opset: int | None, external: bool) -> tuple[Path, int]:
    """Write the ONNX model of ``call`` as ``workdir/name`` (and its data file when
    ``external``); returns the path and the size of the weights left out of the
    converter, in bytes."""
    import tf2onnx

    frozen = freeze(call)
    size = frozen.weight_bytes
    proto = convert(frozen, opset or tf2onnx.constants.PREFERRED_OPSET)
    frozen.graph_def = None
    raw_model, raw_data = workdir / ("raw-" + name), workdir / ("raw-" + name + ".data")
    attach(proto, write_weights(frozen.weights, raw_data), raw_data.name)
    raw_model.write_bytes(proto.SerializeToString())
    del proto
    out = workdir / name
    optimise(raw_model, out, external)
    raw_model.unlink()
    raw_data.unlink()
    return out, size
