"""lopt_hf: learned optimizers for PyTorch, shared like models on the Hugging Face Hub."""

from .rules import UpdateRule, available_rules, build_rule

__version__ = "0.1.0"

# Importing hub registers LearnedOptimizerConfig / LearnedOptimizerModel with AutoConfig / AutoModel.
from .hub import (FORMAT_VERSION, ArtifactError, LearnedOptimizerConfig, LearnedOptimizerModel,  # noqa: E402
                  create_artifact, load_artifact)

__all__ = ["UpdateRule", "available_rules", "build_rule", "__version__", "ArtifactError", "FORMAT_VERSION",
           "LearnedOptimizerConfig", "LearnedOptimizerModel", "create_artifact", "load_artifact"]
