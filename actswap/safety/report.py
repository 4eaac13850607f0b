"""What a scan reports: findings, their severities and kinds, and the limits.

Every container scanner in :mod:`actswap.safety` writes into one
:class:`ScanReport`; nothing here reads a file. The limits live together here
so that what bounds the scan's memory and time can be audited in one place:
they, not the file's own declarations, decide how much is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR, WARNING = "error", "warning"
CODE, STRUCTURE, DAMAGED, NUMERICS = "code", "structure", "damaged", "numerics"

# Limits. Real Keras models are far below each; a file above one is refused
# rather than read.
MAX_CONFIG_BYTES = 64 * 1024 * 1024  # a JSON config or metadata
MAX_JSON_DEPTH = 256  # nesting of a JSON config (Python's json recursion is ~1000)
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_TOTAL_BYTES = 64 * 1024**3  # declared uncompressed size of a whole archive
MAX_EXPANSION = 100  # uncompressed / compressed size of one member...
EXPANSION_FLOOR = 1024 * 1024  # ...once it declares more than this
MAX_COMPRESSED_H5_BYTES = 512 * 1024 * 1024  # a compressed weights member is read into memory
MAX_PB_BYTES = 2 * 1024**3 - 1  # protobuf's own limit
MAX_FILES = 100_000  # entries in a SavedModel directory
MAX_H5_LINKS = 1_000_000
MAX_LISTED = 50  # findings kept per file; the rest are counted


@dataclass(frozen=True)
class Finding:
    """One thing the scan found. ``message`` is a full sentence naming the place."""

    severity: str  # ERROR (the file is refused) or WARNING
    kind: str  # CODE (--trust-code lets it through), STRUCTURE or DAMAGED (never), NUMERICS
    where: str  # the place in the file: a layer path and config path, an op, a member
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "where": self.where, "message": self.message}


@dataclass
class ScanReport:
    """What :func:`actswap.scan.scan` found in one file; ``checked`` says what was looked at."""

    path: str
    format: str
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_listed: int = 0  # findings beyond MAX_LISTED, counted only

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: str, kind: str, where: str, message: str) -> None:
        finding = Finding(severity, kind, where, message)
        if finding in self.findings:
            return
        if len(self.findings) >= MAX_LISTED:
            self.not_listed += 1
            return
        self.findings.append(finding)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "not_listed": self.not_listed,
            "findings": [f.to_dict() for f in self.findings],
            "checked": list(self.checked),
        }


def refusal_message(path: str, refused: list[Finding], not_listed: int = 0) -> str:
    """The one-line message for a refused file: the first finding, how many more, what to do."""
    extra = len(refused) - 1 + not_listed
    more = f" (and {extra} more; 'actswap scan {path}' lists them)" if extra else ""
    if all(f.kind == CODE for f in refused):
        advice = "pass --trust-code only if you trust its author"
    else:
        advice = "actswap will not load it (--trust-code does not override this)"
    return f"refusing to load '{path}': {refused[0].message}{more}; {advice}"


def refuse(report: ScanReport, trust_code: bool = False) -> ScanReport:
    """Raise for the report's errors, else return it. With ``trust_code`` (the
    CLI's loudly-warned ``--trust-code``) findings of kind ``code`` are let
    through (left in the report for the caller to warn about); damaged content
    is a :class:`LoadError`, anything else an :class:`UnsafeModelError` (exit 2)."""
    from ..errors import LoadError, UnsafeModelError

    refused = [f for f in report.errors if not (trust_code and f.kind == CODE)]
    if refused and all(f.kind == DAMAGED for f in refused):
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise LoadError(f"cannot read '{report.path}': {refused[0].message}{more}; the file is damaged, save or copy it again")
    if refused:
        raise UnsafeModelError(refusal_message(report.path, refused, report.not_listed))
    return report
