"""Keras 2 (``tf_keras``) models: HDF5 files and Keras 2 SavedModel directories.

The Keras 3 path (:mod:`actswap.api`) cannot read a Keras 2 SavedModel, and
Keras 3 reads only flat legacy ``.h5`` files; this module converts both with
``tf_keras`` itself and writes the result back in the same family: ``.h5`` in,
``.h5`` out; Keras 2 SavedModel directory in, Keras 2 SavedModel directory out.

``tf_keras`` is an optional dependency (the ``legacy`` extra) and is imported
only inside functions. Importing this module registers actswap's ``tf_keras``
objects (``actswap_legacy>Square``, ``actswap_legacy>SquareActivation``) at
once if ``tf_keras`` is already imported, else the moment it is (a post-import
hook), so that after ``import actswap.legacy`` a converted model reloads with
plain ``tf_keras.models.load_model`` and no ``custom_objects``.

Invariants:

* the config is read as data and checked (:func:`check_legacy_safe`) before
  ``tf_keras`` loads anything: ``tf_keras.models.load_model`` runs ``Lambda``
  bytecode even with ``safe_mode=True``;
* the input is never modified; every weight of the result is bit-identical to
  the input's, in the same order (checked, :class:`InvariantError` otherwise);
* writes are atomic: a temporary sibling (file or directory), then a rename;
  an existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import wrapt

from . import gradients, registry
from .classify import (  # the tables and forms are re-exported under their old names here
    ACTIVATION_LAYER_FORM,  # noqa: F401
    LEGACY_PACKAGE,
    RELU_LAYER_FORM,  # noqa: F401
    TF_KERAS,
    TF_OP_ACTIVATIONS,  # noqa: F401
    TF_OP_FORM,
    layer_sites,
)
from .classify import TF_KERAS_ACTIVATION_LAYERS as ACTIVATION_LAYERS  # noqa: F401
from .errors import (
    ConversionError,
    InvariantError,
    LoadError,
    UnrecognisedFormatError,
    UnsupportedFormatError,
    UnsupportedModelError,
    UserError,
    first_line,
)
from .report import REPLACED, SKIPPED, Report, Site

PACKAGE = LEGACY_PACKAGE
MAX_CONFIG_BYTES = 64 * 1024 * 1024
H5_SUFFIXES = (".h5", ".hdf5")
TARGET = "square"

# --- reading, without loading -------------------------------------------------


def _require_tf_keras() -> Any:
    try:
        import tf_keras
    except ImportError:
        raise UnsupportedFormatError(
            "Keras 2 models need tf_keras, which is not installed; "
            "install it with: pip install 'actswap[legacy]'"
        ) from None
    return tf_keras


def is_keras2_savedmodel(path: Path) -> bool:
    """True for a directory holding ``saved_model.pb`` and ``keras_metadata.pb``."""
    p = Path(path)
    return p.is_dir() and (p / "saved_model.pb").is_file() and (p / "keras_metadata.pb").is_file()


def _kind(path: Path) -> str:
    """``"h5"`` or ``"savedmodel"``, judged by content; UserError otherwise."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"no such file or directory: '{path}'; check the path") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        if is_keras2_savedmodel(path):
            return "savedmodel"
        if (path / "saved_model.pb").is_file():
            raise UnsupportedFormatError(
                f"'{path}' is a TF SavedModel without keras_metadata.pb (not saved by Keras 2); "
                "convert the Keras model it came from instead"
            )
        raise UnrecognisedFormatError(
            f"'{path}' is a directory but not a Keras 2 SavedModel (no saved_model.pb); "
            "pass a .h5 file or a SavedModel directory"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnrecognisedFormatError(
            f"'{path}' is not a regular file or a directory (a device, FIFO or socket); "
            "pass a model file"
        )
    import h5py

    try:
        if h5py.is_hdf5(str(path)):
            return "h5"
    except OSError as e:
        raise LoadError(f"cannot read '{path}': {e}") from None
    raise UnrecognisedFormatError(
        f"'{path}' is neither an HDF5 file nor a Keras 2 SavedModel directory; "
        "pass a tf_keras .h5 file or SavedModel directory"
    )


def _json_object(raw: Any, path: Path, what: str) -> dict[str, Any]:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if not isinstance(raw, str):
        raise LoadError(f"'{path}': the {what} is not text")
    if len(raw) > MAX_CONFIG_BYTES:
        raise LoadError(
            f"'{path}': the {what} is larger than the {MAX_CONFIG_BYTES} bytes actswap reads"
        )
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise LoadError(f"'{path}': the {what} is not a JSON object")
    return value


def _h5_attrs(path: Path) -> dict[str, Any]:
    """``model_config`` (required) and ``training_config`` (optional) of an HDF5 model."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise LoadError(
                    f"'{path}' holds no model config (a weights-only HDF5 file?); "
                    "pass a file saved with model.save()"
                )
            out = {"model_config": _json_object(f.attrs["model_config"], path, "model config")}
            if "training_config" in f.attrs:
                out["training_config"] = _json_object(
                    f.attrs["training_config"], path, "training config"
                )
            return out
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"'{path}': the model config is not valid JSON ({e})") from None
    except OSError as e:
        raise LoadError(f"'{path}': cannot read the HDF5 file ({first_line(e)})") from None


def _metadata_nodes(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(node_path, metadata)`` for every node of ``keras_metadata.pb``, parsed as data."""
    _require_tf_keras()
    from google.protobuf.message import DecodeError
    from tf_keras.protobuf import saved_metadata_pb2

    pb = path / "keras_metadata.pb"
    try:
        size = pb.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise LoadError(
                f"'{pb}' is {size} bytes, more than the {MAX_CONFIG_BYTES} actswap reads"
            )
        data = pb.read_bytes()
    except OSError as e:
        raise LoadError(f"cannot read '{pb}': {e.strerror or e}") from None
    meta = saved_metadata_pb2.SavedMetadata()
    try:
        meta.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise LoadError(f"'{pb}' is corrupt: not a Keras SavedMetadata protobuf ({e})") from None
    nodes = []
    for node in meta.nodes:
        if not node.metadata:
            continue
        try:
            what = f"metadata of node '{node.node_path}'"
            nodes.append((node.node_path, _json_object(node.metadata, pb, what)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(
                f"'{pb}' is corrupt: the metadata of node '{node.node_path}' "
                f"is not valid JSON ({e})"
            ) from None
    if not any(p == "root" for p, _ in nodes):
        raise LoadError(f"'{pb}' is corrupt: it has no metadata for the root object")
    return nodes


def read_legacy_config(path: Path) -> dict[str, Any]:
    """The stored config of a Keras 2 model, read as data (nothing is loaded).

    For an HDF5 file: the ``model_config`` attribute. For a Keras 2 SavedModel
    directory: the metadata of the root object in ``keras_metadata.pb`` (its
    ``config``/``model_config`` keys hold the model config). LoadError (exit
    2) on corrupt input.
    """
    p = Path(path)
    if _kind(p) == "h5":
        return _h5_attrs(p)["model_config"]
    return dict(_metadata_nodes(p))["root"]


# --- safety -------------------------------------------------------------------


def legacy_findings(path: Path) -> list[str]:
    """Every entry of the stored config(s) that would run code or import a module
    (the errors of :func:`actswap.scan.scan`)."""
    from . import scan

    return [f.message for f in scan.scan(Path(path)).errors]


def check_legacy_safe(path: Path, trust_code: bool = False) -> None:
    """Refuse (UnsafeModelError, exit 2) a Keras 2 model the scan refuses.

    Must run before any ``tf_keras`` loader sees the file. With
    ``trust_code=True`` the findings of kind ``code`` are only warned about,
    loudly; malformed containers are refused regardless.
    """
    from . import scan

    p = Path(path)
    report = scan.check(p, trust_code=trust_code)
    code = [f for f in report.errors if f.kind == scan.CODE]
    if not code:
        return
    more = f" (and {len(code) - 1} more)" if len(code) > 1 else ""
    warnings.warn(
        f"actswap: --trust-code: loading '{p}' although {code[0].message}{more}; "
        "its code WILL RUN with your permissions",
        UserWarning,
        stacklevel=2,
    )


# --- tf_keras objects ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _objects() -> Any:
    """Define and register actswap's tf_keras classes (once, on first use)."""
    import tf_keras

    from .activations import grad_function, square_op

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
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        register(package=PACKAGE, name=cls.__name__)(cls)
    # tf_keras writes an activation object into an .h5 config under its class
    # __name__ but reads it back (legacy scope) by looking that name up in the
    # registry, whose key is "package>Name": so the name must be the key.
    SquareActivation.__name__ = f"{PACKAGE}>SquareActivation"
    return type("LegacyObjects", (), {"Square": Square, "SquareActivation": SquareActivation})


def __getattr__(name: str) -> Any:
    if name in ("Square", "SquareActivation"):
        return getattr(_objects(), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def _register_on_import(_module: Any) -> None:
    # Never raise from an import hook: it would break `import tf_keras`.
    try:
        _objects()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"actswap could not register its tf_keras objects: {e}", stacklevel=2)


if "tf_keras" in sys.modules:
    _register_on_import(sys.modules["tf_keras"])
else:
    wrapt.register_post_import_hook(_register_on_import, "tf_keras")


# --- finding sites ------------------------------------------------------------


def _is_graph_model(obj: Any) -> bool:
    import tf_keras
    from tf_keras.src.engine import functional

    return isinstance(obj, (tf_keras.Sequential, functional.Functional))


def _children(model: Any) -> list[Any]:
    import tf_keras

    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=False)
        if not isinstance(layer, tf_keras.layers.InputLayer)
    ]


def _check_structure(model: Any, path: str = "") -> None:
    import tf_keras

    if not _is_graph_model(model):
        where = path or "<model>"
        raise UnsupportedModelError(
            f"subclassed model {type(model).__name__} at '{where}': its call() is Python code "
            "that actswap cannot rewrite; rebuild it as a Functional or Sequential model"
        )
    for child in _children(model):
        child_path = f"{path}/{child.name}" if path else child.name
        if isinstance(child, tf_keras.Model):
            _check_structure(child, child_path)
        elif type(child).__module__.startswith("tf_keras.src.saving.legacy.saved_model"):
            raise UnsupportedModelError(
                f"layer '{child_path}' was restored from the SavedModel graph, not from its "
                "config (a custom class that is not registered): actswap cannot rewrite it"
            )


def find_legacy_sites(model: Any) -> list[Site]:
    """Every activation site of a loaded tf_keras Functional/Sequential model, in order.

    Paths are named from the model down, without the model's own name
    (``inner/dense_2``), as in the Keras 3 reports. A layer shared by several
    (nested) models is one site; its other paths are in ``also_at``.
    """
    import tf_keras

    _check_structure(model)
    sites: list[Site] = []
    first: dict[int, tuple[str, list[Site]]] = {}

    def visit(m: Any, prefix: str) -> None:
        for child in _children(m):
            path = prefix + child.name
            if id(child) in first:
                first_path, found = first[id(child)]
                for s in found:
                    s.also_at.append(path + s.path[len(first_path):])
                continue
            if isinstance(child, tf_keras.Model):
                first[id(child)] = (path, [])
                before = len(sites)
                visit(child, path + "/")
                first[id(child)] = (path, sites[before:])
                continue
            found = list(layer_sites(type(child).__name__, child.get_config(), path, TF_KERAS))
            for s in found:
                s.leaf_id = id(child)
            first[id(child)] = (path, found)
            sites.extend(found)

    visit(model, "")
    return sites


def _decide(site: Site) -> str | None:
    """None if the site is to be replaced, else the reason it is skipped."""
    if site.activation.startswith("custom"):
        return "unrecognised custom activation"
    if registry.family(site.activation) == "polynomial":
        return f"already {site.activation}"
    if site.activation != "relu" and registry.family(site.activation) != "relu":
        return "not selected (converting relu)"
    return registry.get_target(TARGET).refuses(site.activation, site.detail)


# --- rewriting ----------------------------------------------------------------


def _get(tree: Any, pointer: tuple[Any, ...]) -> Any:
    for key in pointer:
        tree = tree[key]
    return tree


def _edited_leaf(layer: Any, sites: list[Site], grad: str) -> Any:
    import tf_keras

    objs = _objects()
    config = copy.deepcopy(layer.get_config())
    for site in sites:
        if not site.pointer:  # the whole layer is the activation
            kwargs: dict[str, Any] = {
                "name": config["name"],
                "trainable": config.get("trainable", True),
            }
            if site.form == TF_OP_FORM:
                kwargs["cast_inputs"] = False
            elif "dtype" in config:
                kwargs["dtype"] = config["dtype"]
            return objs.Square(grad=grad, **kwargs)
        parent = _get(config, site.pointer[:-1])
        parent[site.pointer[-1]] = tf_keras.activations.serialize(objs.SquareActivation(grad))
    return type(layer).from_config(config)


def _clone(
    model: Any,
    replaced: dict[int, list[Site]],
    grad: str,
    leaves: list[tuple[Any, Any]],
    mapping: dict[int, Any],
) -> Any:
    """Rebuild ``model`` with tf_keras ``clone_model``, nested models recursively.

    tf_keras ``clone_model`` is not recursive (a nested model would be
    re-created from its unedited config), so nested Sequential/Functional
    models are cloned by this function itself. ``leaves`` collects
    ``(old, new)`` for weight copying; ``mapping`` maps ``id(old)`` to new and
    keeps a layer shared by nested models shared.
    """
    import tf_keras

    def clone_layer(layer: Any) -> Any:
        if id(layer) in mapping:  # shared between nested models
            return mapping[id(layer)]
        if isinstance(layer, tf_keras.Model):
            new = _clone(layer, replaced, grad, leaves, mapping)
        elif id(layer) in replaced:
            new = _edited_leaf(layer, replaced[id(layer)], grad)
            leaves.append((layer, new))
        else:
            new = type(layer).from_config(layer.get_config())
            leaves.append((layer, new))
        mapping[id(layer)] = new
        return new

    return tf_keras.models.clone_model(model, clone_function=clone_layer)


def _sync_trainable(old: Any, new: Any, mapping: dict[int, Any]) -> None:
    # Top-down: setting a model's flag sets all of its layers' flags.
    import tf_keras

    new.trainable = old.trainable
    for child in _children(old):
        twin = mapping[id(child)]
        if isinstance(child, tf_keras.Model):
            _sync_trainable(child, twin, mapping)
        else:
            twin.trainable = child.trainable


def _weights(model: Any) -> list[tuple[tuple[int, ...], str, bytes]]:
    import numpy as np

    return [
        (tuple(w.shape), w.dtype.name, np.asarray(w.numpy()).tobytes()) for w in model.weights
    ]


def _signature(model: Any) -> tuple[Any, ...]:
    def specs(tensors: Any) -> list[tuple[Any, ...]]:
        return [(tuple(t.shape), t.dtype.name) for t in tensors]

    return (
        list(getattr(model, "input_names", []) or []),
        list(getattr(model, "output_names", []) or []),
        specs(model.inputs or []),
        specs(model.outputs or []),
    )


def rewrite_legacy_model(model: Any, grad: str = "exact") -> tuple[Any, Report]:
    """Return a copy of a loaded tf_keras model with every plain ReLU squared, and a report.

    The input model is not modified. The copy is not compiled (see
    :func:`convert_legacy`, which recompiles it from the file's training config).
    """
    mode = gradients.normalize(grad)
    sites = find_legacy_sites(model)
    replaced: dict[int, list[Site]] = {}
    for s in sites:
        reason = _decide(s)
        s.replaceable = reason is None
        s.action = REPLACED if reason is None else SKIPPED
        s.reason = reason or f"{s.activation} -> {TARGET}"
        if s.action == REPLACED:
            replaced.setdefault(s.leaf_id, []).append(s)
    leaves: list[tuple[Any, Any]] = []
    mapping: dict[int, Any] = {}
    try:
        new = _clone(model, replaced, mode, leaves, mapping)
    except (UnsupportedModelError, InvariantError):
        raise
    except Exception as e:  # noqa: BLE001 - tf_keras raises anything
        raise ConversionError(
            f"could not rebuild the model with tf_keras: {first_line(e)}"
        ) from e
    _sync_trainable(model, new, mapping)
    for old_leaf, new_leaf in leaves:
        values = old_leaf.get_weights()
        if len(values) != len(new_leaf.weights):
            raise InvariantError(
                f"layer '{old_leaf.name}': {len(values)} weights in the input but "
                f"{len(new_leaf.weights)} after the rewrite"
            )
        new_leaf.set_weights(values)
    if _weights(new) != _weights(model):
        raise InvariantError("the rewritten model's weights differ from the input's")
    if _signature(new) != _signature(model):
        raise InvariantError("the rewritten model's inputs or outputs differ from the input's")
    notes = []
    lambdas = [s for s in _all_layers(model) if type(s).__name__ == "Lambda"]
    if lambdas:
        notes.append(
            f"{len(lambdas)} Lambda layer(s) copied as they are; "
            "ReLUs inside their Python code are not seen"
        )
    return new, Report(sites=sites, target=TARGET, grad=mode, notes=notes)


def _all_layers(model: Any) -> Iterator[Any]:
    import tf_keras

    for child in _children(model):
        yield child
        if isinstance(child, tf_keras.Model):
            yield from _all_layers(child)


# --- loading and saving -------------------------------------------------------


def _load(path: Path) -> tuple[Any, bool, list[str]]:
    """(model, compiled, notes). Call only after :func:`check_legacy_safe`."""
    tf_keras = _require_tf_keras()

    _objects()
    notes: list[str] = []
    try:
        model = tf_keras.models.load_model(str(path), compile=True, safe_mode=True)
        compiled = getattr(model, "optimizer", None) is not None
    except Exception as first:  # noqa: BLE001 - any loader failure is the file's
        try:
            model = tf_keras.models.load_model(str(path), compile=False, safe_mode=True)
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"could not load '{path}' with tf_keras: {first_line(e)}") from e
        compiled = False
        notes.append(
            f"loaded without its training configuration ({first_line(first)}); "
            "compile the converted model before training it"
        )
    if not isinstance(model, tf_keras.Model):
        raise LoadError(f"'{path}' holds a {type(model).__name__}, not a tf_keras model")
    return model, compiled, notes


