"""Register the artifact classes with transformers' ``AutoConfig`` / ``AutoModel`` when, and only when, it is used.

transformers has no way to register a model type by module name, and importing
``LearnedOptimizerModel`` costs seconds (``transformers.modeling_utils``). So ``import lopt_hf``
does not import it; instead :func:`install_auto_registration` watches for transformers' auto
classes: the moment ``transformers.models.auto.configuration_auto`` or ``...modeling_auto`` has
been imported (by ``from transformers import AutoModel``, ``Trainer``, ...) and that import has
finished, :mod:`lopt_hf.hub` is imported, which registers ``learned_optimizer``. A program that never touches the auto classes
never pays for it; ``import lopt_hf; AutoModel.from_pretrained(folder)`` works as it always did.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# transformers modules whose import means the auto classes are about to be used.
AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


def register_now() -> None:
    """Import :mod:`lopt_hf.hub`, which registers the artifact classes (idempotent)."""
    _RegistrationHook.done = True
    from . import hub  # noqa: F401  (registers at import; costs seconds, hence only here)


def install_auto_registration() -> None:
    """Register now if transformers' auto classes are already imported, else as soon as they are."""
    if _RegistrationHook.done or any(name in sys.modules for name in AUTO_MODULES):
        register_now()
    elif not any(isinstance(finder, _RegistrationHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistrationHook())


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """A meta-path finder that follows transformers' imports and registers once an auto module is in.

    Registration waits until no transformers module is still executing (the outermost import has
    finished): ``modeling_auto`` imports ``configuration_auto`` half-way, and :mod:`lopt_hf.hub`
    needs both complete.
    """

    done = False

    def __init__(self) -> None:
        self.executing = 0  # transformers modules whose code is running right now (nested imports)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if _RegistrationHook.done or fullname.partition(".")[0] != "transformers":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _TrackingLoader(spec.loader, self)
        return spec

    def module_executed(self) -> None:
        """Called after each transformers module ran: register once the outermost one is done."""
        if self.executing or _RegistrationHook.done or not any(name in sys.modules for name in AUTO_MODULES):
            return
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register_now()


class _TrackingLoader(importlib.abc.Loader):
    """Delegates to transformers' own loader and tells the hook when a module has finished executing."""

    def __init__(self, loader: Any, hook: _RegistrationHook) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.hook.executing += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.hook.executing -= 1
        self.hook.module_executed()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)
