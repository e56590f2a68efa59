"""``import lopt_hf`` and ``lopt-hf --help`` start fast; the lazy API and the deferred Auto* registration still work.

Timings are compared with ``import torch`` measured in the same run (minimum of three each), so a
slow or busy machine slows both sides alike.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import lopt_hf

BIN = Path(sys.executable).parent
SHIPPED_FOLDER = Path(lopt_hf.__file__).parent / "pretrained" / "small-fc-lolo"


def fastest_seconds(command: list[str], repeats: int = 3) -> float:
    """The shortest wall time of ``repeats`` runs of ``command`` (each must succeed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        best = min(best, time.perf_counter() - start)
    return best


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_and_help_add_under_a_second_over_torch() -> None:
    torch_seconds = fastest_seconds([sys.executable, "-c", "import torch"])
    lopt_seconds = fastest_seconds([sys.executable, "-c", "import torch, lopt_hf"])
    help_seconds = fastest_seconds([str(BIN / "lopt-hf"), "--help"])
    assert lopt_seconds < torch_seconds + 1.0, (lopt_seconds, torch_seconds)
    assert help_seconds < torch_seconds + 1.0, (help_seconds, torch_seconds)


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
