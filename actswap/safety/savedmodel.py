"""SavedModel directories: the tree, ``saved_model.pb`` and ``keras_metadata.pb``.

A SavedModel runs its graph's ops while it is being *loaded* (initializers,
restore functions), so :func:`scan_savedmodel` checks: the directory tree
(special files, and symlinks that leave it); every op of every meta graph and
function (:func:`actswap.safety.graph_ops.check_graph`, with the saver's
checkpoint ops allowed only where the saver alone reaches them, and table
initializers that read a file allowed only where the file is one of the
SavedModel's own assets); and the
Keras 2 configs in ``keras_metadata.pb``, walked like an ``.h5``'s
(:mod:`actswap.safety.configs`).

Invariants: the tree is walked with ``lstat`` and no symlink is followed out
of the directory; a special file, or a file behind a bad link, is never
opened; nothing is written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .configs import parse_json, walk_config
from .graph_ops import asset_reads, check_graph
from .pbfiles import read_message
from .report import DAMAGED, ERROR, MAX_FILES, STRUCTURE, ScanReport


def scan_savedmodel(root: Path, report: ScanReport) -> None:
    """Scan the SavedModel directory ``root``: its tree, its graphs, its Keras metadata."""
    bad = _scan_tree(root, report)
    pb, text = root / "saved_model.pb", False
    if not pb.is_file() or "saved_model.pb" in bad:
        pb, text = root / "saved_model.pbtxt", True
    if pb.name in bad:
        return
    saved = read_message("SavedModel", pb, report, text)
    if saved is None:
        return
    if not saved.meta_graphs:
        report.add(ERROR, DAMAGED, pb.name, f"{pb.name} holds no meta graph")
    for i, mg in enumerate(saved.meta_graphs):
        label = f"meta graph {i} ({', '.join(mg.meta_info_def.tags) or 'no tags'})" if len(saved.meta_graphs) > 1 else ""
        check_graph(
            mg.graph_def, report, label,
            saver=mg.saver_def if mg.HasField("saver_def") else None,
            signatures=[e.value for e in mg.signature_def],
            collections=[v for e in mg.collection_def for v in e.value.node_list.value],
            restored={e.key for e in mg.object_graph_def.concrete_functions},
            asset_reads=asset_reads(mg, root / "assets"),
        )
    meta = root / "keras_metadata.pb"
    if meta.is_file() and "keras_metadata.pb" not in bad:
        _scan_keras_metadata(meta, report)


def _scan_tree(root: Path, report: ScanReport) -> set[str]:
    """Special files and symlinks that leave ``root``; return the relative paths not to read."""
    bad: set[str] = set()
    real_root = os.path.realpath(root)
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            count += 1
            if count > MAX_FILES:
                report.add(ERROR, STRUCTURE, str(root), f"'{root}' holds more than {MAX_FILES} files")
                return bad
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(full)
                if target != real_root and not target.startswith(real_root + os.sep):
                    report.add(ERROR, STRUCTURE, rel, f"symlink '{rel}' leads out of the SavedModel directory (to '{target}')")
                    bad.add(rel)
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    report.add(ERROR, DAMAGED, rel, f"symlink '{rel}' is broken")
                    bad.add(rel)
                    continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                report.add(ERROR, STRUCTURE, rel, f"'{rel}' is not a regular file or directory (a FIFO, device or socket)")
                bad.add(rel)
    report.checked.append(f"directory: {count} entries, no special files or symlinks out")
    return bad


def _scan_keras_metadata(path: Path, report: ScanReport) -> None:
    meta = read_message("SavedMetadata", path, report)
    if meta is None:
        return
    n = 0
    for node in meta.nodes:
        if not node.metadata:
            continue
        config = parse_json(node.metadata, f"{path.name} node '{node.node_path}'", report)
        if config is None:
            continue
        # A layer node is walked as the one layer of a model, so its findings
        # name it ('evil', not '<model>'); tf_keras revives each from its own node.
        n += walk_config(config if node.node_path == "root" else {"layers": [config]}, report, legacy=True)
    report.checked.append(f"{path.name}: {len(meta.nodes)} nodes, {n} objects checked against the Keras allow-list")
