"""Pre-load safety scan: read a model file as data and refuse what would run code.

A model file is untrusted input: TensorFlow's security policy treats models as
programs, Keras safe mode has had bypasses, ``tf_keras`` runs Lambda bytecode
even with ``safe_mode=True``, and a SavedModel can write files while it is
being *loaded*. So before any loader sees a file, :func:`scan` reads it the way
an archive tool or a protobuf parser would, and reports what it finds:

* every format: the path must be a regular file or a directory (a FIFO named
  ``x.keras`` would block a loader forever; a symlink to ``/dev/zero`` would
  feed it forever), and its name must agree with its content, because Keras
  picks its loader from the name: a disagreement would load something other
  than what was scanned;
* ``.keras``: zip member names (no ``..``, absolute paths or duplicates),
  declared sizes, expansion ratios and overlapping members (zip bombs), real
  sizes and CRCs, then ``config.json`` walked at every depth against an
  allow-list of Keras classes and functions (:mod:`actswap.allowlists`), and
  the embedded ``model.weights.h5`` checked like an ``.h5``;
* ``.h5``/``.hdf5``: external links, external storage and virtual datasets
  (each makes HDF5 read another file), then ``model_config`` and
  ``training_config`` walked like ``config.json``;
* SavedModel directories: special files and symlinks that leave the
  directory; ``saved_model.pb`` parsed with protobuf (:mod:`actswap.tfproto`)
  and every op of every graph and function checked against an allow-list of
  TensorFlow ops that only compute on tensors; checkpoint ops only where the
  saver uses them; ``keras_metadata.pb`` walked like a Keras 2 config;
* frozen GraphDefs: every op, as for a SavedModel (no saver).

Each :class:`Finding` has a severity (``error`` refuses the file, ``warning``
informs) and a kind: ``code`` (the file asks to run or import code: what
``--trust-code`` lets through), ``structure`` (the container itself is
hostile: bombs, escaping paths, links to other files; never let through),
``damaged`` (it cannot be parsed: truncated, corrupt; never let through) or
``numerics`` (a warning about precision).

Invariants: nothing here imports TensorFlow or Keras, executes anything from
the file, follows a symlink out of a SavedModel, opens a special file, or
writes anything. Memory and time are bounded by the limits below, not by the
file's declarations.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import allowlists
from .errors import LoadError, UnsafeModelError, first_line
from .formats import _HDF5_OFFSETS, HDF5_MAGIC, Format, detect
from .zipmember import stored_member

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

# Classes whose config carries code, or that load something that does.
CODE_CLASSES = {
    "Lambda": "carries code that would run on load",
    "__lambda__": "carries code that would run on load",
    "TFSMLayer": "carries code that would run on load: it loads a SavedModel whose ops run",
    "TorchModuleWrapper": "carries code that would run on load (a pickled torch module)",
    "JaxLayer": "carries code that would run on load (a JAX function)",
    "FlaxLayer": "carries code that would run on load (a Flax module)",
}
# Keras's own serialization markers: plain data.
DATA_MARKERS = frozenset({
    "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__",
    "__tuple__", "__passive_serialization__",
})
TRUSTED_PACKAGES = ("actswap", "actswap_legacy")  # registered names "actswap>Square"
LOOKUP_LAYERS = frozenset({"StringLookup", "IntegerLookup", "TextVectorization"})
LOW_PRECISION = frozenset({"float16", "bfloat16", "mixed_float16", "mixed_bfloat16", "half"})

# tf_keras TFOpLambda layers name a TensorFlow symbol; these touch files,
# processes or Python.
_TF_OP_DENIED_ROOTS = frozenset({
    "io", "compat", "raw_ops", "summary", "debugging", "saved_model", "data",
    "distribute", "lookup", "config", "experimental", "autograph", "sysconfig",
    "train", "tpu", "profiler", "__internal__", "__operators__.getattr",
})
_TF_OP_DENIED_NAMES = frozenset({
    "print", "py_function", "numpy_function", "load_op_library", "load_library",
    "function", "init_scope", "Module", "Variable", "write_file", "read_file",
})

CHECKPOINT_READ_OPS = frozenset({"RestoreV2", "Restore", "RestoreSlice"})
CHECKPOINT_WRITE_OPS = frozenset({"SaveV2", "Save", "SaveSlices", "MergeV2Checkpoints"})
_OP_REASONS = {
    "ReadFile": "reads a file", "WriteFile": "writes a file", "MatchingFiles": "lists files on disk",
    "PyFunc": "runs Python code", "PyFuncStateless": "runs Python code", "EagerPyFunc": "runs Python code",
    "Print": "prints", "PrintV2": "prints", "ImmutableConst": "maps a file into memory",
    "Abort": "aborts the process", "InitializeTableFromTextFile": "reads a file",
    "InitializeTableFromTextFileV2": "reads a file", "RemoteCall": "runs a function on another task",
    "DecodeProtoV2": "can read a descriptor file", "EncodeProto": "can read a descriptor file",
    "LoadAndRemapMatrix": "reads a checkpoint file", "RecordInput": "reads files",
}
_OP_REASON_PATTERNS = (
    (r"Dataset|Iterator", "reads data (a tf.data op)"),
    (r"Summary|SummaryWriter", "writes summaries"),
    (r"Reader", "reads files"),
    (r"^(Save|Restore|MergeV2Checkpoints)", "reads or writes checkpoint files outside the saver"),
    (r"^(Send|Recv|_Send|_Recv)|Collective|Nccl|Rpc", "talks to other processes"),
    (r"^Debug", "writes debug dumps"),
)


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
    """What :func:`scan` found in one file; ``checked`` says what was looked at."""

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


# --- entry points ---------------------------------------------------------------


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Scan the model at ``path`` without loading it; return every finding.

    Raises :class:`~actswap.errors.UserError` (exit 2) only when the path is not
    a model at all (missing, special file, unrecognised content), as
    :func:`actswap.formats.detect` does; everything else is a finding.
    """
    p = Path(path)
    fmt = detect(p)
    report = ScanReport(str(p), fmt.value)
    _check_name(p, fmt, report)
    if fmt is Format.KERAS:
        _scan_keras(p, report)
    elif fmt is Format.H5:
        _scan_h5_file(p, report)
    elif fmt is Format.SAVEDMODEL:
        _scan_savedmodel(p, report)
    else:
        _scan_graphdef(p, report)
    return report


