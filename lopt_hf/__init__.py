"""lopt_hf: learned optimizers for PyTorch, shared like models on the Hugging Face Hub.

Public API: ``load_lopt`` (artifact → ``torch.optim.Optimizer``), ``LearnedOptimizer``, the
artifact classes ``LearnedOptimizerConfig`` / ``LearnedOptimizerModel`` (registered with
``AutoConfig`` / ``AutoModel`` on import), ``create_artifact`` / ``load_artifact``, the rule
registry (``build_rule``, ``available_rules``) and the ``transformers.Trainer`` integration
(``trainer_optimizer``, ``LearnedOptimizerCallback``).
"""

__version__ = "0.1.0"

from .rules import UpdateRule, available_rules, build_rule  # noqa: E402
from .optim import LearnedOptimizer  # noqa: E402

# Importing hub registers LearnedOptimizerConfig / LearnedOptimizerModel with AutoConfig / AutoModel.
from .hub import (FORMAT_VERSION, ArtifactError, LearnedOptimizerConfig, LearnedOptimizerModel,  # noqa: E402
                  create_artifact, load_artifact)
from .load import load_lopt  # noqa: E402
from .lookahead import Lookahead  # noqa: E402
from .trainer import LearnedOptimizerCallback, trainer_optimizer  # noqa: E402

__all__ = ["__version__", "ArtifactError", "FORMAT_VERSION", "LearnedOptimizer", "LearnedOptimizerCallback",
           "LearnedOptimizerConfig", "LearnedOptimizerModel", "Lookahead", "UpdateRule", "available_rules", "build_rule",
           "create_artifact", "load_artifact", "load_lopt", "trainer_optimizer"]
