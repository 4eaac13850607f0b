"""Post-import hooks: run a function once a given module has been imported.

actswap registers its Keras objects the moment Keras is imported, whichever of
the two the user imports first. This is what ``wrapt.register_post_import_hook``
does; it is written here with the standard library because importing wrapt
costs ~30 ms (it pulls in ``importlib.metadata``), 15% of the time
``actswap --help`` may take beyond Python's own start (issue 26).

Invariants: the hook runs once, after the module has executed completely (never
on a partly initialised module); if the module is already imported, it runs
at once; an import that fails runs nothing; a find_spec() probe that imports
nothing does not use the hook up (TensorFlow probes for keras as it imports);
the finder never changes which module is found, only wraps its loader's
``exec_module``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


class _After(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, hook: Callable[[Any], None]) -> None:
        self.name, self.hook, self.done = name, hook, False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or self.done:
            return None
        # Out of the way while the real spec is found by the other finders (no
        # recursion), and back afterwards: a find_spec() that only probes (as
        # TensorFlow's module_util does for "keras" while TF imports) executes
        # nothing, and the import that follows must still be seen.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, finder = spec.loader, self
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            try:
                execute(module)
            finally:  # executed or failed: either way this finder's work is over
                first, finder.done = not finder.done, True
                if finder in sys.meta_path:
                    sys.meta_path.remove(finder)
            if first:
                finder.hook(module)

        loader.exec_module = exec_module  # this spec's loader object only
        return spec


def after_import(name: str, hook: Callable[[Any], None]) -> None:
    """Call ``hook(module)`` once top-level module ``name`` has been imported (now,
    if it already is)."""
    if name in sys.modules:
        hook(sys.modules[name])
    else:
        sys.meta_path.insert(0, _After(name, hook))
