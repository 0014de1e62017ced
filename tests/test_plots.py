"""Plots beside every result: each PNG from a fake workdir holds exactly the data written into it,
missing data is a warning, the CLI re-draws a workdir; RECO's k sweep and RAR's candidate sweep."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
from flax import nnx
from matplotlib.container import BarContainer

from vlm_jax import plots
from vlm_jax.config_lib import ConfigError
from vlm_jax.data.preprocess import PreprocessSpec
from vlm_jax.evaluate.common import get_evaluator
from vlm_jax.evaluate.views import RegionEncoder, StoredPrompts, stored_view
from vlm_jax.methods import rar as rar_method
from vlm_jax.methods import reco as reco_method
from vlm_jax.plots import bars, draw, grain, rar, recap, reco, training
from vlm_jax.plots.results import Workdir

SHAPES_TABLE = [["shapes/top1", "all"], ["shapes/top1_common", "common"], ["shapes/top1_rare", "rare"],
                ["shapes/top1_novel", "novel"], ["shapes_retrieval/image_retrieval_recall@1", "T->I R@1"]]


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_metrics(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def png_size(path):
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def figure_size(figure):
    return tuple(int(round(v)) for v in figure.get_size_inches() * draw.DPI)


def bar_containers(ax):
    return [container for container in ax.containers if isinstance(container, BarContainer)]


def bar_heights(ax):
    """Each series' bar heights (NaN: a hidden bar)."""
    return [[patch.get_height() if patch.get_visible() else np.nan for patch in container]
            for container in bar_containers(ax)]


def error_halves(container):
    """The half-lengths of a BarContainer's error bars."""
    segments = container.errorbar.lines[2][0].get_segments()
    return [abs(segment[1][1] - segment[0][1]) / 2 for segment in segments]


