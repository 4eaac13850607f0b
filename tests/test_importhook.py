"""actswap.importhook: the post-import hook that registers actswap's Keras
objects (tested on throwaway modules, in fresh processes so that sys.meta_path
and sys.modules start clean)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _run(tmp_path: Path, code: str) -> str:
    (tmp_path / "late.py").write_text("import sys\nsys.modules[__name__].ready = True\n")
    (tmp_path / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_hook_runs_once_after_the_module_has_executed(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        import sys
        from actswap.importhook import after_import
        seen = []
        NAME = "late"
        after_import(NAME, lambda m: seen.append(getattr(m, "ready", False)))
        assert seen == []
        import late
        import late, importlib
        print(seen, sum(getattr(f, "name", None) == NAME for f in sys.meta_path))
    """)
    assert out == "[True] 0"  # ran once, on the complete module; the finder is gone


def test_hook_runs_at_once_for_an_imported_module(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        import late
        from actswap.importhook import after_import
        seen = []
        after_import("late", lambda m: seen.append(m.__name__))
        print(seen)
    """)
    assert out == "['late']"


def test_a_failed_import_runs_nothing_and_leaves_no_finder(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        import sys
        from actswap.importhook import after_import
        seen = []
        NAME = "broken"
        after_import(NAME, seen.append)
        try:
            import broken
        except ImportError as e:
            print(e, seen, sum(getattr(f, "name", None) == NAME for f in sys.meta_path))
    """)
    assert out == "broken on purpose [] 0"


def test_help_imports_neither_numpy_nor_the_formats() -> None:
    # What keeps `actswap --help` within +0.2 s of `python -c pass` (issue 26;
    # the time itself is measured in benchmarks/run.py, not asserted here).
    code = ("import sys, runpy; sys.argv = ['actswap', '--help']\n"
            "try:\n    runpy.run_module('actswap.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'wrapt', 'actswap.formats', 'actswap.pipeline', 'tensorflow') "
            "if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_a_find_spec_probe_before_the_import_does_not_use_the_hook_up(tmp_path: Path) -> None:
    # TensorFlow's module_util calls importlib.util.find_spec("keras") while TF
    # imports, before keras is imported: the hook must still run on the import.
    out = _run(tmp_path, """
        import importlib.util, sys
        from actswap.importhook import after_import
        seen = []
        after_import("late", lambda m: seen.append(getattr(m, "ready", False)))
        assert importlib.util.find_spec("late") is not None and seen == []
        import late
        print(seen, sum(getattr(f, "name", None) == "late" for f in sys.meta_path))
    """)
    assert out == "[True] 0"


def test_actswap_layers_are_registered_when_tensorflow_is_imported_before_keras(tmp_path: Path) -> None:
    # As the CLI imports them: TensorFlow first, which imports keras itself.
    out = _run(tmp_path, """
        import actswap, tensorflow, keras
        from keras.saving import get_registered_object
        print([get_registered_object(f"actswap>{n}") is not None
               for n in ("Square", "PolyLayerNormalization", "PolySoftmax", "Blend")])
    """)
    assert out.splitlines()[-1] == "[True, True, True, True]"
