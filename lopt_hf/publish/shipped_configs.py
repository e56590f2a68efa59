"""The meta-training configs shipped inside the package (``lopt_hf/configs/``), found by name.

``lopt-hf metatrain --config NAME`` takes either a path to a YAML file or the name of a shipped
config: its file stem relative to ``lopt_hf/configs/`` (``quickstart``, ``celo``,
``pretrained/small_fc_lolo``), so meta-training works from an installed wheel, without a checkout.
``lopt-hf metatrain --list-configs`` lists them. In a checkout the top-level ``configs/`` folder is a
link to the same files, so ``--config configs/quickstart.yaml`` names the same config; outside a
checkout that spelling also finds the shipped file (when no such local file exists).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

__all__ = ["CONFIG_ROOT", "shipped_configs", "resolve_config", "describe_shipped_configs"]

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
SUFFIX = ".yaml"
CHECKOUT_PREFIX = "configs/"


def shipped_configs() -> dict[str, Path]:
    """Name → file of every shipped config, sorted by name (top-level ones first)."""
    files = sorted(CONFIG_ROOT.rglob(f"*{SUFFIX}"), key=lambda path: (len(path.relative_to(CONFIG_ROOT).parts),
                                                                       str(path)))
    return {path.relative_to(CONFIG_ROOT).with_suffix("").as_posix(): path for path in files}


def config_summary(path: Path, width: int = 100) -> str:
    """The first paragraph of a config file's header comment (what it is), cut to ``width`` characters."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and words):
            break
        words += text.split()
    summary = " ".join(words)
    return summary if len(summary) <= width else summary[:width - 1].rsplit(" ", 1)[0] + " …"


def describe_shipped_configs() -> str:
    """One line per shipped config: its name and the first line of its header comment."""
    configs = shipped_configs()
    width = max(map(len, configs), default=0)
    return "\n".join(f"{name:<{width}}  {config_summary(path)}".rstrip() for name, path in configs.items())


def resolve_config(spec: str | os.PathLike[str]) -> Path:
    """The config file ``spec`` names: an existing file, else a shipped config by name.

    A shipped name may be given with or without ``.yaml`` and with the checkout's ``configs/`` prefix.
    Raises :class:`lopt_hf.metatrain.config.ConfigError` naming the shipped configs when neither matches.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    configs = shipped_configs()
    name = Path(spec).as_posix()
    for candidate in (name, name.removeprefix(CHECKOUT_PREFIX)):
        candidate = candidate.removesuffix(SUFFIX)
        if candidate in configs:
            return configs[candidate]
    from ..metatrain.config import ConfigError

    if path.is_dir():
        problem = f"{spec} is a folder, not a config file"
    else:
        problem = f"no config file {spec}, and no shipped config of that name"
    close = difflib.get_close_matches(name.removeprefix(CHECKOUT_PREFIX).removesuffix(SUFFIX), list(configs), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--config: {problem}{hint} Shipped configs: {', '.join(configs)} (`--list-configs` describes "
                      f"them); or give the path of a YAML file")
