"""Update rules: pure torch functions ``init_theta`` / ``init_state`` / ``update``.

Importing this package registers every built-in rule.
"""

from .base import (RuleConfigError, State, Theta, UpdateRule, available_rules, build_rule, register_rule,
                   rule_class)
from . import mlp_lopt, per_param_mlp, small_fc_lopt  # noqa: F401  (registers the rules)
from . import celo2  # noqa: F401  (registers the rule)
from . import opt2vec  # noqa: F401  (registers the rule)
from . import celo  # noqa: F401  (registers celo, celo_adam)
from . import velo  # noqa: F401  (registers the rule)

__all__ = ["RuleConfigError", "State", "Theta", "UpdateRule", "available_rules", "build_rule", "register_rule",
           "rule_class"]