def _training_config(path: Path, kind: str) -> dict[str, Any] | None:
    if kind == "h5":
        return _h5_attrs(path).get("training_config")
    tc = dict(_metadata_nodes(path))["root"].get("training_config")
    return tc if isinstance(tc, dict) else None


def _check_output(src: Path, out: Path, kind: str, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        try:
            same = out.resolve() == src.resolve() or out.samefile(src)
        except OSError:
            same = False
        if same:
            raise UserError(f"output '{out}' is the input; give another output path")
        if not overwrite:
            raise UserError(f"output '{out}' already exists; pass --force to overwrite it")
        if kind == "h5" and out.is_dir() and not out.is_symlink():
            raise UserError(f"output '{out}' is a directory; give a file name ending in .h5")
        if kind == "savedmodel" and not out.is_dir():
            raise UserError(
                f"output '{out}' exists and is not a directory; remove it or choose another path"
            )
    if not out.parent.is_dir():
        raise UserError(f"output folder '{out.parent}' does not exist; create it first")
    suffix = out.suffix.lower()
    if kind == "h5" and suffix not in H5_SUFFIXES:
        raise UserError(
            f"output '{out}' must end in .h5 (the input is a Keras 2 HDF5 file, and "
            f"tf_keras reads the format from the name); try {out.with_suffix('.h5')}"
        )
    if kind == "savedmodel" and suffix in (*H5_SUFFIXES, ".keras"):
        raise UserError(
            f"output '{out}' must be a directory name without .h5/.keras (the input is a "
            "Keras 2 SavedModel directory)"
        )
    try:
        if src.resolve() in out.resolve().parents:
            raise UserError(f"output '{out}' is inside the input '{src}'; write it elsewhere")
    except OSError:
        pass


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _save_h5(model: Any, out: Path, check: Any = None) -> None:
    from .paths import temp_prefix

    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".tmp.h5", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf_keras: "HDF5 ... is considered legacy"
            model.save(str(tmp), save_format="h5", overwrite=True)
        _fsync_file(tmp)
        if check is not None:
            check(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_savedmodel(model: Any, out: Path, check: Any = None) -> None:
    from .paths import temp_prefix

    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        model.save(str(tmp), save_format="tf", overwrite=True)
        _fsync_tree(tmp)
        if check is not None:
            check(tmp)
        if out.exists() or out.is_symlink():
            # A directory cannot be replaced in one rename: move the old one
            # aside, put the new one in place, then delete the old one.
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".old", dir=out.parent))
            os.replace(out, old / "model")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "model", out)
                raise
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "model").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        if (old / "model").is_symlink() or not (old / "model").is_dir():
            (old / "model").unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def convert_legacy(
    path: Path,
    out: Path,
    grad: str = "exact",
    overwrite: bool = False,
    trust_code: bool = False,
    strict: bool = False,
    write_unchanged: bool = True,
) -> Report:
    """Convert a Keras 2 ``.h5`` file or SavedModel directory; write the same family.

    With ``strict``, nothing is written when a ReLU-like site was skipped
    (the report's ``output`` stays None); without ``write_unchanged``, nothing
    is written when no site was replaced. What is written is reloaded (scanned,
    tf_keras) before it is moved into place and must hold the same sites, with
    squares where they were put, and bit-identical weights.

    The config is checked before anything is loaded (:func:`check_legacy_safe`);
    then ``tf_keras`` loads the model (compiled if it can), every plain ReLU
    becomes x² with gradient mode ``grad`` (``"exact"`` or ``"clip:C"``), and
    the result is written atomically to ``out``. It reloads with
    ``tf_keras.models.load_model`` after ``import actswap.legacy``.
    """
    src, dest = Path(path), Path(out)
    mode = gradients.normalize(grad)
    _require_tf_keras()
    kind = _kind(src)
    _check_output(src, dest, kind, overwrite)
    check_legacy_safe(src, trust_code=trust_code)
    model, compiled, notes = _load(src)
    new, report = rewrite_legacy_model(model, mode)
    if compiled:
        from tf_keras.src.saving.legacy import saving_utils

        try:
            tc = _training_config(src, kind)
            if tc is None:
                raise ValueError("no training config stored")
            new.compile(**saving_utils.compile_args_from_training_config(tc))
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            notes.append(
                f"could not restore the training configuration ({first_line(e)}); "
                "compile before fit"
            )
        notes.append("optimizer state (e.g. Adam moments) is not carried over; it starts fresh")
    report.notes = notes + report.notes
    report.source = str(src)
    if strict and report.skipped_relu_like:
        return report
    if report.replaced == 0 and not write_unchanged:
        return report
    from .paths import disk_full, ensure_space, is_disk_full, remove_stale_temps

    remove_stale_temps(dest)
    ensure_space(dest.parent, sum(len(w[2]) for w in _weights(new)), f"'{dest.name}'")

    def check(tmp: Path) -> None:
        _verify_written(tmp, new, report, trust_code)

    try:
        if kind == "h5":
            _save_h5(new, dest, check)
        else:
            _save_savedmodel(new, dest, check)
    except (UserError, InvariantError):
        raise
    except Exception as e:  # noqa: BLE001
        if is_disk_full(e):
            raise disk_full(dest, e) from e
        raise ConversionError(f"could not write '{dest}' with tf_keras: {first_line(e)}") from e
    report.output = str(dest)
    return report


