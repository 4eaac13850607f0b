"""Frozen GraphDefs (``.pb``): every op checked as in a SavedModel, with no saver.

Invariants: the file is read below protobuf's size limit and parsed as data
(:mod:`actswap.safety.pbfiles`); nothing is run or written.
"""

from __future__ import annotations

from pathlib import Path

from .graph_ops import check_graph
from .names import misnamed
from .pbfiles import read_message
from .report import ScanReport


def scan_graphdef(p: Path, report: ScanReport) -> None:
    """Scan the frozen GraphDef ``p``: its name, then every op."""
    # A GraphDef named like a Keras file would be handed to a Keras loader.
    if p.name.endswith((".keras", ".h5", ".hdf5")):
        misnamed(p, "a frozen GraphDef", ".pb", report)
    graph = read_message("GraphDef", p, report)
    if graph is not None:
        check_graph(graph, report, "", saver=None, signatures=[], collections=[], restored=set())
