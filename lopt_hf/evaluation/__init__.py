"""Evaluate optimizers — built-in baselines and learned-optimizer artifacts — on small training tasks.

```python
from lopt_hf.evaluation import markdown_table, run_evaluation, write_report

results = run_evaluation(["digits_mlp", "tiny_lm"], ["adamw", "adamw-grid", "./my-lopt"], steps=200, seeds=[0, 1])
paths = write_report(results, "eval_out")     # results.json, curves.png, results.md
print(markdown_table(results))                 # for a model card
```

The same from the shell: ``lopt-hf eval --optimizers adamw adamw-grid ./my-lopt --tasks digits_mlp tiny_lm``.
Tasks are in :data:`TASKS` (:mod:`.tasks`), optimizer specs are described in :mod:`.optimizers`.
"""

from ..data import DatasetUnavailableError
from .optimizers import ADAMW_GRID, OptimizerSpec, OptimizerSpecError, parse_optimizer_spec
from .report import compact_results, markdown_table, merge_reports, plot_curves, smooth, write_report
from .runner import DEFAULT_OPTIMIZERS, DEFAULT_SEEDS, DEFAULT_STEPS, run_evaluation
from .tasks import DEFAULT_TASKS, HELDOUT_TASKS, TASKS, VALIDATION_TASKS, UnknownTaskError, resolve_tasks

__all__ = ["ADAMW_GRID", "DEFAULT_OPTIMIZERS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "DEFAULT_TASKS", "HELDOUT_TASKS",
           "DatasetUnavailableError", "OptimizerSpec", "OptimizerSpecError", "TASKS", "UnknownTaskError",
           "VALIDATION_TASKS", "compact_results", "markdown_table", "merge_reports", "parse_optimizer_spec", "smooth",
           "plot_curves", "resolve_tasks", "run_evaluation", "write_report"]
