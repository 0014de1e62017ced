"""Fixtures shared by several test modules."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the test session, its xdist workers and the subprocesses
# tests start (the end-to-end runs compile the same smoke models again and again). Only compiles of
# over a second are kept (JAX's default), keyed by the program, the compile options and the jax
# version, so it changes what is compiled, never what runs. Set before any test imports jax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"vlm_jax_tests_xla_cache_{getpass.getuser()}"))


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


# The modules of the longest end-to-end runs (measured: the smoke experiments), longest first.
LONGEST_FIRST = ("test_grain_experiment", "test_recap", "test_rar_experiment", "test_notebooks", "test_reco_experiment",
                 "test_trainer")


def pytest_collection_modifyitems(config, items):
    """Slow (end-to-end) tests first, the longest modules' first of all, in file order otherwise: with
    pytest-xdist the long runs start at once on every worker instead of one of them ending the
    session alone."""
    del config

    def order(item):
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        rank = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
        return (item.get_closest_marker("slow") is None, rank)

    items.sort(key=order)
