"""Local files written whole or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any


def write_atomic(path: str, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """Writes `path` through `write(file)` under a temporary name, flushes it to disk, then renames.

    Readers and resumed builds see either no file or the whole file, never a prefix.
    """
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb" if binary else "w") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
