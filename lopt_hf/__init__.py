"""lopt_hf: learned optimizers for PyTorch, shared like models on the Hugging Face Hub.

Public API: ``load_lopt`` (artifact → ``torch.optim.Optimizer``), ``LearnedOptimizer``, the
artifact classes ``LearnedOptimizerConfig`` / ``LearnedOptimizerModel`` (registered with
``AutoConfig`` / ``AutoModel``), ``create_artifact`` / ``load_artifact``, the rule registry
(``build_rule``, ``available_rules``) and the ``transformers.Trainer`` integration
(``trainer_optimizer``, ``LearnedOptimizerCallback``).

``import lopt_hf`` is cheap: every public name is imported from its module on first use
(PEP 562), so a command-line call or an Accelerate worker that only needs a rule does not pay
for transformers. The ``AutoConfig`` / ``AutoModel`` registration is deferred the same way: it
happens as soon as transformers' auto classes are imported (:mod:`lopt_hf.auto_registration`),
so ``import lopt_hf; AutoModel.from_pretrained(folder)`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .auto_registration import install_auto_registration

__version__ = "0.1.0"

# Public name → module (relative to this package) that defines it.
_PUBLIC_API: dict[str, str] = {
    "UpdateRule": ".rules", "available_rules": ".rules", "build_rule": ".rules",
    "LearnedOptimizer": ".optim",
    "FORMAT_VERSION": ".hub", "ArtifactError": ".hub", "LearnedOptimizerConfig": ".hub",
    "LearnedOptimizerModel": ".hub", "create_artifact": ".hub", "load_artifact": ".hub",
    "load_lopt": ".load",
    "Lookahead": ".lookahead",
    "LearnedOptimizerCallback": ".trainer", "trainer_optimizer": ".trainer",
}

__all__ = ["__version__", *sorted(_PUBLIC_API)]

if TYPE_CHECKING:  # what static type checkers and IDEs see
    from .hub import (FORMAT_VERSION, ArtifactError, LearnedOptimizerConfig, LearnedOptimizerModel,
                      create_artifact, load_artifact)
    from .load import load_lopt
    from .lookahead import Lookahead
    from .optim import LearnedOptimizer
    from .rules import UpdateRule, available_rules, build_rule
    from .trainer import LearnedOptimizerCallback, trainer_optimizer


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and cache the value here."""
    module = _PUBLIC_API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


install_auto_registration()