def summarized(rows: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """A runner results.json: baseline values and per-variant mean / sample std over seeds."""
    results = {}
    for row, metrics in rows.items():
        for metric, values in metrics.items():
            results[f"{row}/{metric}"] = float(np.mean(values))
            if row != "baseline":
                results[f"{row}/{metric}/std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return results


# --------------------------------------------------------------------------------------------------
# training.png


def test_training_plot_of_a_train_workdir_draws_every_logged_scalar(tmp_path):
    steps = [10, 20, 30]
    loss, lr, scale, i2t = [4.0, 3.0, 2.5], [1e-4, 2e-4, 1e-4], [14.0, 15.0, 17.0], [0.1, 0.3, 0.5]
    records = [{"step": s, "train/loss": a, "train/lr": b, "train/logit_scale": c, "train/i2t_accuracy": d,
                "train/t2i_accuracy": d / 2, "data/skipped_corrupt_image": 0.0}
               for s, a, b, c, d in zip(steps, loss, lr, scale, i2t)]
    records.insert(2, {"step": 20, "shapes/top1": 0.2})  # an eval record in between
    write_metrics(tmp_path / "metrics.jsonl", records)
    write_json(tmp_path / "results.json", {"shapes/top1": 0.25, "train/step": 30.0})
    config = ml_collections.ConfigDict({"task": "train", "method": "clip"})

    paths = plots.write_plots(config, tmp_path, {"shapes/top1": 0.25}, strict=True)
    assert sorted(paths) == sorted(str(tmp_path / "plots" / name) for name in ("training.png", "top1.png"))
    figure = training.figure(Workdir.read(tmp_path, config))
    assert png_size(tmp_path / "plots" / "training.png") == figure_size(figure)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert set(panels) == {"Training loss", "Learning rate", "Temperature", "In-batch accuracy"}
    (line,) = panels["Training loss"].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_array_equal(line.get_ydata(), loss)
    np.testing.assert_array_equal(panels["Learning rate"].get_lines()[0].get_ydata(), lr)
    np.testing.assert_array_equal(panels["Temperature"].get_lines()[0].get_ydata(), scale)
    accuracy = [line.get_ydata() for line in panels["In-batch accuracy"].get_lines()]
    np.testing.assert_allclose(accuracy, [100 * np.asarray(i2t), 50 * np.asarray(i2t)])
    assert [t.get_text() for t in panels["In-batch accuracy"].get_legend().get_texts()] == ["image -> text",
                                                                                            "text -> image"]
    assert "(nats)" in panels["Training loss"].get_ylabel() and "step" in panels["Training loss"].get_xlabel()


def test_training_plot_of_runner_runs_has_a_line_per_seed_and_their_mean_per_variant(tmp_path):
    losses = {("reco", 0): [3.0, 2.0], ("reco", 1): [3.2, 2.4], ("mean", 0): [3.5, 3.1], ("mean", 1): [3.3, 2.9]}
    for (variant, seed), values in losses.items():
        write_metrics(tmp_path / "runs" / variant / f"seed_{seed}" / "metrics.jsonl",
                      [{"step": step, "train/loss": value, "train/scale": 10.0 + seed}
                       for step, value in zip((50, 100), values)])
    config = {"task": "reco", "variants": {"reco": {}, "mean": {"reco": {"fusion": "mean"}}},
              "variant_labels": {"reco": "CLIP+RECO", "mean": "  mean instead of fusion"}}
    figure = training.figure(Workdir.read(tmp_path, config))
    loss_panel = figure.axes[0]
    lines = [line.get_ydata() for line in loss_panel.get_lines()]
    # reco first (no overrides): its two seeds thin, then their mean; then mean's
    np.testing.assert_allclose(lines, [[3.0, 2.0], [3.2, 2.4], [3.1, 2.2], [3.5, 3.1], [3.3, 2.9], [3.4, 3.0]])
    assert [t.get_text() for t in loss_panel.get_legend().get_texts()] == ["CLIP+RECO", "mean instead of fusion"]
    assert "2 seeds" in figure.get_suptitle()


# --------------------------------------------------------------------------------------------------
# Bars of a runner table: RECO, recap, GRAIN


def reco_workdir(tmp_path, *, sweep=True):
    """A finished reco workdir: 2 variants x 2 seeds, the table's results and each run's k sweep."""
    seeds = {
        "reco": [{"shapes/top1": 0.30, "shapes/top1_rare": 0.20, "shapes@k1/top1": 0.25, "shapes@k1/top1_rare": 0.1,
                  "shapes@k4/top1": 0.28, "shapes@k4/top1_rare": 0.15},
                 {"shapes/top1": 0.34, "shapes/top1_rare": 0.22, "shapes@k1/top1": 0.27, "shapes@k1/top1_rare": 0.12,
                  "shapes@k4/top1": 0.30, "shapes@k4/top1_rare": 0.19}],
        "mean": [{"shapes/top1": 0.20, "shapes/top1_rare": 0.10, "shapes@k1/top1": 0.21, "shapes@k1/top1_rare": 0.1,
                  "shapes@k4/top1": 0.22, "shapes@k4/top1_rare": 0.12},
                 {"shapes/top1": 0.22, "shapes/top1_rare": 0.14, "shapes@k1/top1": 0.19, "shapes@k1/top1_rare": 0.1,
                  "shapes@k4/top1": 0.20, "shapes@k4/top1_rare": 0.1}],
    }
    for variant, runs in seeds.items():
        for index, results in enumerate(runs):
            results = results if sweep else {k: v for k, v in results.items() if "@k" not in k}
            write_json(tmp_path / "runs" / variant / f"seed_{index}" / "results.json", results)
    table = {"baseline": {"shapes/top1": [0.18], "shapes/top1_rare": [0.05]}}
    for variant, runs in seeds.items():
        table[variant] = {m: [r[m] for r in runs] for m in ("shapes/top1", "shapes/top1_rare")}
        table[variant]["shapes_retrieval/image_retrieval_recall@1"] = [0.5, 0.6]
    config = {"task": "reco", "seeds": 2, "reco": {"k": 16}, "table": SHAPES_TABLE,
              "variants": {"reco": {}, "mean": {"reco": {"fusion": "mean"}}}, "baseline_label": "CLIP (frozen)",
              "variant_labels": {"reco": "CLIP+RECO", "mean": "  mean instead of fusion"},
              "evals": {"shapes": {"type": "zero_shot"}, "shapes_retrieval": {"type": "retrieval"}}}
    write_json(tmp_path / "config.json", config)
    write_json(tmp_path / "results.json", summarized(table))
    return seeds


def test_reco_accuracy_bars_are_the_tables_top1_means_with_seed_std_error_bars(tmp_path):
    seeds = reco_workdir(tmp_path)
    figure = reco.accuracy_figure(Workdir.read(tmp_path))
    (ax,) = figure.axes
    # Groups: the top-1 columns with a value (retrieval is not a top-1; common and novel have none).
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["all", "rare"]
    reco_all = 100 * np.mean([r["shapes/top1"] for r in seeds["reco"]])
    np.testing.assert_allclose(bar_heights(ax), [[18.0, 5.0], [reco_all, 21.0], [21.0, 12.0]])
    reco_std = 100 * np.std([r["shapes/top1"] for r in seeds["reco"]], ddof=1)
    np.testing.assert_allclose(error_halves(bar_containers(ax)[1])[0], reco_std, rtol=1e-6)
    assert bar_containers(ax)[0].errorbar is None  # the frozen baseline has no seeds
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CLIP (frozen)", "CLIP+RECO",
                                                                    "mean instead of fusion"]
    assert "%" in ax.get_ylabel() and ax.get_xlabel() and "2 seeds" in ax.get_title()


def test_reco_k_curves_are_the_seed_means_of_the_sweep_and_the_run_metric_at_its_trained_k(tmp_path):
    seeds = reco_workdir(tmp_path)
    workdir = Workdir.read(tmp_path)
    curves = reco.k_curves(workdir)
    assert set(curves) == {("shapes", "top1"), ("shapes", "top1_rare")}
    curve = curves["shapes", "top1"]["reco"]
    assert curve.ks.tolist() == [1, 4, 16] and curve.trained_k == 16
    np.testing.assert_array_equal(curve.values, [[0.25, 0.28, 0.30], [0.27, 0.30, 0.34]])
    figure = reco.k_figure(workdir)
    assert [ax.get_title() for ax in figure.axes] == ["all", "rare"]  # in table order, its labels
    lines = figure.axes[0].get_lines()
    np.testing.assert_array_equal(lines[0].get_xdata(), [1, 4, 16])
    np.testing.assert_allclose(lines[0].get_ydata(), 100 * np.mean(curve.values, axis=0))
    mean_rare = [[r["shapes@k1/top1_rare"], r["shapes@k4/top1_rare"], r["shapes/top1_rare"]] for r in seeds["mean"]]
    np.testing.assert_allclose(figure.axes[1].get_lines()[1].get_ydata(), 100 * np.mean(mean_rare, axis=0))
    baseline = [line for line in lines if line.get_label() == "CLIP (frozen)"]
    assert len(baseline) == 1 and np.allclose(baseline[0].get_ydata(), 18.0)
    assert [line.get_xdata()[0] for line in lines if line.get_label() == "trained with k=16"] == [16]


def test_recap_hard_negative_bars_take_the_two_way_kinds_with_a_chance_line(tmp_path):
    kinds = ["compositional/swap_attribute", "compositional/swap_relation", "compositional/replace_object"]
    table = [[kinds[0], "swap attr"], [kinds[1], "swap rel"], ["shapes/top1", "zero-shot"], [kinds[2], "replace obj"],
             ["winoground/group", "Wino group"]]
    values = {"baseline": {k: [0.5 + i / 10] for i, k in enumerate(kinds)},
              "recap": {k: [0.55 + i / 10, 0.65 + i / 10, 0.6 + i / 10] for i, k in enumerate(kinds)}}
    write_json(tmp_path / "results.json", summarized(values))
    write_json(tmp_path / "config.json", {"task": "recap", "seeds": 3, "table": table, "variants": {"recap": {}},
                                          "evals": {"compositional": {"type": "shapes_compositional"},
                                                    "shapes": {"type": "zero_shot"},
                                                    "winoground": {"type": "winoground"}}})
    workdir = Workdir.read(tmp_path)
    assert recap.hard_negative_columns(workdir) == [(kinds[0], "swap attr"), (kinds[1], "swap rel"),
                                                    (kinds[2], "replace obj")]
    (ax,) = recap.hard_negatives_figure(workdir).axes
    np.testing.assert_allclose(bar_heights(ax), [[50.0, 60.0, 70.0], [60.0, 70.0, 80.0]])
    np.testing.assert_allclose(error_halves(bar_containers(ax)[1]), [5.0, 5.0, 5.0])
    (chance,) = [line for line in ax.get_lines() if line.get_label() == "chance (50%)"]
    assert np.allclose(chance.get_ydata(), 50.0)


def test_zero_shot_eval_bars_are_each_evals_top1_and_subsets(tmp_path):
    results = {"cars/top1": 0.61, "cars/top5": 0.9, "shapes/top1": 0.14, "shapes/top1_rare": 0.05,
               "shapes_retrieval/image_retrieval_recall@1": 0.07}
    paths = plots.write_plots({"task": "zero_shot_eval"}, tmp_path, results, strict=True)
    assert paths == [str(tmp_path / "plots" / "top1.png")]
    figure = bars.top1_figure(Workdir.read(tmp_path, {"task": "zero_shot_eval"}, results))
    assert png_size(paths[0]) == figure_size(figure)
    (ax,) = figure.axes
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["cars", "shapes"]
    np.testing.assert_allclose(bar_heights(ax), [[61.0, 14.0], [np.nan, 5.0]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all", "rare"]


# --------------------------------------------------------------------------------------------------
# RAR: accuracy against the candidate count


def rar_workdir(tmp_path):
    variants = {"rar": {}, "shots_01": {"rar": {"shots": 1}}, "shots_04_k10": {"rar": {"k": 10}}}
    table = {"baseline": {"knn_top1": [0.14]},
             "rar": {"knn_top1": [0.30, 0.32], "rar_top1": [0.40, 0.44], "rar_score_top1": [0.35, 0.37],
                     "recall": [0.60, 0.62]},
             "shots_01": {"knn_top1": [0.2, 0.2], "rar_top1": [0.9, 0.9], "recall": [0.9, 0.9]},
             "shots_04_k10": {"knn_top1": [0.30, 0.32], "rar_top1": [0.46, 0.50], "rar_score_top1": [0.38, 0.40],
                              "recall": [0.75, 0.79]}}
    for seed in range(2):
        sweep = {f"recall@{j}": 0.3 + 0.045 * j + seed / 100 for j in range(1, 11)}
        sweep.update({f"rar_score_top1@{j}": 0.3 + 0.01 * j + seed / 100 for j in range(1, 11)})
        write_json(tmp_path / "runs" / "shots_04_k10" / f"seed_{seed}" / "results.json", sweep)
    write_json(tmp_path / "results.json", summarized(table))
    write_json(tmp_path / "config.json", {"task": "rar", "seeds": 2, "rar": {"shots": 4, "k": 5}, "variants": variants,
                                          "row_order": [], "baseline_label": "CLIP zero-shot (frozen)"})


def test_rar_candidate_curves_use_the_variants_at_the_main_shots_and_the_widest_runs_sweep(tmp_path):
    rar_workdir(tmp_path)
    workdir = Workdir.read(tmp_path)
    shots, points = rar.candidate_points(workdir)
    assert shots == 4
    ks, mean, std = points["rar_top1"]  # one point per variant with 4 shots; the 1-shot row is left out
    assert ks.tolist() == [5, 10]
    np.testing.assert_allclose(mean, [0.42, 0.48])
    np.testing.assert_allclose(std, [np.std([0.40, 0.44], ddof=1), np.std([0.46, 0.50], ddof=1)])
    ks, mean, _ = points["recall"]  # the k = 10 run's sweep over j = 1..10
    assert ks.tolist() == list(range(1, 11))
    np.testing.assert_allclose(mean, [0.3 + 0.045 * j + 0.005 for j in range(1, 11)])
    (ax,) = rar.candidates_figure(workdir).axes
    labels = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(labels["RAR (ranking)"].get_ydata(), [42.0, 48.0])
    np.testing.assert_allclose(labels["RAR (scoring)"].get_ydata(), [100 * (0.305 + 0.01 * j) for j in range(1, 11)])
    np.testing.assert_allclose(labels["CLIP+kNN (the first candidate)"].get_ydata(), 31.0)
    np.testing.assert_allclose(labels["CLIP zero-shot (frozen)"].get_ydata(), 14.0)
    assert "candidate" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["1", "2", "4", "5", "8", "10"]  # 10 ks: not all


def test_rar_k_axis_labels_few_ks_all_and_a_long_sweep_without_neighbours():
    assert rar.tick_ks([5, 10, 20]) == [5, 10, 20]
    assert rar.tick_ks(list(range(1, 21))) == [1, 2, 4, 5, 8, 10, 16, 20]
    assert rar.tick_ks(list(range(1, 13))) == [1, 2, 4, 5, 8, 10, 12]


# --------------------------------------------------------------------------------------------------
# GRAIN's boxes


@functools.lru_cache(maxsize=1)
def tiny_grain(seed=0):
    """A tiny GrainCLIP with random weights (every parameter N(0, 0.05)): built abstractly and filled,
    since an eager init compiles each of its ops once (tens of seconds on a busy CPU)."""
    import jax

    from vlm_jax.models import clip as clip_models
    from vlm_jax.models.regions import GrainCLIP, RegionDecoderConfig

    config = clip_models.tiny()  # one block per tower: these tests draw boxes, not train towers
    config = config.replace(vision=dataclasses.replace(config.vision, depth=1),
                            text=dataclasses.replace(config.text, depth=1))
    decoder = RegionDecoderConfig(token_width=config.vision.width, embed_dim=config.embed_dim, width=32, depth=1,
                                  heads=4, mlp_dim=64, num_regions=4)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: GrainCLIP(clip_models.CLIP(config, rngs=nnx.Rngs(seed)), decoder, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.05, leaf.shape).astype(leaf.dtype)), state))