def check(path: str | os.PathLike[str], *, trust_code: bool = False) -> ScanReport:
    """Scan, and refuse (:class:`UnsafeModelError`, exit 2) a file with an error.

    With ``trust_code`` (the CLI's loudly-warned ``--trust-code``), findings of
    kind ``code`` are let through (returned in the report, for the caller to
    warn about); ``structure`` findings never are.
    """
    report = scan(path)
    refused = [f for f in report.errors if not (trust_code and f.kind == CODE)]
    if refused and all(f.kind == DAMAGED for f in refused):
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise LoadError(f"cannot read '{report.path}': {refused[0].message}{more}; the file is damaged, save or copy it again")
    if refused:
        raise UnsafeModelError(refusal_message(report.path, refused, report.not_listed))
    return report


def refusal_message(path: str, refused: list[Finding], not_listed: int = 0) -> str:
    """The one-line message for a refused file: the first finding, how many more, what to do."""
    extra = len(refused) - 1 + not_listed
    more = f" (and {extra} more; 'actswap scan {path}' lists them)" if extra else ""
    if all(f.kind == CODE for f in refused):
        advice = "pass --trust-code only if you trust its author"
    else:
        advice = "actswap will not load it (--trust-code does not override this)"
    return f"refusing to load '{path}': {refused[0].message}{more}; {advice}"


# --- names and containers ---------------------------------------------------------


