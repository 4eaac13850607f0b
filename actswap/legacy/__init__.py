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

Sites are found, decided and rewritten by the shared Keras engine
(:func:`actswap.sites.find_sites`, :func:`actswap.policy.decide`,
:func:`actswap.rewrite.rewrite`) through tf_keras's flavor
(:mod:`actswap.legacy.engine`). What stays here is tf_keras's own: reading its
files as data and the safety check (:mod:`.files`), its ``Square`` classes
(:mod:`.objects`), restoring the training config, and same-family atomic
saving with read-back (:mod:`.write`).

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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import gradients, registry
# Keras 3 and the shared engine (sites, rewrite, .engine) are imported inside
# the functions that use them: importing this module imports neither.
from ..classify import (  # the tables and forms are re-exported under their old names here
    ACTIVATION_LAYER_FORM,  # noqa: F401
    LEGACY_PACKAGE,
    RELU_LAYER_FORM,  # noqa: F401
    TF_OP_ACTIVATIONS,  # noqa: F401
    TF_OP_FORM,
)
from ..classify import TF_KERAS_ACTIVATION_LAYERS as ACTIVATION_LAYERS  # noqa: F401
from ..errors import ConversionError, InvariantError, UnsupportedModelError, UserError, first_line
from ..policy import decide
from ..report import REPLACED, SKIPPED, Report, Site
from .files import (  # noqa: F401 - the public (and older private) names of this module
    MAX_CONFIG_BYTES,
    check_legacy_safe,
    h5_needs_legacy,
    is_keras2_savedmodel,
    legacy_findings,
    read_legacy_config,
)
from .files import h5_attrs as _h5_attrs  # noqa: F401
from .files import kind as _kind
from .files import load as _load
from .files import metadata_nodes as _metadata_nodes  # noqa: F401
from .files import require_tf_keras as _require_tf_keras
from .files import training_config as _training_config
from .objects import objects as _objects
from .write import H5_SUFFIXES, check_output, save_h5, save_savedmodel  # noqa: F401

PACKAGE = LEGACY_PACKAGE
TARGET = "square"
# tf_keras files convert ReLU to x² only (the CLI refuses other --to/--from).
SOURCES = frozenset({"relu"})