def _verify_written(tmp: Path, new: Any, report: Report, trust_code: bool = False) -> None:
    """The temporary output reloads (after the scan) with ``new``'s sites, squares
    where the report says, and bit-identical weights; InvariantError otherwise."""
    from . import scan

    scan.check(tmp, trust_code=trust_code)
    reloaded, _, _ = _load(tmp)
    # A layer can hold several sites (activation=, recurrent_activation=): keyed by form too.
    from collections import Counter

    want = {(s.path, s.form): s.activation for s in find_legacy_sites(new)}
    after = find_legacy_sites(reloaded)
    got = {(s.path, s.form): s.activation for s in after}
    have = Counter((s.path, s.activation) for s in after)
    for (path, act), n in Counter((s.path, TARGET) for s in report.sites if s.action == REPLACED).items():
        if have[(path, act)] < n:
            found = sorted({s.activation for s in after if s.path == path}) or ["no activation"]
            raise InvariantError(
                f"the written model has {', '.join(found)} at '{path}' where {TARGET} was put; nothing written"
            )
    if want != got:
        raise InvariantError("the written model does not reload with the sites that were written; nothing written")
    if _weights(new) != _weights(reloaded):
        raise InvariantError("the written model's weights do not reload bit-identically; nothing written")


def h5_needs_legacy(path: Path) -> bool:
    """True for a Keras 2 ``.h5`` whose structure Keras 3 cannot rebuild: a model
    nested inside the model (Keras 3 reads only flat legacy ``.h5`` files)."""
    config = _h5_attrs(Path(path)).get("model_config")
    if not isinstance(config, dict):
        return False
    inner = (config.get("config") or {}).get("layers") or []
    return any(
        isinstance(layer, dict) and layer.get("class_name") in ("Functional", "Sequential", "Model")
        for layer in inner
    )


def inspect_legacy(path: Path, trust_code: bool = False) -> Report:
    """Every activation site of a Keras 2 model, loaded with tf_keras after the safety check."""
    src = Path(path)
    _require_tf_keras()
    check_legacy_safe(src, trust_code=trust_code)
    model, _, notes = _load(src)
    sites = find_legacy_sites(model)
    for s in sites:
        s.replaceable = _decide(s) is None
    return Report(sites=sites, notes=notes, source=str(src))


__all__ = [
    "h5_needs_legacy",
    "inspect_legacy",
    "is_keras2_savedmodel",
    "read_legacy_config",
    "check_legacy_safe",
    "legacy_findings",
    "find_legacy_sites",
    "rewrite_legacy_model",
    "convert_legacy",
]
