"""Imported first by the fresh-process children that check a converted model
stands on its own: from then on, importing actswap fails in that process."""

import importlib.abc
import sys


class _NoActswap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "actswap":
            raise ImportError("actswap is deliberately unavailable in this process")
        return None


sys.meta_path.insert(0, _NoActswap())
