"""Generate ``actswap/safety/allowlists.py`` from the installed TensorFlow, Keras and tf_keras.

The scan (:mod:`actswap.safety`) must not import TensorFlow, so the names it
accepts are written down here, once, from the libraries themselves. Run

    python tests/gen_allowlists.py

after upgrading TensorFlow, Keras or tf_keras; ``tests/test_scan.py`` fails
while the stored lists differ from what this produces.

What is allowed, and why:

* Keras classes: every ``KerasSaveable`` subclass Keras defines (layers,
  models, operations, losses, metrics, optimizers ...) and every class of the
  public initializer/regularizer/constraint/dtype-policy/schedule namespaces,
  except the classes that carry or load code (:data:`DENIED_CLASSES`).
* Keras functions: the public functions of ``keras.activations``,
  ``keras.losses``, ``keras.metrics`` and ``keras.ops`` (what a config names
  as ``{"class_name": "function"}``); nothing from ``keras.utils``,
  ``keras.config``, ``keras.saving`` ...
* tf_keras classes: the same namespaces in tf_keras, plus the markers its
  JSON encoder writes (``__tuple__``, ``TensorShape`` ...).
* TensorFlow ops: every op of the op families that only compute on tensors
  (math, nn, array, control flow, variables, random, image, string, parsing,
  lookup tables ...), minus the ops of those families that touch files, run
  Python, print, write summaries, abort the process or talk to other
  processes (:data:`DENIED_OPS`). Whole families are left out: file I/O
  (``gen_io_ops``, except the checkpoint ops, which the scan allows only in a
  SavedModel's saver), datasets, summaries, debugging, Python functions,
  collectives/NCCL/send/recv/RPC, TPU, proto encode/decode (they read
  descriptor files), batching, boosted trees, file systems.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "actswap" / "safety" / "allowlists.py"

DENIED_CLASSES = frozenset({
    "Lambda",  # marshalled Python bytecode, or any function by name
    "TFSMLayer",  # loads a SavedModel (TF ops run on load)
    "TorchModuleWrapper",  # a pickled torch module
    "JaxLayer", "FlaxLayer",  # arbitrary functions
})

# Op families (TensorFlow's gen_*_ops modules) whose ops compute on tensors.
COMPUTE_FAMILIES = (
    "array", "audio", "bitwise", "candidate_sampling", "composite_tensor", "control_flow",
    "count", "ctc", "cudnn_rnn", "data_flow", "functional", "image", "linalg", "list",
    "logging", "lookup", "manip", "map", "math", "nn", "parsing", "ragged_array",
    "ragged_conversion", "ragged_math", "random", "random_index_shuffle", "resource_variable",
    "rnn", "set", "sparse", "special_math", "spectral", "state", "stateful_random",
    "stateless_random", "stateless_random_ops_v2", "string", "training", "uniform_quant",
)
# Ops of those families that are not pure computation.
DENIED_OPS = frozenset({
    "Abort",  # kills the process
    "ImmutableConst",  # memory-maps a file
    "RemoteCall",  # runs a function on another task
    "Print", "PrintV2",
    "AudioSummary", "AudioSummaryV2", "HistogramSummary", "ImageSummary", "MergeSummary",
    "ScalarSummary", "TensorSummary", "TensorSummaryV2",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",  # read files
    "RecordInput",  # reads files
    "GetSessionHandle", "GetSessionHandleV2", "GetSessionTensor", "DeleteSessionTensor",
})
DENIED_OP_PATTERNS = (
    # TF1 queues, barriers and staging areas: input pipelines, not models.
    r"Queue", r"^Barrier", r"Stage", r"^(Ordered)?Map(Clear|IncompleteSize|Peek|Size|Unstage)",
)
# Pure string helpers of gen_io_ops that checkpointing uses.
IO_STRING_OPS = ("ShardedFilename", "ShardedFilespec")

TF_KERAS_MARKERS = (
    "__tuple__", "__ellipsis__", "__passive_serialization__", "TensorShape", "TypeSpec",
    "InputSpec", "TFOpLambda", "SlicingOpLambda", "Functional", "Sequential", "Model",
)


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                stack.append(sub)
    return out


def _public_classes(namespace: object) -> set[str]:
    return {
        name for name, obj in vars(namespace).items()
        if isinstance(obj, type) and not name.startswith("_") and hasattr(obj, "from_config")
    }


def keras_classes() -> set[str]:
    import keras
    from keras.src.saving.keras_saveable import KerasSaveable

    for mod in pkgutil.walk_packages(keras.src.ops.__path__, "keras.src.ops."):
        if not mod.name.endswith("_test"):
            importlib.import_module(mod.name)
    names = {c.__name__ for c in _subclasses(KerasSaveable) if c.__module__.startswith("keras.")}
    for ns in (
        keras.initializers, keras.regularizers, keras.constraints, keras.dtype_policies,
        keras.optimizers.schedules, keras.quantizers,
    ):
        names |= _public_classes(ns)
    return {n for n in names if not n.startswith("_")} - DENIED_CLASSES


def keras_functions() -> set[str]:
    import keras

    names: set[str] = set()
    namespaces = [keras.activations, keras.losses, keras.metrics, keras.ops]
    namespaces += [getattr(keras.ops, sub) for sub in ("nn", "numpy", "image", "linalg", "core", "math")
                   if hasattr(keras.ops, sub)]
    for ns in namespaces:
        for name, obj in vars(ns).items():
            if callable(obj) and not isinstance(obj, type) and not name.startswith("_"):
                names.add(name)
    return names


def tf_keras_classes() -> set[str]:
    import tf_keras

    names: set[str] = set(TF_KERAS_MARKERS)
    for ns in (
        tf_keras.layers, tf_keras.models, tf_keras.initializers, tf_keras.regularizers,
        tf_keras.constraints, tf_keras.losses, tf_keras.metrics, tf_keras.optimizers,
        tf_keras.optimizers.legacy, tf_keras.optimizers.schedules, tf_keras.mixed_precision,
        tf_keras.layers.experimental, tf_keras.layers.experimental.preprocessing,
    ):
        names |= _public_classes(ns)
    # tf_keras registers its optimizers as "Custom>Name" in saved configs.
    names |= {f"Custom>{n}" for n in _public_classes(tf_keras.optimizers)}
    names |= {f"Custom>{n}" for n in _public_classes(tf_keras.optimizers.legacy)}
    return names - DENIED_CLASSES


def tf_ops() -> set[str]:
    import tensorflow.python.ops as ops

    allowed: set[str] = set()
    for family in COMPUTE_FAMILIES:
        name = family if family.endswith("_v2") else f"{family}_ops"
        mod = importlib.import_module(f"tensorflow.python.ops.gen_{name}")
        source = Path(mod.__file__).read_text()
        allowed |= set(re.findall(r'"raw_ops\.(\w+)"', source))
    del ops
    allowed |= set(IO_STRING_OPS)
    return {
        op for op in allowed
        if op not in DENIED_OPS and not any(re.search(p, op) for p in DENIED_OP_PATTERNS)
    }


def _frozenset(name: str, values: set[str], comment: str) -> str:
    body = textwrap.fill(" ".join(sorted(values)), width=96, break_on_hyphens=False, break_long_words=False)
    return f"# {comment}\n{name} = frozenset(\n    \"\"\"\n{body}\n\"\"\".split()\n)\n"


def render() -> str:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf_keras

    header = (
        '"""Names the pre-load scan accepts. GENERATED by tests/gen_allowlists.py; do not edit.\n\n'
        f"From TensorFlow {tf.__version__}, Keras {keras.__version__} and tf_keras "
        f"{tf_keras.__version__}; see the generator's docstring for what is included and why,\n"
        'and tests/test_scan.py for the check that this file is current.\n"""\n\n'
    )
    return header + "\n".join([
        _frozenset("KERAS_CLASSES", keras_classes(), "Keras 3 classes a config may name."),
        _frozenset("KERAS_FUNCTIONS", keras_functions(), "Keras 3 functions a config may name."),
        _frozenset("TF_KERAS_CLASSES", tf_keras_classes(), "Keras 2 (tf_keras) class names."),
        _frozenset("TF_OPS", tf_ops(), "TensorFlow ops that only compute on tensors."),
    ])


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
