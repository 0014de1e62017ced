"""recap_hard_negatives.png: hard-negative accuracy by kind per row, grouped bars with seed error bars.

The kinds are the table's columns whose eval is a two-way choice between a caption and its negative
(Shapes World's `shapes_compositional` kinds, SugarCrepe, ARO's relation and attribution sets), so
chance is 50%.
"""

from __future__ import annotations

from vlm_jax.plots import bars
from vlm_jax.plots.results import Workdir

TWO_WAY_TYPES = ("shapes_compositional", "sugarcrepe", "aro_relation", "aro_attribution")


def hard_negative_columns(workdir: Workdir) -> list[tuple[str, str]]:
    """The table's (metric, label) columns of two-way hard-negative evals."""
    return [(metric, label) for metric, label in workdir.table()
            if workdir.eval_type(metric.partition("/")[0]) in TWO_WAY_TYPES]


def hard_negatives_figure(workdir: Workdir):
    return bars.table_figure(workdir, hard_negative_columns(workdir), chance=0.5,
                             title="Recaptioned-data CLIP: hard negatives by kind",
                             ylabel="caption scored over its negative (%)", xlabel="hard-negative kind")
