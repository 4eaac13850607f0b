"""Write one benchmark's section of docs/benchmarks.md without touching the others.

Each benchmark script owns the text between ``<!-- begin NAME -->`` and
``<!-- end NAME -->``; a missing section is appended. The replacement is
written atomically (temp file + rename), so an interrupted run never leaves a
half-written page.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section below is written by the script it names; rerun that script to refresh it.\n"


def write_section(name: str, text: str, doc: Path = DOC) -> Path:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(current):
        new = pattern.sub(lambda _: block, current)
    else:
        new = current.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".benchmarks.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, doc)
    return doc
