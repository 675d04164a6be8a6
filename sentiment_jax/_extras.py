"""Optional dependencies: every feature outside the core imports through `require`, so a missing
one is a single line naming the extra that brings it (the extras are listed in pyproject.toml)."""

from __future__ import annotations

import importlib
import sys
import types


class MissingExtra(ImportError):
    """An optional feature was used without its extra; the message is the command that fixes it."""


def require(module: str, extra: str, *, program: bool = False) -> types.ModuleType:
    """`import module`, or MissingExtra naming `pip install 'sentiment_jax[extra]'`.

    `program=True` (pass `__name__ == "__main__"` from a module-level import of a `python -m`
    entry point) prints that line and exits with status 2, as the other command-line errors do.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        error = MissingExtra(f"{module} is not installed; it comes with the '{extra}' extra: "
                             f"pip install 'sentiment_jax[{extra}]'", name=e.name)
    if program:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    raise error
