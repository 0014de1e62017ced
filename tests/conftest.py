"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _unwritable(path: Path) -> Path:
    """A directory this process cannot write: mode 0o500, or, where that has no effect (root), a
    regular file in place of the directory."""
    path.mkdir(parents=True)
    os.chmod(path, 0o500)
    if os.access(path, os.W_OK):
        os.chmod(path, 0o700)
        path.rmdir()
        path.write_text("not a directory\n")
    return path


@pytest.fixture
def unwritable():
    """unwritable(path) -> path, made a directory this process cannot write into."""
    return _unwritable
