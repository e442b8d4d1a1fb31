"""Old import paths keep working: the flat modules of release 0.1 and lazy package exports.

Release 0.1 had every module on one floor (``opacus_dmaudit.scoring``, ``opacus_dmaudit.report``,
...). They now live in wings along the data flow; :data:`MOVED` maps each old module to its new
home, and :func:`install` lets ``import opacus_dmaudit.scoring`` (and pickles or ``torch.load``
of objects saved under the old paths) find it, with a ``DeprecationWarning`` naming the new path.
:func:`lazy_exports` gives a package names that import their module only when first used, so
that ``import opacus_dmaudit`` loads no heavy library.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Mapping

__all__ = ["MOVED", "install", "lazy_exports"]

_PACKAGE = __name__.rpartition(".")[0]

#: Old module (relative to the package) -> its new home.
MOVED: dict[str, str] = {
    "imprint": "capture.imprint",
    "shadow": "capture.shadow",
    "mechanism": "checks.mechanism",
    "readout": "reconstruct.readout",
    "prior": "reconstruct.prior",
    "classical": "reconstruct.classical",
    "scoring": "score.scoring",
    "metrics": "score.metrics",
    "lpips_weights": "score.lpips_weights",
    "identification": "score.identification",
    "baseline": "score.baseline",
    "prior_fit": "checks.prior_fit",
    "bounds": "privacy.bounds",
    "empirical": "privacy.empirical",
    "canaries": "privacy.canaries",
    "logdir": "sinks.logdir",
    "audit_log": "sinks.audit_log",
    "tensorboard": "sinks.tensorboard",
    "summary": "sinks.summary",
    "report": "sinks.report",
    "data": "assets.data",
    "prior_training": "assets.training",
}


class _ForwardingModule(types.ModuleType):
    """An old module path: every attribute is read from the module that replaced it."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name)
        self.__dict__["_target"] = target

    def _module(self) -> types.ModuleType:
        return importlib.import_module(self.__dict__["_target"])

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._module())


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix = _PACKAGE + "."
        if fullname.startswith(prefix) and fullname[len(prefix) :] in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name[len(_PACKAGE) + 1 :]
        new = f"{_PACKAGE}.{MOVED[old]}"
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path will go)",
            DeprecationWarning,
            stacklevel=3,
        )
        return _ForwardingModule(spec.name, new)

    def exec_module(self, module) -> None:
        return None


def install() -> None:
    """Let the old module paths of :data:`MOVED` resolve (once per interpreter)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())


def lazy_exports(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose ``names`` live in submodules.

    Args:
        package: the package's ``__name__``.
        names: exported name -> module relative to ``package`` (``"scoring"``).
    """

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
