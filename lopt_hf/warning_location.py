"""Where a warning raised deep inside library code should point: the user's own line.

A warning about Trainer settings is raised from a callback or from ``optimizer.step()``, several
frames below the user's ``trainer.train()`` inside transformers, Accelerate and torch; Python's
``stacklevel`` counts frames, and their number varies between versions, so the level is found by
walking the stack instead.
"""

from __future__ import annotations

import os
import sys

__all__ = ["LIBRARY_PACKAGES", "stacklevel_outside_libraries"]

# Frames inside these packages are skipped: the warning points at the first one outside them.
LIBRARY_PACKAGES = ("lopt_hf", "transformers", "accelerate", "torch")


def stacklevel_outside_libraries() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the caller of this function that attributes the warning
    to the first calling frame outside :data:`LIBRARY_PACKAGES` — the user's ``trainer.train()`` line, not
    transformers' callback dispatch or training loop (2, the caller's caller, if every frame is library code)."""
    prefixes = tuple(os.path.dirname(module.__file__) + os.sep for name in LIBRARY_PACKAGES
                     if (module := sys.modules.get(name)) is not None and getattr(module, "__file__", None))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2