def iou_xyxy(a, b):
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return width * height / (area(a) + area(b) - width * height)


def test_grain_box_grid_draws_each_annotated_box_and_the_query_matched_to_it():
    model = tiny_grain()
    size = model.clip.config.vision.image_size
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (3, 3, 2)), rng.uniform(0.1, 0.4, (3, 3, 2))], -1).astype(np.float32)
    mask = np.asarray([[True, True, False], [True, False, False], [False, False, False]])
    preprocess = PreprocessSpec.clip(size)
    batch = {"image": rng.normal(size=(3, size, size, 3)).astype(np.float32), "boxes": boxes, "box_mask": mask,
             "region_texts": np.asarray([["a red star", "a blue disc", ""], ["a big cube", "", ""], ["", "", ""]])}
    panels = grain.box_panels(model, preprocess, batch)
    assert [len(b) for b in panels.true_boxes] == [2, 1, 0] and panels.descriptions[0] == ["a red star", "a blue disc"]
    cx, cy, w, h = boxes[0, 0]
    corners = np.asarray([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * size
    np.testing.assert_allclose(panels.true_boxes[0][0], corners, rtol=1e-5)
    # Each drawn prediction is one of the model's query boxes, and the reported IoU is the drawn pair's.
    queries = np.asarray(RegionEncoder(model, 3)(batch["image"])[0], np.float64)
    for image in range(2):
        corners = np.concatenate([queries[image, :, :2] - queries[image, :, 2:] / 2,
                                  queries[image, :, :2] + queries[image, :, 2:] / 2], -1) * size
        for box in panels.predicted_boxes[image]:
            assert np.min(np.abs(corners - box).max(axis=1)) < 1e-3
        drawn_iou = iou_xyxy(panels.true_boxes[image], panels.predicted_boxes[image])
        np.testing.assert_allclose(panels.ious[image], drawn_iou, atol=1e-5)
    mean, std = np.asarray(preprocess.mean), np.asarray(preprocess.std)
    np.testing.assert_allclose(panels.images, np.clip(batch["image"] * std + mean, 0, 1), atol=1e-6)

    figure = grain.boxes_figure_of(panels, "boxes")
    first = figure.axes[0]
    rectangles = [(p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()) for p in first.patches]
    np.testing.assert_allclose(rectangles, np.concatenate([panels.true_boxes[0], panels.predicted_boxes[0]]), atol=1e-9)
    assert [p.get_edgecolor()[:3] for p in first.patches[:2]] != [p.get_edgecolor()[:3] for p in first.patches[2:]]
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["annotated box", "matched region query"]
    assert figure.axes[2].get_title() == "(no boxes)"


@pytest.mark.slow
def test_grain_boxes_plot_reads_the_exported_run_and_the_regions_eval(tmp_path):
    from vlm_jax.data import shapes_world
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.weights import heads, save_pretrained

    shapes_world.prepare(None, "test")
    model = tiny_grain()
    size = model.clip.config.vision.image_size
    export = tmp_path / "runs" / "grain" / "seed_0" / "export"
    tokenizer = Tokenizer.from_dir(shapes_world.tokenizer_dir(None, "test"), context_length=16)
    save_pretrained(model.clip, export / "clip", tokenizer=tokenizer, preprocess=PreprocessSpec.clip(size))
    heads.save_head(model, export / "regions", dataclasses.asdict(model.regions.config), include="regions/")
    regions = {"type": "regions", "data": {"source": "tfds", "tfds_name": "shapes_world/test",
                                           "split": "eval_retrieval", "regions_key": "regions", "max_regions": 4}}
    config = {"task": "grain", "variants": {"clip": {"method": "clip"}, "grain": {}}, "method": "grain",
              "row_order": ["clip", "grain"], "evals": {"regions": regions},
              "table": [["regions/mean_iou", "box mIoU"]]}
    write_json(tmp_path / "config.json", config)
    write_json(tmp_path / "results.json", summarized({"grain": {"regions/mean_iou": [0.3]}}))

    paths = plots.write_plots(None, tmp_path, strict=True)
    assert sorted(paths) == [str(tmp_path / "plots" / f"grain_{name}.png") for name in ("accuracy", "boxes")]
    figure = grain.boxes_figure(Workdir.read(tmp_path))
    assert png_size(tmp_path / "plots" / "grain_boxes.png") == figure_size(figure)
    assert len([ax for ax in figure.axes if ax.get_visible()]) == grain.IMAGES
    assert sum(len(ax.patches) for ax in figure.axes) > 0


# --------------------------------------------------------------------------------------------------
# Missing data, errors, the CLI


def test_a_plot_without_its_data_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch):
    reco_workdir(tmp_path, sweep=False)  # no run logged metrics and none swept k
    warnings = []
    monkeypatch.setattr(plots.logging, "warning", lambda message, *args, **kwargs: warnings.append(message % args))
    paths = plots.write_plots(None, tmp_path)
    assert paths == [str(tmp_path / "plots" / "reco_accuracy.png")]
    assert len(warnings) == 2
    assert warnings[0].startswith("Plot training.png skipped: no metrics.jsonl")
    assert warnings[1].startswith("Plot reco_k.png skipped:") and "reco.eval_ks" in warnings[1]
    # A task with nothing to plot writes nothing, silently.
    warnings.clear()
    assert plots.write_plots({"task": "annotate"}, tmp_path / "annotate", {}) == [] and warnings == []


def test_an_error_while_drawing_is_logged_not_raised_unless_strict(tmp_path, monkeypatch):
    reco_workdir(tmp_path)
    warnings = []
    monkeypatch.setattr(plots.logging, "warning", lambda message, *args, **kwargs: warnings.append(message % args))
    broken = plots.Plot("broken", lambda workdir: 1 / 0)
    monkeypatch.setitem(plots.PLOTS, "reco", (broken, plots.PLOTS["reco"][1]))
    assert plots.write_plots(None, tmp_path) == [str(tmp_path / "plots" / "reco_accuracy.png")]
    assert warnings == ["Plot broken.png skipped after an error:"]
    with pytest.raises(ZeroDivisionError):
        plots.write_plots(None, tmp_path, strict=True)


def test_the_cli_redraws_a_finished_workdir_and_refuses_one_without_config(tmp_path):
    reco_workdir(tmp_path / "reco")
    done = subprocess.run([sys.executable, "-m", "vlm_jax.plots", str(tmp_path / "reco")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = [str(tmp_path / "reco" / "plots" / name) for name in ("reco_accuracy.png", "reco_k.png")]
    assert done.stdout.split() == expected
    sizes = [figure_size(f(Workdir.read(tmp_path / "reco"))) for f in (reco.accuracy_figure, reco.k_figure)]
    assert [png_size(path) for path in expected] == sizes
    assert not [line for line in done.stderr.splitlines() if line.startswith("I")], done.stderr  # no INFO lines
    logged = [line.rpartition("] ")[2] for line in (tmp_path / "reco" / "log.txt").read_text().splitlines()]
    assert [message for message in logged if message in expected] == expected  # the printed paths, logged
    assert f"Wrote {expected[0]}" in logged  # and the INFO line the console left out
    missing = subprocess.run([sys.executable, "-m", "vlm_jax.plots", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("has no config.json; give the workdir of a "
                                                                      "finished run.")


# --------------------------------------------------------------------------------------------------
# The metrics behind the plots: RECO's k sweep, RAR's candidate sweep


EMBED_DIM = 32


def unit(rows):
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StubClipConfig:
    embed_dim: int = EMBED_DIM


class StubClip(nnx.Module):
    """What RECO reads of its CLIP when batches carry embeddings."""

    def __init__(self):
        self.config = StubClipConfig()
        self.logit_scale = nnx.Param(jnp.asarray(2.5))


def reco_views(k, eval_ks, memory):
    section = {"k": k, "eval_ks": eval_ks, "eval_memory_dir": "memory",
               "fusion_config": {"heads": 4, "width": 32, "zero_init_output": False}}
    model = reco_method.RECO(StubClip(), reco_method.parse_reco(section), rngs=nnx.Rngs(1))
    method = reco_method.RecoMethod()
    method._cache[("memory", "memory")] = memory
    return method.views(model, lambda encoder: stored_view(memory.prompts))


def test_reco_k_sweep_at_the_trained_k_is_the_reco_metric_and_at_another_k_a_model_of_that_k():
    rng = np.random.default_rng(0)
    images, texts = unit(rng.normal(size=(40, EMBED_DIM))), unit(rng.normal(size=(40, EMBED_DIM)))
    fields = {"image_embeddings": images, "text_embeddings": texts}
    names = [f"class {i}" for i in range(8)]
    memory = types.SimpleNamespace(**fields, num_rows=40, rows=fields.__getitem__,
                                   prompts=StoredPrompts(names, unit(rng.normal(size=(8, EMBED_DIM)))))
    batch = {"image_embedding": unit(rng.normal(size=(24, EMBED_DIM))), "label": rng.integers(0, 8, 24)}
    evaluator = get_evaluator("zero_shot", data=lambda: [batch], class_names=names, templates=["{}"],
                              subsets={"low": np.arange(4)})
    views = reco_views(3, (1, 3), memory)
    assert set(views) == {"clip", "reco", "reco@k1", "reco@k3"}
    metrics = {name: evaluator.run(view) for name, view in views.items()}
    assert metrics["reco@k3"] == metrics["reco"]
    np.testing.assert_array_equal(views["reco@k3"].images(batch), views["reco"].images(batch))
    # The same trained fusion, given 1 item: what a model configured with k = 1 gives.
    one = reco_views(1, (), memory)["reco"]
    np.testing.assert_array_equal(views["reco@k1"].images(batch), one.images(batch))
    np.testing.assert_array_equal(views["reco@k1"].prompts(names), one.prompts(names))
    assert evaluator.run(one) == metrics["reco@k1"]
    assert not np.allclose(views["reco@k1"].images(batch), views["reco"].images(batch))


def test_reco_evaluators_sweep_each_zero_shot_eval_of_the_reco_view(monkeypatch):
    from vlm_jax.evaluate import suite

    monkeypatch.setattr(suite, "build_evaluators", lambda evals, preprocess, tokenizer, views: evals)
    method = reco_method.RecoMethod()
    method._cache[("clip", "clip_dir", "float32")] = types.SimpleNamespace(preprocess=None, tokenizer=None)
    config = ml_collections.ConfigDict({"clip_dir": "clip_dir", "dtype": "float32", "reco": {"eval_ks": (2, 8)},
                                        "evals": {"shapes": {"type": "zero_shot", "pred": "reco"},
                                                  "plain": {"type": "zero_shot", "pred": "clip"},
                                                  "retrieval": {"type": "retrieval", "pred": "reco"}}})
    evals = method.evaluators(config)
    assert {name: spec["pred"] for name, spec in evals.items()} == {
        "shapes": "reco", "plain": "clip", "retrieval": "reco", "shapes@k2": "reco@k2", "shapes@k8": "reco@k8"}
    assert evals["shapes@k2"]["type"] == "zero_shot"
    with pytest.raises(ConfigError, match="eval_ks"):
        reco_method.parse_reco({"eval_ks": (4, 0)})


def rar_runs(labels, queries, memory_images, memory_labels, scores):
    """RarRuns over in-memory arrays and a scripted MLLM (scores of each row's candidates)."""
    runs = rar_method.RarRuns.__new__(rar_method.RarRuns)
    runs.memory = types.SimpleNamespace(labels=memory_labels, image_embeddings=memory_images)
    runs.queries, runs.labels, runs.images = queries, labels, [None] * len(labels)
    runs.class_names, runs.subsets = [f"c{i}" for i in range(6)], {"rare": np.asarray([0, 1])}
    calls = []

    def score(images, prompts, candidates, *, normalize=False):
        calls.append([list(row) for row in candidates])
        return np.asarray([[scores[row][name] for name in names] for row, names in enumerate(candidates)])

    runs.mllm = types.SimpleNamespace(score=score)
    return runs, calls


def test_rar_sweep_scores_every_candidate_prefix_from_one_set_of_mllm_scores(tmp_path):
    rng = np.random.default_rng(0)
    memory_labels = np.repeat(np.arange(6), 2)
    memory_images = unit(rng.normal(size=(12, 8)))
    queries = unit(memory_images[[0, 3, 5, 8, 11]] + 0.3 * rng.normal(size=(5, 8)))
    labels = np.asarray([0, 1, 2, 4, 3])
    scores = [{f"c{i}": float(rng.normal()) for i in range(6)} for _ in range(5)]
    runs, calls = rar_runs(labels, queries, memory_images, memory_labels, scores)
    run = ml_collections.ConfigDict({"seed": 0, "rar_modes": ("score",),
                                     "rar": {"shots": 2, "k": 4, "sweep": True}})
    metrics = runs.run(run, tmp_path)
    assert len(calls) == 1  # every prefix reuses the k candidates' scores
    candidates = np.load(tmp_path / "predictions.npz")["candidates"]
    assert metrics["recall@4"] == metrics["recall"] and metrics["rar_score_top1@4"] == metrics["rar_score_top1"]
    assert metrics["recall@1"] == metrics["knn_top1"] == metrics["rar_score_top1@1"]
    assert metrics["rar_score_top1_rare@4"] == metrics["rar_score_top1_rare"]
    for j in (1, 2, 3):
        prefix = candidates[:, :j]
        best = np.asarray([max(row, key=lambda label, r=r: scores[r][f"c{label}"]) for r, row in enumerate(prefix)])
        assert metrics[f"rar_score_top1@{j}"] == pytest.approx(np.mean(best == labels))
        assert metrics[f"recall@{j}"] == pytest.approx(np.mean((prefix == labels[:, None]).any(axis=1)))
    assert not any(key.endswith("@5") for key in metrics)
    run.rar.sweep = False
    assert not any("@" in key for key in runs.run(run, tmp_path))
