"""Deferred imports: dependencies of our dependencies that qtool's own code never calls.

onnx-ir imports sympy (about 0.3 s, a third of ``qtool convert``'s start-up) for
arithmetic on symbolic dimensions, which qtool does not do; ``defer`` puts a stand-in
module in ``sys.modules`` that becomes the real one the first time any attribute of it
is used, so code that does use it (onnx-ir's shape arithmetic, or the caller's own
``import sympy``) still gets the real module, only later. Nothing is deferred when the
module is already imported or cannot be found.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

_LOCK = threading.RLock()


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then loads it."""

    def __getattr__(self, attr: str):  # only called for attributes the stand-in lacks
        with _LOCK:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
                try:
                    real = importlib.import_module(self.__name__)
                except BaseException:
                    sys.modules[self.__name__] = self
                    raise
                self.__dict__.update(real.__dict__)  # holders of the stand-in see it all
        return getattr(sys.modules[self.__name__], attr)


def defer(name: str, package: str | None = None) -> bool:
    """Defer importing module ``name`` (a submodule of ``package``, found without importing
    that package). Returns whether a stand-in was installed."""
    if name in sys.modules:
        return False
    try:
        if package is None:
            spec = importlib.util.find_spec(name)
        else:
            parent = importlib.util.find_spec(package)
            if package in sys.modules or parent is None or not parent.submodule_search_locations:
                return False
            spec = importlib.machinery.PathFinder.find_spec(name, list(parent.submodule_search_locations))
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in
    return True


def defer_unused() -> None:
    """sympy, and onnx-ir's parser of symbolic-dimension expressions that reads sympy's
    attributes when imported."""
    if defer("sympy"):
        defer("onnx_ir._symbolic_shapes", "onnx_ir")
