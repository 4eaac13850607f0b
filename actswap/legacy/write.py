"""Writing Keras 2 (tf_keras) models: output rules and atomic saves.

Invariants: writes are atomic (a temporary sibling file or directory, checked,
then a rename); an existing output is replaced only with ``overwrite``; a
failed write or check leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import UserError

H5_SUFFIXES = (".h5", ".hdf5")


def check_output(src: Path | None, out: Path, kind: str, overwrite: bool) -> None:
    """Refuse (UserError) an output ``out`` for a ``kind`` ("h5"/"savedmodel")
    model: the input ``src`` itself or inside it (when given), an existing path
    without ``overwrite``, a name that says the other family."""
    if out.exists() or out.is_symlink():
        try:
            same = src is not None and (out.resolve() == src.resolve() or out.samefile(src))
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
        if src is not None and src.resolve() in out.resolve().parents:
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


def save_h5(model: Any, out: Path, check: Any = None) -> None:
    from ..paths import temp_prefix

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


def save_savedmodel(model: Any, out: Path, check: Any = None) -> None:
    from ..paths import temp_prefix

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

