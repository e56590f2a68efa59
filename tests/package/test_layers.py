"""The package's import graph flows one way, and modules use each other only through public names.

Layers, lowest first (a module may import its own layer and lower ones, never a higher one, not
even lazily inside a function):

0. leaves: datasets (``lopt_hf.data``), plots, load-option policy, tensor layouts, LR-schedule wording
   (``lr_schedules``), warning location (``warning_location``)
1. ``lopt_hf.rules`` — update rules, math only
2. ``lopt_hf.kernels`` — deployment executions of the rules (stacked, chunked, fused)
3. the optimizer: ``optim``, ``harness``, ``lookahead``, ``adamw``
4. the artifact: validation, model card, ``hub`` (config/model classes, push), Auto-class registration,
   shipped optimizers, ``load_lopt``, ``convert`` (the authors' checkpoints, which ``hub`` loads directly)
5. integrations: ``lopt_hf.trainer`` (transformers)
6. ``lopt_hf.metatrain`` and ``lopt_hf.evaluation``: siblings, neither imports the other
7. on top: ``lopt_hf.publish`` (export + evaluated card), ``cli``, ``bench``, and the entry point
   ``lopt_hf.metatrain.__main__`` (``python -m lopt_hf.metatrain`` runs the publish-layer command)
8. ``lopt_hf`` itself: the public facade, imported by nothing inside the package
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lopt_hf"
SCRIPTS = PACKAGE.parent / "scripts"
TESTS = PACKAGE.parent / "tests"

LAYERS: dict[str, int] = {
    "lopt_hf.data": 0, "lopt_hf.loader_options": 0, "lopt_hf.layout": 0, "lopt_hf.plotting": 0,
    "lopt_hf.lr_schedules": 0, "lopt_hf.warning_location": 0,
    "lopt_hf.rules": 1,
    "lopt_hf.kernels": 2,
    "lopt_hf.optim": 3, "lopt_hf.harness": 3, "lopt_hf.lookahead": 3, "lopt_hf.adamw": 3,
    "lopt_hf.artifact_validation": 4, "lopt_hf.model_card": 4, "lopt_hf.hub": 4, "lopt_hf.pretrained": 4,
    "lopt_hf.load": 4, "lopt_hf.auto_registration": 4, "lopt_hf.convert": 4,
    "lopt_hf.trainer": 5,
    "lopt_hf.metatrain": 6, "lopt_hf.evaluation": 6,
    "lopt_hf.publish": 7, "lopt_hf.cli": 7, "lopt_hf.bench": 7, "lopt_hf.metatrain.__main__": 7,
    "lopt_hf": 8,
}
SIBLINGS = [{"lopt_hf.metatrain", "lopt_hf.evaluation"}]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    """The entry of LAYERS a module belongs to (longest matching prefix)."""
    candidates = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    assert candidates, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(candidates, key=len)


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every lopt_hf import in a file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "lopt_hf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lopt_hf":
                continue
            names = [alias.name for alias in node.names]
            # `from .pkg import submodule` imports the submodule itself
            submodules = [f"{target}.{name}" for name in names
                          if (PACKAGE.parent / Path(*f"{target}.{name}".split("."))).with_suffix(".py").exists()
                          or (PACKAGE.parent / Path(*f"{target}.{name}".split("."))).is_dir()]
            found += [(node.lineno, sub, []) for sub in submodules]
            rest = [name for name in names if f"{target}.{name}" not in submodules]
            if rest or not submodules:
                found.append((node.lineno, target, rest))
    return found


def package_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in package_files():
        component(module_name(path))


def test_imports_flow_one_way() -> None:
    problems = []
    for path in package_files():
        this = module_name(path)
        here = component(this)
        for line, target, _ in imported_modules(path):
            there = component(target)
            if there == here:
                continue
            if LAYERS[there] > LAYERS[here]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {this} (layer {LAYERS[here]}) imports "
                                f"{target} (layer {LAYERS[there]})")
            elif any({here, there} == pair for pair in SIBLINGS):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {this} imports its sibling {target}")
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def private_definitions(tree: ast.AST) -> set[str]:
    """Names of the private functions, methods and classes a module defines."""
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.name.startswith("_") and not node.name.startswith("__")}


PRIVATE_DEFINITIONS = set().union(*(private_definitions(ast.parse(path.read_text())) for path in PACKAGE.rglob("*.py")))


def test_no_private_names_across_modules() -> None:
    """``from .x import _helper`` (or ``x._helper``) from another module means the helper is really public."""
    problems = []
    for path in package_files():
        this = module_name(path)
        tree = ast.parse(path.read_text())
        imported_aliases = {}
        for line, target, names in imported_modules(path):
            if target == this:
                continue
            problems += [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}.{name}"
                         for name in names if name.startswith("_") and not name.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    imported_aliases[alias.asname or alias.name.split(".")[-1]] = alias.name
        own = private_definitions(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            on_module = (isinstance(node.value, ast.Name) and node.value.id in imported_aliases
                         and "lopt_hf" in imported_aliases[node.value.id])
            defined_elsewhere = node.attr in PRIVATE_DEFINITIONS and node.attr not in own
            if on_module or (not on_self and defined_elsewhere):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: uses {ast.unparse(node)}")
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_every_script_is_run_by_a_test() -> None:
    """Each scripts/*.py is started by some test (with its smallest settings), so none can rot unnoticed."""
    test_text = "\n".join(path.read_text() for path in TESTS.rglob("test_*.py") if path.resolve() != Path(__file__))
    missing = [script.name for script in sorted(SCRIPTS.glob("*.py")) if script.name not in test_text]
    assert not missing, f"scripts no test runs: {missing}"