def __getattr__(name: str) -> Any:
    if name in ("Square", "SquareActivation"):
        return getattr(_objects(), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def find_legacy_sites(model: Any) -> list[Site]:
    """Every activation site of a loaded tf_keras Functional/Sequential model, in order
    (:func:`actswap.sites.find_sites` with tf_keras's flavor).

    Paths are named from the model down, without the model's own name
    (``inner/dense_2``), as in the Keras 3 reports. A layer shared by several
    (nested) models is one site; its other paths are in ``also_at``.
    UnsupportedModelError for a model the engine cannot rebuild.
    """
    from ..sites import find_sites
    from .engine import FLAVOR, check_structure

    check_structure(model)
    return find_sites(model, FLAVOR)


def _decide(site: Site) -> str | None:
    """None if the site is to be replaced, else the reason it is skipped."""
    return decide(site, registry.get_target(TARGET), SOURCES, more_sources=None)


def _builders(grad: str) -> tuple[Any, Any]:
    """The engine's builders: tf_keras ``Square`` for a whole layer or op,
    ``SquareActivation`` for an ``activation=`` argument."""
    objs = _objects()

    def make_layer(site: Site, node: dict[str, Any]) -> Any:
        config = node["config"]
        kwargs: dict[str, Any] = {"name": config["name"], "trainable": config.get("trainable", True)}
        if site.form == TF_OP_FORM:  # an op computed in its input's dtype; so must x²
            kwargs["cast_inputs"] = False
        elif "dtype" in config:
            kwargs["dtype"] = config["dtype"]
        return objs.Square(grad=grad, **kwargs)

    def make_activation(site: Site, owner: dict[str, Any]) -> Any:
        return objs.SquareActivation(grad)

    return make_layer, make_activation


def rewrite_legacy_model(model: Any, grad: str = "exact") -> tuple[Any, Report]:
    """Return a copy of a loaded tf_keras model with every plain ReLU squared, and a report.

    The input model is not modified; every weight of the copy is bit-identical
    to the input's, in the same order, and input/output names, shapes and
    dtypes are unchanged (checked by the engine, InvariantError otherwise).
    The copy is not compiled (see :func:`convert_legacy`, which recompiles it
    from the file's training config).
    """
    from ..rewrite import rewrite
    from ..sites import iter_nodes
    from .engine import ENGINE, FLAVOR

    mode = gradients.normalize(grad)
    sites = find_legacy_sites(model)
    for s in sites:
        reason = _decide(s)
        s.replaceable = reason is None
        s.action = REPLACED if reason is None else SKIPPED
        s.reason = reason or f"{s.activation} -> {TARGET}"
    make_layer, make_activation = _builders(mode)
    try:
        new = rewrite(model, sites, make_layer, make_activation, engine=ENGINE)
    except (UnsupportedModelError, InvariantError):
        raise
    except Exception as e:  # noqa: BLE001 - tf_keras raises anything
        raise ConversionError(
            f"could not rebuild the model with tf_keras: {first_line(e)}"
        ) from e
    notes = []
    lambdas = [obj for _, obj in iter_nodes(model, "", FLAVOR) if type(obj).__name__ == "Lambda"]
    if lambdas:
        notes.append(
            f"{len(lambdas)} Lambda layer(s) copied as they are; "
            "ReLUs inside their Python code are not seen"
        )
    return new, Report(sites=sites, target=TARGET, grad=mode, notes=notes)


def convert_file(path: Path, grad: str = "exact", trust_code: bool = False) -> tuple[Any, Report]:
    """Load a Keras 2 ``.h5`` file or SavedModel directory and square every plain
    ReLU; nothing is written (:func:`save_legacy` writes the result).

    The config is checked before anything is loaded (:func:`check_legacy_safe`);
    then ``tf_keras`` loads the model (compiled if it can) and the copy is
    recompiled from the file's training config (a note says when it cannot be).
    """
    src = Path(path)
    mode = gradients.normalize(grad)
    _require_tf_keras()
    kind = _kind(src)
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
    return new, report


def save_legacy(
    new: Any, out: Path, *, overwrite: bool = False, verify: bool = True,
    check: Callable[[list[Site]], None] | None = None, trust_code: bool = False,
) -> Path:
    """Write a tf_keras model atomically: as ``.h5`` when ``out`` ends in
    .h5/.hdf5, else as a Keras 2 SavedModel directory (tf_keras, too, picks the
    format from the name).

    Before the rename the temporary output is scanned and reloaded with
    tf_keras; ``check(sites)`` gets the sites read back, and with ``verify`` they
    and the weights must equal ``new``'s, bit for bit. A failure writes nothing.
    """
    from ..paths import disk_full, ensure_space, is_disk_full, remove_stale_temps

    dest = Path(out)
    kind = "h5" if dest.suffix.lower() in H5_SUFFIXES else "savedmodel"
    check_output(None, dest, kind, overwrite)
    remove_stale_temps(dest)
    size = sum(v.shape.num_elements() * v.dtype.size for v in new.weights)
    ensure_space(dest.parent, size, f"'{dest.name}'")

    def check_written(tmp: Path) -> None:
        _verify_written(tmp, kind, new, check if check is not None else (lambda sites: None), verify, trust_code)

    try:
        (save_h5 if kind == "h5" else save_savedmodel)(new, dest, check_written)
    except (UserError, InvariantError):
        raise
    except Exception as e:  # noqa: BLE001
        if is_disk_full(e):
            raise disk_full(dest, e) from e
        raise ConversionError(f"could not write '{dest}' with tf_keras: {first_line(e)}") from e
    return dest


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

    :func:`convert_file`, then :func:`save_legacy` with the check that every
    replaced site reads back as a square. With ``strict``, nothing is written
    when a ReLU-like site was skipped (the report's ``output`` stays None);
    without ``write_unchanged``, nothing is written when no site was replaced.
    The result reloads with ``tf_keras.models.load_model`` after
    ``import actswap.legacy``.
    """
    from ..readback import replaced_sites_check

    src, dest = Path(path), Path(out)
    _require_tf_keras()
    check_output(src, dest, _kind(src), overwrite)
    new, report = convert_file(src, grad, trust_code)
    if strict and report.skipped_relu_like:
        return report
    if report.replaced == 0 and not write_unchanged:
        return report
    save_legacy(new, dest, overwrite=overwrite, check=replaced_sites_check(report), trust_code=trust_code)
    report.output = str(dest)
    return report


def _verify_written(
    tmp: Path, kind: str, new: Any, check: Callable[[list[Site]], None], verify: bool, trust_code: bool
) -> None:
    """The temporary output passes the scan and reloads; ``check`` accepts the
    sites read back; with ``verify`` they and the weights equal ``new``'s."""
    from ..containers import Format
    from ..rewrite import check_same_weights
    from ..safety import check_container

    check_container(tmp, Format.H5 if kind == "h5" else Format.SAVEDMODEL, trust_code)
    reloaded, _, _ = _load(tmp)
    after = find_legacy_sites(reloaded)
    check(after)
    if not verify:
        return
    # A layer can hold several sites (activation=, recurrent_activation=): keyed by form too.
    want = {(s.path, s.form): s.activation for s in find_legacy_sites(new)}
    if want != {(s.path, s.form): s.activation for s in after}:
        raise InvariantError("the written model does not reload with the sites that were written; nothing written")
    try:
        check_same_weights(new, reloaded)
    except InvariantError as e:
        raise InvariantError(
            f"the written model's weights do not reload bit-identically ({e}); nothing written"
        ) from None


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
    "convert_file",
    "convert_legacy",
    "save_legacy",
]
