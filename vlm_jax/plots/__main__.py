"""`python -m vlm_jax.plots WORKDIR [WORKDIR ...]`: re-draws the plots of finished workdirs.

Each workdir's `config.json` says its task and `results.json` (with its runs' files) holds the data;
the PNGs go to `<workdir>/plots/` and their paths are printed, one a line.
"""

from __future__ import annotations

import sys

from absl import app
from etils import epath

from vlm_jax.errors import EXIT_USER_ERROR
from vlm_jax.plots import write_plots


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("usage: python -m vlm_jax.plots WORKDIR [WORKDIR ...]")
    for workdir in argv[1:]:
        if not (epath.Path(workdir) / "config.json").exists():
            print(f"error: {workdir} has no config.json; give the workdir of a finished run.", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        for path in write_plots(None, workdir):
            print(path, flush=True)


if __name__ == "__main__":
    app.run(main)
