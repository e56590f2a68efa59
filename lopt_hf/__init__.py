"""lopt_hf: learned optimizers for PyTorch, shared like models on the Hugging Face Hub."""

from .rules import UpdateRule, available_rules, build_rule

__version__ = "0.1.0"

__all__ = ["UpdateRule", "available_rules", "build_rule", "__version__"]