def _check_name(p: Path, fmt: Format, report: ScanReport) -> None:
    # Keras and tf_keras choose their loader from the file name (".keras" -> zip,
    # ".h5"/".hdf5" -> HDF5), so the name must say what the content is.
    name = p.name
    if fmt is Format.KERAS and not name.endswith(".keras"):
        what, fix = "a Keras 3 zip archive", f"{_stem(p)}.keras"
    elif fmt is Format.H5 and not name.endswith((".h5", ".hdf5")):
        what, fix = "an HDF5 file", f"{_stem(p)}.h5"
    elif fmt is Format.GRAPHDEF and name.endswith((".keras", ".h5", ".hdf5")):
        what, fix = "a frozen GraphDef", f"{_stem(p)}.pb"
    else:
        what = ""
    if what:
        report.add(
            ERROR, STRUCTURE, name,
            f"'{name}' holds {what} but its name says otherwise; loaders pick their reader from "
            f"the name, so what would be loaded is not what was scanned; rename it to {fix}",
        )
    if fmt in (Format.KERAS, Format.H5):
        # A file that is both a zip and an HDF5 file reads differently to each tool.
        try:
            with open(p, "rb") as f:
                heads = []
                for off in _HDF5_OFFSETS:
                    f.seek(off)
                    heads.append(f.read(8))
            both = any(h == HDF5_MAGIC for h in heads) and zipfile.is_zipfile(p)
        except OSError:
            both = False
        if both:
            report.add(
                ERROR, STRUCTURE, name,
                f"'{name}' is both a zip archive and an HDF5 file (a polyglot); tools would "
                "disagree about what it contains",
            )


def _stem(p: Path) -> str:
    return p.name[: -len(p.suffix)] if p.suffix else p.name


def _unsafe_member_name(name: str) -> str | None:
    parts = re.split(r"[/\\]", name)
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in parts:
        return "contains '..'"
    return None


