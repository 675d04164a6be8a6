"""Atomic file writes: through a temporary file beside the target and a rename, so a stopped or
failed writer never leaves a torn file for a reader (a resumed run, a server, a cache lookup).

A leaf module (no project imports), so the run folder, the caches and the figures share it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator


@contextlib.contextmanager
def atomic_path(file: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary path beside `file` (unique per process: processes sharing a folder write alike),
    renamed onto `file` when the block ends and removed if it raises."""
    file = pathlib.Path(file)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(file: str | pathlib.Path, content: str | bytes) -> None:
    with atomic_path(file) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
