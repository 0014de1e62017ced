"""`python -m vlm_jax.plots WORKDIR [WORKDIR ...]`: re-draws the plots of finished workdirs.

Each workdir's `config.json` says its task and `results.json` (with its runs' files) holds the data;
the PNGs go to `<workdir>/plots/` and their paths are printed, one a line. The console is the main
job's (`vlm_jax.console`): library INFO logs (orbax restoring a model to draw GRAIN's boxes) and the
printed paths are appended to the workdir's `log.txt`; `--verbosity=info` shows them.
"""

from __future__ import annotations

import sys

from absl import app, flags
from etils import epath

from vlm_jax import console
from vlm_jax.errors import EXIT_USER_ERROR
from vlm_jax.plots import write_plots


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("usage: python -m vlm_jax.plots WORKDIR [WORKDIR ...]")
    console.configure(verbose=flags.FLAGS["verbosity"].present)
    try:
        for workdir in argv[1:]:
            if not (epath.Path(workdir) / "config.json").exists():
                print(f"error: {workdir} has no config.json; give the workdir of a finished run.", file=sys.stderr)
                sys.exit(EXIT_USER_ERROR)
            console.log_to(workdir)
            for path in write_plots(None, workdir):
                console.say(path)
    finally:
        console.close()


if __name__ == "__main__":
    app.run(main)