def _scan_keras(p: Path, report: ScanReport) -> None:
    try:
        z = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        report.add(ERROR, DAMAGED, p.name, f"'{p.name}' is a damaged zip archive ({e})")
        return
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            report.add(ERROR, STRUCTURE, p.name, f"the archive has {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
            return
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            why = _unsafe_member_name(name)
            if why:
                report.add(ERROR, STRUCTURE, name, f"zip member '{name}' {why}: extracting it would write outside the archive's folder")
            if name in seen:
                report.add(ERROR, STRUCTURE, name, f"zip member '{name}' appears twice; tools disagree about which one counts")
            seen.add(name)
            if info.flag_bits & 0x1:
                report.add(ERROR, STRUCTURE, name, f"zip member '{name}' is encrypted")
            if info.file_size > EXPANSION_FLOOR and info.file_size > MAX_EXPANSION * max(1, info.compress_size):
                report.add(
                    ERROR, STRUCTURE, name,
                    f"zip member '{name}' declares {info.file_size} bytes from {info.compress_size} "
                    f"compressed (more than {MAX_EXPANSION}x): a zip bomb",
                )
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_TOTAL_BYTES:
            report.add(ERROR, STRUCTURE, p.name, f"the archive declares {total} bytes uncompressed, more than {MAX_ZIP_TOTAL_BYTES}: a zip bomb")
        # Members whose data overlap are how non-recursive zip bombs expand.
        ordered = sorted(infos, key=lambda i: i.header_offset)
        for a, b in zip(ordered, ordered[1:]):
            if b.header_offset < a.header_offset + 30 + len(a.orig_filename.encode()) + a.compress_size:
                report.add(ERROR, STRUCTURE, b.filename, f"zip members '{a.filename}' and '{b.filename}' overlap: a zip bomb")
                break
        if report.errors:
            return
        for info in infos:  # real sizes and CRCs, with memory bounded by the chunk size
            n = 0
            try:
                with z.open(info) as f:
                    while chunk := f.read(1 << 20):
                        n += len(chunk)
                        if n > info.file_size:
                            break
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
                report.add(ERROR, DAMAGED, info.filename, f"zip member '{info.filename}' is damaged ({e}); the file is probably truncated")
                continue
            if n != info.file_size:
                report.add(ERROR, DAMAGED, info.filename, f"zip member '{info.filename}' holds {n} bytes but declares {info.file_size}")
        report.checked.append(f"zip: {len(infos)} members, {total} bytes, sizes and CRCs verified")
        if report.errors:
            return
        if "config.json" not in seen:
            report.add(ERROR, DAMAGED, p.name, "the archive has no config.json (not a Keras model)")
            return
        config = _json(z.read("config.json"), "config.json", report)
        if config is not None:
            n = _walk_config(config, report, allowlists.KERAS_CLASSES, legacy=False)
            report.checked.append(f"config.json: {n} objects checked against the Keras allow-list")
        if "metadata.json" in seen:
            _json(z.read("metadata.json"), "metadata.json", report)
        for info in infos:
            if info.filename.endswith(".h5"):
                _scan_embedded_h5(p, z, info, report)


def _scan_embedded_h5(p: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, report: ScanReport) -> None:
    label = info.filename
    if info.compress_type == zipfile.ZIP_STORED:
        with open(p, "rb") as raw:
            member = stored_member(raw.fileno(), info)
            if member is None:
                report.add(ERROR, DAMAGED, label, f"zip member '{label}' has a damaged local header")
                return
            _scan_h5_links(member, label, report)
    elif info.file_size <= MAX_COMPRESSED_H5_BYTES:
        _scan_h5_links(io.BytesIO(z.read(info)), label, report)
    else:
        report.add(
            ERROR, STRUCTURE, label,
            f"zip member '{label}' is a compressed HDF5 file of {info.file_size} bytes, too large to check "
            "(Keras itself stores it uncompressed)",
        )


def _scan_h5_links(source: Any, label: str, report: ScanReport) -> dict[str, Any]:
    """Refuse HDF5 external links, external storage and virtual datasets; return the root attributes."""
    import h5py  # light: no TensorFlow

    attrs: dict[str, Any] = {}
    try:
        with h5py.File(source, "r") as f:
            count = 0

            def visit(name: str, link: Any) -> Any:
                nonlocal count
                count += 1
                if count > MAX_H5_LINKS:
                    report.add(ERROR, STRUCTURE, label, f"'{label}' has more than {MAX_H5_LINKS} HDF5 objects")
                    return True  # stop
                where = f"{label}:/{name}"
                if isinstance(link, h5py.ExternalLink):
                    report.add(
                        ERROR, STRUCTURE, where,
                        f"HDF5 external link '{where}' -> '{link.filename}:{link.path}' would make the "
                        "loader read another file",
                    )
                elif isinstance(link, h5py.HardLink):
                    obj = f.get(name)
                    if isinstance(obj, h5py.Dataset):
                        if obj.is_virtual:
                            report.add(ERROR, STRUCTURE, where, f"HDF5 virtual dataset '{where}' maps data from other files")
                        if obj.external:
                            report.add(
                                ERROR, STRUCTURE, where,
                                f"HDF5 dataset '{where}' keeps its data in external file(s) "
                                f"{sorted({str(e[0]) for e in obj.external})}",
                            )
                return None

            f.visititems_links(visit)
            for key in ("model_config", "training_config"):
                if key in f.attrs:
                    attrs[key] = f.attrs[key]
            report.checked.append(f"{label}: {count} HDF5 links checked (no external links, storage or virtual datasets)")
    except OSError as e:
        report.add(ERROR, DAMAGED, label, f"'{label}' is a damaged HDF5 file ({first_line(e)})")
    return attrs


def _scan_h5_file(p: Path, report: ScanReport) -> None:
    attrs = _scan_h5_links(str(p), p.name, report)
    if report.errors:
        return
    if "model_config" not in attrs:
        report.add(ERROR, DAMAGED, p.name, f"'{p.name}' has no model_config (a weights-only HDF5 file?)")
        return
    for key in ("model_config", "training_config"):
        if key in attrs:
            config = _json(attrs[key], key, report)
            if config is not None:
                n = _walk_config(config, report, allowlists.KERAS_CLASSES | allowlists.TF_KERAS_CLASSES, legacy=True)
                report.checked.append(f"{key}: {n} objects checked against the Keras allow-list")


# --- JSON configs -----------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _json(raw: Any, what: str, report: ScanReport) -> Any:
    """Parse a JSON config as data (bounded size and depth); None after a finding."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_CONFIG_BYTES:
            report.add(ERROR, STRUCTURE, what, f"{what} is {len(raw)} bytes, more than the {MAX_CONFIG_BYTES} actswap reads")
            return None
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add(ERROR, DAMAGED, what, f"{what} is not UTF-8 text ({e})")
            return None
    if not isinstance(raw, str):
        report.add(ERROR, DAMAGED, what, f"{what} is not text")
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        report.add(ERROR, STRUCTURE, what, f"{what} is {len(raw)} characters, more than the {MAX_CONFIG_BYTES} actswap reads")
        return None
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        report.add(ERROR, STRUCTURE, what, f"{what} is nested {depth} levels deep, more than the {MAX_JSON_DEPTH} actswap reads")
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        report.add(ERROR, DAMAGED, what, f"{what} is not valid JSON ({first_line(e)})")
        return None
    if not isinstance(value, dict):
        report.add(ERROR, DAMAGED, what, f"{what} is not a JSON object")
        return None
    return value


@dataclass
class _Walk:
    report: ScanReport
    classes: frozenset[str]
    legacy: bool
    objects: int = 0
    low_precision: tuple[str, str, str] | None = None  # (dtype, where, place)


def _walk_config(config: dict[str, Any], report: ScanReport, classes: frozenset[str], legacy: bool) -> int:
    """Check every serialized object in ``config``; return how many were checked."""
    ctx = _Walk(report, classes, legacy)
    _walk(config, "", (), True, ctx)
    if ctx.low_precision:
        dtype, where, place = ctx.low_precision
        report.add(
            WARNING, NUMERICS, where,
            f"the model computes in {dtype} (first at {place}): x² overflows float16 once |x| > 255 "
            "(65504 is its largest value) and loses precision in bfloat16; convert a float32 copy, "
            "or calibrate and check output_max",
        )
    return ctx.objects


def _walk(node: Any, ptr: str, names: tuple[str, ...], root: bool, ctx: _Walk) -> None:
    # ``names``: the layer path from the model down, without the model's own
    # name, as in actswap's site reports; ``ptr``: where in the JSON.
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{ptr}[{i}]", names, False, ctx)
        return
    if not isinstance(node, dict):
        return
    cfg = node.get("config")
    if "class_name" in node and isinstance(cfg, dict) and isinstance(cfg.get("name"), str) and not root:
        names = names + (cfg["name"],)
    where = "/".join(names) or "<model>"
    place = f"'{where}' ({ptr or 'the top level'})"
    if "class_name" in node:
        ctx.objects += 1
        if not _check_object(node, place, where, ctx):
            return
    elif ctx.legacy:
        _check_legacy_value(node, place, where, ctx)
    _note_precision(node, where, place, ctx)
    for key, value in node.items():
        _walk(value, f"{ptr}.{key}" if ptr else key, names, False, ctx)


def _keras_module(module: str, legacy: bool) -> bool:
    roots = ("keras", "tf_keras") if legacy else ("keras",)
    return module.split(".")[0] in roots


def _trusted_registered(name: Any) -> bool:
    return isinstance(name, str) and name.split(">")[0] in TRUSTED_PACKAGES and ">" in name


def _check_object(node: dict[str, Any], place: str, where: str, ctx: _Walk) -> bool:
    """Check one serialized object; False when what is below it need not be read."""
    add = ctx.report.add
    cls, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    if not isinstance(cls, str):
        add(ERROR, CODE, where, f"an object at {place} has a class_name that is not a string")
        return False
    if cls in CODE_CLASSES:
        add(ERROR, CODE, where, f"{cls} at {place} {CODE_CLASSES[cls]}")
        return False
    if cls in DATA_MARKERS:
        return True
    if cls == "__typespec__":
        if not (isinstance(module, str) and module.split(".")[0] in ("tensorflow", "keras")):
            add(ERROR, CODE, where, f"a type spec from module '{module}' at {place} is outside TensorFlow and would be imported on load")
        return False
    if cls == "function":
        fn = node.get("config")
        if _trusted_registered(registered):
            return False
        if isinstance(module, str) and (module == "builtins" or _keras_module(module, ctx.legacy)):
            if fn not in allowlists.KERAS_FUNCTIONS:
                add(ERROR, CODE, where, f"function '{fn}' (module '{module}') at {place} is not a Keras activation, loss, metric or op")
        else:
            add(ERROR, CODE, where, f"function '{fn}' from module '{module}' at {place} is outside Keras and would be imported on load")
        return False
    if isinstance(registered, str) and ">" in registered:
        if _trusted_registered(registered):
            return True
        add(
            ERROR, CODE, where,
            f"custom class '{registered}' (module '{module}') at {place} is the file author's code, "
            "not a Keras class; actswap cannot load it",
        )
        return False
    if ">" in cls and cls not in ctx.classes:  # Keras 2 writes registered names as class_name
        if _trusted_registered(cls):
            return True
        add(ERROR, CODE, where, f"custom class '{cls}' at {place} is the file author's code, not a Keras class; actswap cannot load it")
        return False
    if module is not None and not (isinstance(module, str) and _keras_module(module, ctx.legacy)):
        add(ERROR, CODE, where, f"'{cls}' from module '{module}' at {place} is outside Keras and would be imported on load")
        return False
    if cls not in ctx.classes:
        add(ERROR, CODE, where, f"unknown class '{cls}' at {place}: not a Keras layer or object actswap knows")
        return False
    cfg = node.get("config")
    if cls in LOOKUP_LAYERS and isinstance(cfg, dict) and isinstance(cfg.get("vocabulary"), str):
        add(ERROR, CODE, where, f"{cls} at {place} reads the file '{cfg['vocabulary']}' when it is loaded")
    if ctx.legacy and cls in ("TFOpLambda", "SlicingOpLambda") and isinstance(cfg, dict):
        symbol = cfg.get("function")
        if not isinstance(symbol, str) or _tf_op_denied(symbol):
            add(ERROR, CODE, where, f"{cls} at {place} calls tf.{symbol}, which can touch files or run code")
    return True


def _check_legacy_value(node: dict[str, Any], place: str, where: str, ctx: _Walk) -> None:
    # Keras 2 configs serialize functions without a class_name.
    if "function_type" in node:
        ctx.report.add(ERROR, CODE, where, f"a function ({node.get('function_type')}) at {place} carries code that would run on load")
    module = node.get("module")
    if isinstance(module, str) and not _keras_module(module, True) and module.split(".")[0] not in TRUSTED_PACKAGES:
        ctx.report.add(ERROR, CODE, where, f"module '{module}' at {place} is outside Keras and would be imported on load")


def _note_precision(node: dict[str, Any], where: str, place: str, ctx: _Walk) -> None:
    if ctx.low_precision:
        return
    dtype = node.get("dtype")
    name = None
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, dict) and isinstance(dtype.get("config"), dict):
        name = dtype["config"].get("name")
    if isinstance(name, str) and name in LOW_PRECISION:
        ctx.low_precision = (name, where, place)


def _tf_op_denied(symbol: str) -> bool:
    parts = symbol.split(".")
    return (
        parts[0] in _TF_OP_DENIED_ROOTS
        or ".".join(parts[:2]) in _TF_OP_DENIED_ROOTS
        or parts[-1] in _TF_OP_DENIED_NAMES
    )


# --- SavedModels and GraphDefs ----------------------------------------------------


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


def _read_pb(path: Path, what: str, report: ScanReport) -> bytes | None:
    try:
        size = path.stat().st_size
        if size > MAX_PB_BYTES:
            report.add(ERROR, STRUCTURE, what, f"{what} is {size} bytes, more than protobuf can hold")
            return None
        return path.read_bytes()
    except OSError as e:
        report.add(ERROR, DAMAGED, what, f"cannot read {what} ({e.strerror or e})")
        return None


def _parse(name: str, data: bytes, what: str, report: ScanReport, text: bool = False) -> Any:
    from google.protobuf import message as pb_message
    from google.protobuf import text_format

    from . import tfproto

    msg = tfproto.message(name)
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), msg, allow_unknown_field=True)
        else:
            msg.ParseFromString(data)
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError, ValueError, RuntimeError) as e:
        report.add(ERROR, DAMAGED, what, f"{what} is not a valid {name} protobuf ({first_line(e)})")
        return None
    return msg


def _scan_savedmodel(root: Path, report: ScanReport) -> None:
    bad = _scan_tree(root, report)
    pb, text = root / "saved_model.pb", False
    if not pb.is_file() or "saved_model.pb" in bad:
        pb, text = root / "saved_model.pbtxt", True
    if pb.name in bad:
        return
    data = _read_pb(pb, pb.name, report)
    if data is None:
        return
    saved = _parse("SavedModel", data, pb.name, report, text)
    if saved is None:
        return
    if not saved.meta_graphs:
        report.add(ERROR, DAMAGED, pb.name, f"{pb.name} holds no meta graph")
    for i, mg in enumerate(saved.meta_graphs):
        label = f"meta graph {i} ({', '.join(mg.meta_info_def.tags) or 'no tags'})" if len(saved.meta_graphs) > 1 else ""
        _check_graph(
            mg.graph_def, report, label,
            saver=mg.saver_def if mg.HasField("saver_def") else None,
            signatures=[e.value for e in mg.signature_def],
            collections=[v for e in mg.collection_def for v in e.value.node_list.value],
            restored={e.key for e in mg.object_graph_def.concrete_functions},
        )
    meta = root / "keras_metadata.pb"
    if meta.is_file() and "keras_metadata.pb" not in bad:
        _scan_keras_metadata(meta, report)


def _scan_keras_metadata(path: Path, report: ScanReport) -> None:
    data = _read_pb(path, path.name, report)
    if data is None:
        return
    meta = _parse("SavedMetadata", data, path.name, report)
    if meta is None:
        return
    classes = allowlists.KERAS_CLASSES | allowlists.TF_KERAS_CLASSES
    n = 0
    for node in meta.nodes:
        if not node.metadata:
            continue
        config = _json(node.metadata, f"{path.name} node '{node.node_path}'", report)
        if config is None:
            continue
        # A layer node is walked as the one layer of a model, so its findings
        # name it ('evil', not '<model>'); tf_keras revives each from its own node.
        n += _walk_config(config if node.node_path == "root" else {"layers": [config]}, report, classes, legacy=True)
    report.checked.append(f"{path.name}: {len(meta.nodes)} nodes, {n} objects checked against the Keras allow-list")


def _scan_graphdef(p: Path, report: ScanReport) -> None:
    data = _read_pb(p, p.name, report)
    if data is None:
        return
    graph = _parse("GraphDef", data, p.name, report)
    if graph is not None:
        _check_graph(graph, report, "", saver=None, signatures=[], collections=[], restored=set())


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _ancestors(nodes: dict[str, Any], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(n for n in (_node_name(i) for i in nodes[name].input) if n in nodes and n not in seen)
    return seen


def _closure(calls: dict[str, set[str]], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in calls:
            continue
        seen.add(name)
        stack.extend(calls[name] - seen)
    return seen


def _op_reason(op: str) -> str:
    if op in _OP_REASONS:
        return _OP_REASONS[op]
    for pattern, reason in _OP_REASON_PATTERNS:
        if re.search(pattern, op):
            return reason
    return "not an op actswap knows to only compute on tensors (a custom op, or one that reaches outside the model)"


def _check_graph(
    graph: Any, report: ScanReport, label: str, *, saver: Any, signatures: list[Any],
    collections: list[str], restored: set[str],
) -> None:
    """Check every op of ``graph`` and its function library against the allow-list.

    Checkpoint ops are what a SavedModel's saver uses to read and write its
    variables; they are accepted only in the saver's own nodes and functions
    (which ``tf.saved_model.load`` runs only to restore variables from the file
    name it chooses), never where a signature, an initializer or a restored
    function could reach them, and only reading ones on the restore path.
    """
    lib = {f.signature.name: f for f in graph.library.function}
    in_label = f" in {label}" if label else ""

    def refs(node: Any) -> set[str]:
        out = {node.op} if node.op in lib else set()
        for entry in node.attr:
            value = entry.value
            if value.func.name:
                out.add(value.func.name)
            out.update(f.name for f in value.list.func if f.name)
        return out

    calls = {name: set().union(*(refs(n) for n in f.node_def)) for name, f in lib.items()}
    nodes = {n.name: n for n in graph.node}
    saver_roots = {_node_name(t) for t in (saver.save_tensor_name, saver.restore_op_name)} - {""} if saver else set()
    other_roots = {_node_name(t.value.name) for s in signatures for t in list(s.inputs) + list(s.outputs)}
    other_roots |= {_node_name(c) for c in collections}
    saver_only = _ancestors(nodes, saver_roots) - _ancestors(nodes, other_roots)
    restore_nodes = _ancestors(nodes, {_node_name(saver.restore_op_name)}) if saver else set()
    node_refs = {name: refs(n) for name, n in nodes.items()}
    gradient_fns = {g.gradient_func for g in graph.library.gradient} | {
        g.gradient_func for g in graph.library.registered_gradients
    }
    fn_other = _closure(
        calls,
        restored | gradient_fns | {f for name, r in node_refs.items() if name not in saver_only for f in r},
    )
    # Functions nothing calls are treated as reachable: nothing vouches for them.
    fn_other |= {name for name in lib if not any(name in c for c in calls.values())
                 and not any(name in r for r in node_refs.values())}
    fn_restore = _closure(calls, {f for name in restore_nodes for f in node_refs[name]})

    problems: dict[str, list[str]] = {}

    def check(op: str, place: str, saver_place: bool, restore_place: bool, called: set[str]) -> None:
        if op in lib:
            pass
        elif op in CHECKPOINT_READ_OPS or op in CHECKPOINT_WRITE_OPS:
            if not saver_place or (restore_place and op in CHECKPOINT_WRITE_OPS):
                problems.setdefault(op, []).append(place)
        elif op not in allowlists.TF_OPS:
            problems.setdefault(op, []).append(place)
        for fn in called:
            if fn not in lib and fn not in allowlists.TF_OPS:
                report.add(ERROR, DAMAGED, place, f"{place}{in_label} calls function '{fn}', which the file does not define")

    count = 0
    for name, node in nodes.items():
        count += 1
        check(node.op, f"graph node '{name}'", name in saver_only, name in restore_nodes, node_refs[name] - {node.op})
    for fname, f in lib.items():
        for node in f.node_def:
            count += 1
            check(node.op, f"function '{fname}', node '{node.name}'", fname not in fn_other,
                  fname in fn_restore, refs(node) - {node.op})
    for op, places in sorted(problems.items()):
        more = f" and {len(places) - 1} more place(s)" if len(places) > 1 else ""
        report.add(ERROR, CODE, places[0], f"op {op} ({_op_reason(op)}) at {places[0]}{in_label}{more}")
    report.checked.append(
        f"graph{in_label}: {count} ops in {len(nodes)} nodes and {len(lib)} functions checked against "
        "the TensorFlow op allow-list"
    )
    _note_graph_precision(graph, report, in_label)


def _note_graph_precision(graph: Any, report: ScanReport, in_label: str) -> None:
    from .catalog import is_converted_tf_op
    from .tfproto import DT_BFLOAT16, DT_HALF

    names = {DT_HALF: "float16", DT_BFLOAT16: "bfloat16"}
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    for node in nodes:
        if not is_converted_tf_op(node.op):  # the ops a conversion turns into x² (the catalog's)
            continue
        for entry in node.attr:
            if entry.key == "T" and entry.value.type in names:
                name = names[entry.value.type]
                report.add(
                    WARNING, NUMERICS, node.name,
                    f"{node.op} '{node.name}'{in_label} computes in {name}: x² overflows float16 once "
                    "|x| > 255 (65504 is its largest value)",
                )
                return


# --- compatibility with callers of the first scan ------------------------------------


def read_config(path: Path, fmt: Format) -> dict[str, Any]:
    """The model config stored in a ``.keras``/``.h5`` file, parsed as JSON only."""
    report = ScanReport(str(path), fmt.value)
    if fmt is Format.KERAS:
        with zipfile.ZipFile(path) as z:
            config = _json(z.read("config.json"), "config.json", report)
    else:
        import h5py

        with h5py.File(path, "r") as f:
            config = _json(f.attrs["model_config"], "model_config", report)
    if config is None:
        from .errors import LoadError

        raise LoadError(f"'{path}': {report.errors[0].message}")
    return config


def find_unsafe(config: dict[str, Any], legacy: bool = False) -> list[str]:
    """The error messages for ``config`` (a parsed model config), one per entry."""
    report = ScanReport("<config>", "config")
    classes = allowlists.KERAS_CLASSES | (allowlists.TF_KERAS_CLASSES if legacy else frozenset())
    _walk_config(config, report, classes, legacy)
    return [f.message for f in report.errors]
