"""``import lopt_hf`` and ``lopt-hf --help`` start fast; the lazy API and the deferred Auto* registration still work.

Start-up costs are compared with ``import torch`` measured in the same run: the CPU time (user + system)
of each child process — the work an import does, which other processes competing for the cores (``make
test`` runs two pytest workers) do not inflate the way they inflate wall time —, runs interleaved, the
minimum of five each.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

import lopt_hf

BIN = Path(sys.executable).parent
SHIPPED_FOLDER = Path(lopt_hf.__file__).parent / "pretrained" / "small-fc-lolo"


def child_cpu_seconds(command: list[str]) -> float:
    """User + system CPU seconds of one run of ``command`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def least_cpu_seconds(commands: dict[str, list[str]], repeats: int = 5) -> dict[str, float]:
    """The least CPU time of each command over ``repeats`` rounds that run every command once, interleaved
    (so a burst of load hits all of them alike)."""
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(repeats):
        for name, command in commands.items():
            best[name] = min(best[name], child_cpu_seconds(command))
    return best


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_and_help_add_under_a_second_over_torch() -> None:
    seconds = least_cpu_seconds({"torch": [sys.executable, "-c", "import torch"],
                                 "lopt_hf": [sys.executable, "-c", "import torch, lopt_hf"],
                                 "help": [str(BIN / "lopt-hf"), "--help"]})
    assert seconds["lopt_hf"] < seconds["torch"] + 1.0, seconds
    assert seconds["help"] < seconds["torch"] + 1.0, seconds


def test_import_loads_neither_torch_nor_transformers() -> None:
    result = python("import sys, lopt_hf; print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') "
                    "if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names_resolve_lazily_and_are_listed() -> None:
    assert "__version__" in lopt_hf.__all__
    for name in lopt_hf.__all__:
        assert getattr(lopt_hf, name) is not None
        assert name in dir(lopt_hf)
    from lopt_hf import LearnedOptimizerModel, load_lopt  # noqa: F401  (the `from lopt_hf import X` form)
    with pytest.raises(AttributeError, match="no_such_name"):
        lopt_hf.no_such_name  # noqa: B018


@pytest.mark.slow
@pytest.mark.parametrize("code", [
    # the usual order: lopt_hf first, then the auto classes
    f"import lopt_hf\nfrom transformers import AutoModel\nprint(type(AutoModel.from_pretrained({str(SHIPPED_FOLDER)!r})).__name__)",
    f"import lopt_hf\nfrom transformers import AutoConfig\nprint(type(AutoConfig.from_pretrained({str(SHIPPED_FOLDER)!r})).__name__)",
    # transformers imported first, its auto classes only after lopt_hf
    f"import transformers, lopt_hf\nprint(type(transformers.AutoModel.from_pretrained({str(SHIPPED_FOLDER)!r})).__name__)",
    # the auto classes already imported before lopt_hf
    f"from transformers import AutoModel\nimport lopt_hf\nprint(type(AutoModel.from_pretrained({str(SHIPPED_FOLDER)!r})).__name__)",
], ids=["lopt_hf-then-AutoModel", "lopt_hf-then-AutoConfig", "transformers-lopt_hf-AutoModel", "AutoModel-then-lopt_hf"])
def test_auto_classes_know_learned_optimizers_after_import_lopt_hf(code: str) -> None:
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("LearnedOptimizerModel", "LearnedOptimizerConfig")


@pytest.mark.slow
def test_transformers_without_auto_classes_does_not_load_the_artifact_module() -> None:
    result = python("import sys, lopt_hf\nfrom transformers import PretrainedConfig\nprint('lopt_hf.hub' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
