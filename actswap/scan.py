"""Pre-load safety checks: read a model's config as data and refuse code.

A model file is untrusted input. Keras safe mode blocks Lambda bytecode when a
``.keras`` file is loaded, but it has had bypasses, and legacy loaders ignore it;
so before anything is deserialized, the config is read as plain JSON and walked
at every depth.

Invariant: nothing in this module imports TensorFlow or Keras, executes
anything from the file, or writes anything.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LoadError, UnsafeModelError
from .formats import Format

# Classes whose config carries code (marshalled bytecode) or that load another
# model (a SavedModel) behind the loader's back.
CODE_CLASSES = frozenset({"Lambda", "TFSMLayer", "__lambda__"})
TRUSTED_MODULE_ROOTS = ("keras", "actswap")
MAX_CONFIG_BYTES = 64 * 1024 * 1024


def read_config(path: Path, fmt: Format) -> dict[str, Any]:
    """Return the model config stored in the file, parsed as JSON only."""
    try:
        if fmt is Format.KERAS:
            with zipfile.ZipFile(path) as z:
                info = z.getinfo("config.json")
                if info.file_size > MAX_CONFIG_BYTES:
                    raise UnsafeModelError(
                        f"'{path}': config.json declares {info.file_size} bytes, "
                        f"more than the {MAX_CONFIG_BYTES} actswap reads"
                    )
                raw = z.read(info)
        elif fmt is Format.H5:
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs["model_config"]
        else:
            raise ValueError(f"no config to read for format {fmt}")
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"'{path}': the model config is not valid JSON ({e})") from None
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise LoadError(f"'{path}': cannot read the model config ({e})") from None
    if not isinstance(config, dict):
        raise LoadError(f"'{path}': the model config is not a JSON object")
    return config


def _walk(
    node: Any, path: tuple[str, ...], root: bool = False
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    # Paths are named from the model down, without the model's own name, as
    # in actswap's site reports.
    if isinstance(node, dict):
        name = None
        cfg = node.get("config")
        if isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
            name = cfg["name"]
        here = path + (name,) if name and "class_name" in node and not root else path
        yield here, node
        for value in node.values():
            yield from _walk(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, path)


def find_unsafe(config: dict[str, Any]) -> list[str]:
    """Describe every entry of ``config`` that would run code or import a module.

    Returns one human-readable finding per entry, naming its path in the model.
    """
    findings = []
    for path, node in _walk(config, (), root=True):
        where = "/".join(path) or "<model>"
        cls = node.get("class_name")
        if isinstance(cls, str) and cls in CODE_CLASSES:
            findings.append(f"{cls} at '{where}' carries code that would run on load")
            continue
        module = node.get("module")
        if isinstance(module, str) and "class_name" in node:
            root = module.split(".")[0]
            if root not in TRUSTED_MODULE_ROOTS and not (
                root == "builtins" and cls == "function"
            ):
                findings.append(
                    f"'{cls}' from module '{module}' at '{where}' is outside Keras "
                    "and would be imported on load"
                )
    return findings


def check(path: Path, fmt: Format) -> dict[str, Any]:
    """Refuse (exit 2) a file whose config runs code; return the parsed config."""
    config = read_config(path, fmt)
    findings = find_unsafe(config)
    if findings:
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        raise UnsafeModelError(
            f"refusing to load '{path}': {findings[0]}{more}; "
            "actswap only loads models built from Keras layers"
        )
    return config
