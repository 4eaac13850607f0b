"""Reading Keras 2 (tf_keras) files: what they are, their configs as data, the
safety check, and the tf_keras load that may follow it.

Invariant: nothing here loads a model except :func:`load`, which is called only
after :func:`check_legacy_safe` (``tf_keras.models.load_model`` runs ``Lambda``
bytecode even with ``safe_mode=True``).
"""

from __future__ import annotations

import json
import stat
import warnings
from pathlib import Path
from typing import Any

from ..report import warnings_as_notes
from ..errors import (
    LoadError,
    UnrecognisedFormatError,
    UnsupportedFormatError,
    UserError,
    first_line,
)
from .objects import objects

MAX_CONFIG_BYTES = 64 * 1024 * 1024


def require_tf_keras() -> Any:
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


def kind(path: Path) -> str:
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


def h5_attrs(path: Path) -> dict[str, Any]:
    """``model_config`` (required) and ``training_config`` (optional) of an HDF5 model."""
    from ..safety.h5read import read_h5  # in a bounded child: HDF5 can hang on a corrupt file

    contents = read_h5(path, Path(path).name)
    if contents.corrupt is not None:
        raise LoadError(f"'{path}': cannot read the HDF5 file ({contents.corrupt})")
    attrs = contents.attrs
    if "model_config" not in attrs:
        raise LoadError(
            f"'{path}' holds no model config (a weights-only HDF5 file?); "
            "pass a file saved with model.save()"
        )
    try:
        out = {"model_config": _json_object(attrs["model_config"], path, "model config")}
        if "training_config" in attrs:
            out["training_config"] = _json_object(attrs["training_config"], path, "training config")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"'{path}': the model config is not valid JSON ({e})") from None
    return out


def metadata_nodes(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(node_path, metadata)`` for every node of ``keras_metadata.pb``, parsed as data."""
    require_tf_keras()
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
    if kind(p) == "h5":
        return h5_attrs(p)["model_config"]
    return dict(metadata_nodes(p))["root"]


# --- safety -------------------------------------------------------------------


def legacy_findings(path: Path) -> list[str]:
    """Every entry of the stored config(s) that would run code or import a module
    (the errors of :func:`actswap.scan.scan`)."""
    from ..safety import SCANNERS, ScanReport

    p = Path(path)
    container = _container(p)
    report = ScanReport(str(p), container.value)
    SCANNERS[container](p, report)
    return [f.message for f in report.errors]


def _container(path: Path) -> Any:
    from ..containers import Format

    return Format.H5 if kind(path) == "h5" else Format.SAVEDMODEL


def check_legacy_safe(path: Path, trust_code: bool = False) -> None:
    """Refuse (UnsafeModelError, exit 2) a Keras 2 model the scan refuses.

    Must run before any ``tf_keras`` loader sees the file. With
    ``trust_code=True`` the findings of kind ``code`` are only warned about,
    loudly; malformed containers are refused regardless.
    """
    from ..safety import check_container
    from ..safety.report import CODE

    p = Path(path)
    report = check_container(p, _container(p), trust_code)
    code = [f for f in report.errors if f.kind == CODE]
    if not code:
        return
    more = f" (and {len(code) - 1} more)" if len(code) > 1 else ""
    warnings.warn(
        f"actswap: --trust-code: loading '{p}' although {code[0].message}{more}; "
        "its code WILL RUN with your permissions",
        UserWarning,
        stacklevel=2,
    )


def h5_needs_legacy(path: Path) -> bool:
    """True for a Keras 2 ``.h5`` whose structure Keras 3 cannot rebuild: a model
    nested inside the model (Keras 3 reads only flat legacy ``.h5`` files)."""
    config = h5_attrs(Path(path)).get("model_config")
    if not isinstance(config, dict):
        return False
    inner = (config.get("config") or {}).get("layers") or []
    return any(
        isinstance(layer, dict) and layer.get("class_name") in ("Functional", "Sequential", "Model")
        for layer in inner
    )


# --- loading (after the check) ---------------------------------------------------


def load(path: Path) -> tuple[Any, bool, list[str]]:
    """(model, compiled, notes). Call only after :func:`check_legacy_safe`."""
    tf_keras = require_tf_keras()

    objects()
    notes: list[str] = []
    with warnings_as_notes(notes, "tf_keras, loading the file,"):
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


def training_config(path: Path, kind: str) -> dict[str, Any] | None:
    if kind == "h5":
        return h5_attrs(path).get("training_config")
    tc = dict(metadata_nodes(path))["root"].get("training_config")
    return tc if isinstance(tc, dict) else None

