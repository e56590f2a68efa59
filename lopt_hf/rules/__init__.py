"""Update rules: pure torch functions ``init_theta`` / ``init_state`` / ``update``.

Importing this package registers every built-in rule.
"""

from .base import (RuleConfigError, State, Theta, UpdateRule, available_rules, build_rule, register_rule,
                   rule_class)
from . import per_param_mlp  # noqa: F401  (registers the rule)

__all__ = ["RuleConfigError", "State", "Theta", "UpdateRule", "available_rules", "build_rule", "register_rule",
           "rule_class"]
