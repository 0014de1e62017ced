"""The errors a run ends with, and the exit code each one gives at the entry point (`vlm_jax.main`).

    0  done
    1  a bug: anything not below (the traceback is printed)
    2  a user error (`UserError`): a config field, a path, a file or the data is wrong; one line says
       what and how to fix it (`--verbosity=debug` or VLM_JAX_DEBUG=1 also prints the traceback).
       Path handling turns PermissionError / FileNotFoundError into a UserError where it knows the
       file; a PermissionError that reaches the entry point unconverted is reported in one line too.
    3  preempted (`Preempted`): stopped on SIGTERM after saving; rerunning the same command resumes,
       also when the signal came during an inner stage (a base model, a memory build)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3


class UserError(Exception):
    """Something the user gave is wrong (config, path, file, permissions, data); the message is one
    line that names the field or file and says how to fix it."""


class Preempted(Exception):
    """A run stopped on SIGTERM after saving; the same command resumes it."""
