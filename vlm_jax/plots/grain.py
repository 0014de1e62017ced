"""GRAIN's plots: grain_accuracy.png, every table column per row, and grain_boxes.png, a grid of eval
images with their annotated boxes and the boxes of the region queries matched to them.

The boxes come from the first GRAIN row's first seed (`runs/<variant>/seed_0/export`, read with
`load_grain`) on the first images of the experiment's `regions` eval, matched as that evaluator
matches them (`vlm_jax.evaluate.region_boxes.match_regions`, Hungarian on L1 + GIoU).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap

import numpy as np

from vlm_jax.plots import bars, draw
from vlm_jax.plots.results import MissingData, Workdir

IMAGES = 8


def accuracy_figure(workdir: Workdir):
    return bars.table_figure(workdir, workdir.table(), title="GRAIN: classification by description and box quality",
                             ylabel="accuracy, IoU or recall (%)", xlabel="table column")


@dataclasses.dataclass(frozen=True)
class BoxPanels:
    """Images float [N, S, S, 3] in [0, 1]; per image its annotated boxes and their matched queries'
    boxes [n_i, 4] (x0, y0, x1, y1 in pixels), the matched pairs' IoU [n_i] and descriptions."""

    images: np.ndarray
    true_boxes: list[np.ndarray]
    predicted_boxes: list[np.ndarray]
    ious: list[np.ndarray]
    descriptions: list[list[str]]


def _xyxy_pixels(boxes: np.ndarray, size: int) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1) * size


def box_panels(model, preprocess, batch) -> BoxPanels:
    """The region queries of `model` (a GrainCLIP) on batch "image" [N, S, S, 3] (normalized as
    `preprocess` says), matched to its "boxes" [N, R, 4] (cx, cy, w, h in [0, 1]) where "box_mask"."""
    from vlm_jax.evaluate.region_boxes import match_regions  # noqa: PLC0415 - jax only for this plot
    from vlm_jax.evaluate.views import RegionEncoder  # noqa: PLC0415

    images = np.asarray(batch["image"], np.float32)
    mask = np.asarray(batch["box_mask"], bool) & np.asarray(batch.get("mask", np.ones(len(images), bool)))[:, None]
    predicted, _ = RegionEncoder(model, len(images))(images)
    index, iou = match_regions(predicted, batch["boxes"], mask)
    matched = np.take_along_axis(predicted, index[..., None], axis=1)
    size = images.shape[1]
    texts = np.asarray(batch.get("region_texts", np.full(mask.shape, "")), object)
    pixels = np.clip(images * np.asarray(preprocess.std) + np.asarray(preprocess.mean), 0.0, 1.0)
    return BoxPanels(pixels, [_xyxy_pixels(b[m], size) for b, m in zip(np.asarray(batch["boxes"]), mask)],
                     [_xyxy_pixels(b[m], size) for b, m in zip(matched, mask)], [v[m] for v, m in zip(iou, mask)],
                     [[t.decode() if isinstance(t, bytes) else str(t) for t in row[m]] for row, m in zip(texts, mask)])


def boxes_figure_of(panels: BoxPanels, title: str):
    """The grid: each image with its annotated boxes (solid) and matched queries' boxes (dashed, IoU)."""
    count = len(panels.images)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = draw.new_figure(3.0 * columns, 3.2 * rows + 0.4, rows, columns)
    for index, ax in enumerate(axes):
        if index >= count:
            ax.set_visible(False)
            continue
        ax.imshow(panels.images[index], interpolation="nearest")
        draw.draw_boxes(ax, panels.true_boxes[index], color=draw.TRUE_BOX_COLOR)
        draw.draw_boxes(ax, panels.predicted_boxes[index], color=draw.PREDICTED_BOX_COLOR, linestyle="--",
                        labels=[f"IoU {iou:.2f}" for iou in panels.ious[index]])
        ax.set_title("\n".join(textwrap.wrap("; ".join(panels.descriptions[index]), 44)[:2]) or "(no boxes)",
                     fontsize=7)
        size = panels.images.shape[1]
        ax.set(xlim=(0, size), ylim=(size, 0), xticks=[0, size], yticks=[0, size])
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("y (pixels)")
    axes[(rows - 1) * columns].set_xlabel("x (pixels of the model input)")
    axes[0].legend(handles=[draw.box_handle(draw.TRUE_BOX_COLOR, "-", "annotated box"),
                            draw.box_handle(draw.PREDICTED_BOX_COLOR, "--", "matched region query")],
                   fontsize="x-small", loc="lower left")
    fig.suptitle(title)
    return fig


def grain_run(workdir: Workdir) -> tuple[str, str]:
    """(variant, export directory) of the first GRAIN row's first seed with an export."""
    for row in workdir.rows(baseline=False):
        if workdir.variant_value(row.name, "method") != "grain":
            continue
        for run in workdir.run_dirs(row.name):
            if (run / "export" / "regions").exists():
                return row.label, str(run / "export")
    raise MissingData(f"no GRAIN run under {workdir.path / 'runs'} has an export with its region decoder")


def eval_batch(workdir: Workdir, preprocess, tokenizer, count: int = IMAGES):
    """The first `count` images of the experiment's first `regions` eval, as its evaluator reads them."""
    from vlm_jax.data import pipeline  # noqa: PLC0415
    from vlm_jax.evaluate.suite import eval_spec  # noqa: PLC0415

    specs = workdir.config.get("evals") or {}
    name = next((name for name, spec in specs.items() if spec.get("type") == "regions"), None)
    if name is None:
        raise MissingData("config.evals has no eval of type 'regions' (images with boxes and descriptions)")
    spec = eval_spec(**specs[name])
    pipeline.prepare_embedded(spec.data)
    source = pipeline.Head(pipeline.make_source(spec.data), count)
    return next(pipeline.make_eval_iterator(spec.data, preprocess, tokenizer, min(count, len(source)), process_index=0,
                                            process_count=1, source=source))


def boxes_figure(workdir: Workdir):
    from vlm_jax.methods.grain_clip import load_grain  # noqa: PLC0415

    label, export = grain_run(workdir)
    model, pretrained = load_grain(export)
    batch = eval_batch(workdir, pretrained.preprocess, pretrained.tokenizer)
    return boxes_figure_of(box_panels(model, pretrained.preprocess, batch),
                           f"GRAIN ({label}, seed 0): annotated boxes and the matched region queries' boxes")
