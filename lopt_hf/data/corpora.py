"""Texts for character-level language models that every Python installation has (no download).

Meta-training (``task.corpus`` of a ``char_lm`` family) and the evaluation's validation suite
(``docs_lm``) read them by name; none of them is the text of the held-out ``tiny_lm`` evaluation task,
so meta-training on them does not leak into it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BUILTIN_CORPORA", "builtin_corpus"]


def _python_docs() -> str:
    from pydoc_data.topics import topics  # the standard library's help() texts (PSF licence)

    return "\n".join(topics[name] for name in sorted(topics))


BUILTIN_CORPORA: dict[str, Callable[[], str]] = {"python_docs": _python_docs}
"""Built-in texts by ``corpus`` name. ``python_docs``: the ≈ 465,000 characters of ``help()`` topics in
``pydoc_data`` (English prose and code)."""


def builtin_corpus(name: str) -> str:
    """The text of the built-in corpus ``name`` (:data:`BUILTIN_CORPORA`)."""
    try:
        return BUILTIN_CORPORA[name]()
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(BUILTIN_CORPORA)}") from None
