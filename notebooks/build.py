"""Writes the Colab notebooks of this folder from the cell sources below, outputs stripped.

    python notebooks/build.py            # (re)writes notebooks/*.ipynb
    python notebooks/build.py --check    # exits 1 naming every notebook that differs from its source

Each notebook opens with its "Open in Colab" badge, the setup cell (installs vlm_jax in Colab, finds
the experiment configs, prints the devices) and the size switch (SMOKE: the experiments' smoke
presets, as CI runs them; otherwise the default Shapes World presets). Cells shared by several
notebooks are written once here; cell ids are fixed, so a rebuild is byte-identical.
"""

from __future__ import annotations

import pathlib
import sys
import textwrap

import nbformat

REPOSITORY = "https://github.com/vlm-jax/vlm_jax"
GITHUB_PATH = REPOSITORY.removeprefix("https://github.com/")
COLAB_URL = f"https://colab.research.google.com/github/{GITHUB_PATH}/blob/main/notebooks/{{name}}.ipynb"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
HERE = pathlib.Path(__file__).resolve().parent

METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _source(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def badge(name: str) -> str:
    """The markdown of the "Open in Colab" badge of notebooks/<name>.ipynb."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({COLAB_URL.format(name=name)})"


SETUP = _source(f'''
    # In Colab, or wherever vlm_jax is not installed: install it with the extra of this runtime's
    # accelerator, and fetch the repository for its experiment configs. A local checkout installs nothing.
    import importlib.util
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    REPOSITORY = "{REPOSITORY}"


    def importable(module):
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package (`google`) is missing
            return False


    def accelerator_extra():
        """The vlm_jax extra of this runtime: "[tpu]", "[cuda]", or "" on CPU."""
        if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME"):
            return "[tpu]"
        if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0:
            return "[cuda]"
        return ""


    if importable("google.colab") or not importable("vlm_jax"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        f"vlm_jax{{accelerator_extra()}} @ git+{{REPOSITORY}}"], check=True)

    # The experiment configs (experiments/*.py) sit beside notebooks/ in a checkout; elsewhere
    # (Colab) a shallow clone of the repository brings them.
    REPO = pathlib.Path.cwd().resolve().parent
    if not (REPO / "experiments").is_dir():
        REPO = pathlib.Path.cwd().resolve() / "vlm_jax"
        if not (REPO / "experiments").is_dir():
            subprocess.run(["git", "clone", "-q", "--depth=1", REPOSITORY, str(REPO)], check=True)

    import jax

    print(jax.devices())
''')

SWITCH = _source('''
    # CI (CI=true) and VLM_JAX_SMOKE=1 run the experiments' smoke presets: tiny models, seconds each.
    # Otherwise the default Shapes World presets, sized to show each method's real effect.
    SMOKE = os.environ.get("CI") == "true" or os.environ.get("VLM_JAX_SMOKE") == "1"
    PRESET = "shapes,smoke=True" if SMOKE else "shapes"
    # The runs' workdirs: a rerun resumes from (or reads back) what they hold.
    WORKDIRS = pathlib.Path(os.environ.get("VLM_JAX_NOTEBOOK_WORKDIRS") or REPO / "workdirs" / "notebooks")

    import ml_collections
    from absl import logging

    from vlm_jax import config_lib, main

    logging.set_verbosity(logging.INFO)


    def experiment_config(name, smoke_rows=()):
        """experiments/<name>.py at this notebook's preset, as `--config=experiments/<name>.py:<preset>` loads
        it; under SMOKE only the rows (variants) `smoke_rows` when given, to keep CI short (the experiments'
        own tests run every row)."""
        config = config_lib.load_config_file(f"{REPO / 'experiments' / name}.py:{PRESET}")
        if SMOKE and smoke_rows:
            config.variants = ml_collections.ConfigDict({row: config.variants[row] for row in smoke_rows})
        return config


    def workdir_of(name):
        return WORKDIRS / (f"{name}_smoke" if SMOKE else name)


    print(f"preset {PRESET!r}, workdirs under {WORKDIRS}")
''')

TABLE = _source('''
    print((workdir / "results.txt").read_text())
''')

PLOTS = _source('''
    # The plots every run writes under <workdir>/plots/.
    from IPython.display import Image, display

    plots = sorted((workdir / "plots").glob("*.png"))
    for plot in plots:
        display(Image(filename=str(plot)))
    if not plots:
        print(f"no plots in {workdir / 'plots'}")
''')

BARS = _source('''
    import json

    import matplotlib.pyplot as plt
    import numpy as np

    results = json.loads((workdir / "results.json").read_text())
    labels = {"baseline": config.baseline_label, **{row: label.strip() for row, label in config.variant_labels.items()}}
    # The rows that ran, in the table's order.
    table_rows = [row for row in config.get("row_order", ()) if row in config.variants]
    table_rows += [row for row in config.variants if row not in table_rows]


    def plot_bars(rows, metrics, title, group_by_row=False):
        """Bars of results.json in %: per metric a group of rows (mean ± sample std over seeds), or per row
        a group of metrics; rows and metrics map results' names to labels."""
        means = np.asarray([[100 * results[f"{row}/{metric}"] for metric in metrics] for row in rows])
        # A row of one seed has no std (nan in results.json): its error bar has zero length.
        stds = np.nan_to_num([[100 * results.get(f"{row}/{metric}/std", 0.0) for metric in metrics] for row in rows])
        groups, bars = (rows, metrics) if group_by_row else (metrics, rows)
        if group_by_row:
            means, stds = means.T, stds.T
        width = 0.8 / len(bars)
        _, axis = plt.subplots(figsize=(2 + 1.4 * len(groups), 3.6))
        for index, label in enumerate(bars.values()):
            axis.bar(np.arange(len(groups)) + index * width, means[index], width, yerr=stds[index], capsize=2,
                     label=label)
        axis.set_xticks(np.arange(len(groups)) + width * (len(bars) - 1) / 2, list(groups.values()))
        axis.set_ylabel("%")
        axis.set_title(title)
        axis.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
        plt.show()
''')


def _run(experiment: str, smoke_rows: tuple[str, ...]) -> str:
    return _source(f'''
        config = experiment_config("{experiment}", smoke_rows={smoke_rows!r})
        workdir = workdir_of("{experiment}")
        results = main.run(config, str(workdir))
    ''')


def _rows_run(rows: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "the rows `a`, `b` and `c` run"."""
    names = " and ".join(", ".join(f"`{row}`" for row in rows).rsplit(", ", 1))
    return f"the rows {names} run" if len(rows) > 1 else f"the row {names} runs"


def _markdown(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(_source(text))


def _code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(_source(text))


def _header(name: str, title: str, about: str) -> list[nbformat.NotebookNode]:
    return [_markdown(f"# {title}\n\n{badge(name)}\n\n{_source(about)}"), _code(SETUP), _code(SWITCH)]


def method_notebook(name: str, title: str, about: str, experiment: str, runs: str, smoke_rows: tuple[str, ...],
                    plot: str) -> list:
    """A method's tour: what it does, its experiment run (only `smoke_rows` under SMOKE), the table, the
    run's plots, one plot of its effect."""
    return [
        *_header(name, title, about),
        _markdown(f"## The experiment\n\n{_source(runs)}\n\nUnder SMOKE (CI) only {_rows_run(smoke_rows)}."),
        _code(_run(experiment, smoke_rows)),
        _markdown("The table the run printed, as it wrote it to `results.txt` (with the stages' wall times):"),
        _code(TABLE),
        _markdown("## Plots\n\nThe plots the run wrote beside `results.json`:"),
        _code(PLOTS),
        _markdown("The method's effect, read from `results.json`:"),
        _code(BARS + "\n\n\n" + _source(plot)),
    ]


QUICKSTART_ABOUT = '''
    vlm_jax in five steps on **Shapes World**, the procedural dataset the package generates itself:
    load a CLIP, render an image, classify it zero-shot, search a memory of image-text pairs with it,
    then train RECO's fusion on top of the frozen CLIP and compare the two.

    Set `CLIP_DIR` to a Hugging Face `CLIPModel` or `SiglipModel` directory to use those weights;
    otherwise the embedded Shapes World CLIP is trained once into the shared cache
    (`$VLM_JAX_CACHE`, else `~/.cache/vlm_jax`) and reused by every experiment.
'''

QUICKSTART_CLIP = '''
    from vlm_jax.methods import runner
    from vlm_jax.weights import load_pretrained

    # RECO's config names the base CLIP it runs on (experiments/clip.py at this preset); CLIP_DIR
    # replaces it with a pretrained directory.
    reco_config = experiment_config("reco")
    CLIP_DIR = os.environ.get("CLIP_DIR", "")
    reco_config.clip_dir = CLIP_DIR
    clip_dir = runner.base_model_dir(reco_config, None)  # trains the Shapes World CLIP on first use
    pretrained = load_pretrained(clip_dir)
    print(f"{pretrained.config.kind} from {clip_dir}: image size {pretrained.preprocess.image_size}, "
          f"embedding width {pretrained.config.embed_dim}")
'''

QUICKSTART_IMAGE = '''
    import matplotlib.pyplot as plt
    import numpy as np

    from vlm_jax.data import shapes_world

    # Every example is a function of (world config, split, index); smoke runs use the small "test" world.
    world_name = "test" if SMOKE else "default"
    world = shapes_world.World(shapes_world.get_config(world_name))
    entities = shapes_world.entities(world_name)
    entity = entities[int(shapes_world.frequency_ids(world_name)["common"][0])]
    example = world.example("eval_classification", entity.id * world.config.eval_per_entity)
    image = shapes_world.decode_png(example["image"])  # uint8 [H, W, 3]

    plt.figure(figsize=(3, 3))
    plt.imshow(image)
    plt.axis("off")
    plt.title(f"{entity.name}: {entity.description}", fontsize="small")
    plt.show()
    print(example["dense_caption"])
'''

QUICKSTART_ZERO_SHOT = '''
    from vlm_jax.data.preprocess import preprocess_images
    from vlm_jax.evaluate.views import pixel_view
    from vlm_jax.evaluate.zero_shot import zero_shot_classifier

    view = pixel_view(pretrained.model, pretrained.tokenizer)
    # The Shapes World CLIP learnt the entities' invented names; other weights can only read what they look like.
    class_names = shapes_world.attribute_phrases() if CLIP_DIR else shapes_world.class_names()
    classifier = zero_shot_classifier(view.prompts, class_names, shapes_world.prompt_templates())  # [C, D]
    image_embedding = view.images({"image": preprocess_images([image], pretrained.preprocess)})  # [1, D]
    logits = float(np.exp(pretrained.model.logit_scale.get_value())) * (image_embedding @ classifier.T)[0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top5 = np.argsort(-probabilities)[:5]

    plt.figure(figsize=(5, 2.5))
    names, phrases = shapes_world.class_names(), shapes_world.attribute_phrases()
    plt.barh([f"{names[c]}: {phrases[c]}" for c in top5][::-1], probabilities[top5][::-1])
    plt.xlabel("probability")
    plt.title(f"zero-shot top-5; truth: {names[entity.id]}: {phrases[entity.id]}")
    plt.show()
'''

QUICKSTART_MEMORY = '''
    from vlm_jax.data.pipeline import read_images
    from vlm_jax.memory.index import build_index
    from vlm_jax.memory.store import load_memory

    # RECO's memory (the `memory` split's images with their "a photo of a <name>." texts), its texts and
    # labels kept for display, embedded once by the frozen CLIP (a rerun reuses it).
    memory_config = ml_collections.ConfigDict(reco_config.memory.to_dict())
    memory_config.keep_texts = True
    memory_config.data.label_key = "label"
    memory_dir = workdir_of("quickstart") / "memory"
    memory = load_memory(runner.build_memory_stage(memory_config, clip_dir, memory_dir))
    print(memory)

    # RECO's uni-modal search: the image's nearest memory images, whose texts it would receive.
    index = build_index({"backend": "exact"}, memory.image_embeddings)
    scores, rows = index.search(image_embedding, k=6)  # [1, 6] each
    _, axes = plt.subplots(1, 6, figsize=(12, 2.8))
    for axis, row, score, neighbour in zip(axes, rows[0], scores[0],
                                           read_images(memory_config.data, memory.indices[rows[0]])):
        axis.imshow(neighbour)
        axis.axis("off")
        axis.set_title(f"{memory.texts[row]}\\n{phrases[memory.labels[row]]}\\ncos {score:.2f}", fontsize="x-small")
    plt.show()
'''

QUICKSTART_RECO = '''
    # The memory above is RECO's: the run reuses it and the cached CLIP, trains the fusion on the frozen
    # CLIP and evaluates CLIP and CLIP+RECO side by side. Only the method's row: reco.ipynb adds its ablations.
    reco_config.reco.memory_dir = str(memory_dir)
    reco_config.variants = ml_collections.ConfigDict({"reco": {}})
    workdir = workdir_of("quickstart") / "reco"
    results = main.run(reco_config, str(workdir))
'''


def quickstart() -> list:
    return [
        *_header("quickstart", "vlm_jax quick start", QUICKSTART_ABOUT),
        _markdown("## A CLIP"),
        _code(QUICKSTART_CLIP),
        _markdown("## One Shapes World image\n\nAn entity is a (shape, colour, pattern) triple with an invented "
                  "name; this is one of the common ones, which the CLIP's training captions name often."),
        _code(QUICKSTART_IMAGE),
        _markdown("## Zero-shot classification\n\nEvery entity's prompts (\"a photo of a {}.\" and five more) "
                  "averaged into a classifier, scored against the image embedding:"),
        _code(QUICKSTART_ZERO_SHOT),
        _markdown("## A memory, searched with the image"),
        _code(QUICKSTART_MEMORY),
        _markdown("## RECO on top\n\nThe `reco` experiment at this preset (`experiments/reco.py`), on the memory "
                  "built above:"),
        _code(QUICKSTART_RECO),
        _code(TABLE),
    ]


NOTEBOOKS = {
    "quickstart": quickstart,
    "reco": lambda: method_notebook(
        "reco", "RECO: retrieval-enhanced contrastive models",
        '''
        RECO (Iscen et al., ICLR 2024) keeps a CLIP frozen and refines its embeddings with knowledge held
        outside its parameters: a memory of image-text pairs. An image searches the memory's *images* and
        receives the *texts* paired with its nearest neighbours (uni-modal search, cross-modal fusion); a
        text does the converse. A one-layer transformer per modality fuses the query with what it
        retrieved, and only these fusions train, so rare entities the CLIP barely saw become recognizable
        from what the memory says about them.
        ''',
        "reco",
        '''
        `experiments/reco.py`: the frozen Shapes World CLIP (cached), its memory, the training pairs and
        eval sets embedded once, then RECO and two ablations (cross-modal search, mean instead of fusion)
        trained and evaluated against the frozen CLIP: zero-shot top-1 over all, common, rare and novel
        entities and image-text retrieval.
        ''',
        ("reco",),
        '''
        plot_bars({row: labels[row] for row in ("baseline", *table_rows)},
                  {metric: label for metric, label in config.table}, "CLIP (frozen) vs CLIP+RECO")
        ''',
    ),
    "rar": lambda: method_notebook(
        "rar", "RAR: retrieving and ranking",
        '''
        RAR (Liu et al.) pairs a CLIP's recall with a multimodal LM's precision: the CLIP retrieves the k
        nearest class names from a memory (few-shot images of every class, or the class names
        themselves), and the MLLM, shown the image and those candidates, ranks them. Its answer is
        parsed, and every fallback (a name outside the list, a short list) is counted; a second mode
        ranks by the MLLM's likelihood of each name.
        ''',
        "rar",
        '''
        `experiments/rar.py`: the frozen Shapes World CLIP, few-shot memories of N shots per entity, and
        the embedded MLLM (the captioner of `experiments/captioner.py`, fine-tuned on ranking data made
        from the memory), both trained once into the shared cache. Each setting gives CLIP+kNN's top-1,
        the recall of the k candidates (RAR's ceiling) and RAR's top-1 by ranking and by scoring.
        ''',
        ("rar", "shots_01", "zero_shot"),
        '''
        plot_bars({row: labels[row] for row in table_rows},
                  {"knn_top1": "CLIP+kNN", "rar_top1": "RAR (ranking)", "rar_score_top1": "RAR (score)",
                   "recall": "recall@k"}, "CLIP+kNN vs RAR per setting", group_by_row=True)
        ''',
    ),
    "recap": lambda: method_notebook(
        "recap", "Recaptioned-data CLIP",
        '''
        Web alt-text rarely says which attribute belongs to which object. Recaptioning the training images
        with a multimodal LM (Stone et al., CVPR 2025; Recap-DataComp-1B) gives dense, grounded captions,
        and a CLIP trained on them binds attributes to objects better. Mixing originals back in (each
        example keeps its original caption with p = 0.8) keeps zero-shot classification.
        ''',
        "recap",
        '''
        `experiments/recap.py`: the embedded captioner recaptions the first pretrain images, then every row
        fine-tunes the same base CLIP with the same budget on weak captions, recaptions only, their
        mixture and the true dense captions (the oracle). Columns: Shapes World's hard negatives by kind,
        retrieval R@1 and zero-shot top-1.
        ''',
        ("weak", "recap"),
        '''
        plot_bars({row: labels[row] for row in ("baseline", *table_rows)},
                  {"compositional/swap_attribute": "swap attribute", "compositional/swap_relation": "swap relation",
                   "shapes_retrieval/image_retrieval_recall@1": "T->I R@1", "shapes/top1": "zero-shot"},
                  "What the training captions teach")
        ''',
    ),
    "grain": lambda: method_notebook(
        "grain", "GRAIN: grounding descriptions in images",
        '''
        GRAIN (Halbe et al., WACV 2026) trains a CLIP to see the parts a description names: region queries
        decoded from the image tower's tokens are matched to annotated boxes (Hungarian matching, L1 and
        GIoU losses) and aligned with a short description of each region, beside the global caption loss.
        Classifying by description ("a zorvid, which is a striped red star") then reaches concepts the
        training captions never named.
        ''',
        "grain_clip",
        '''
        `experiments/grain_clip.py`: every row fine-tunes the same base CLIP with the same data and steps:
        the plain CLIP objective, GRAIN on Shapes World's true regions, GRAIN on the annotation pipeline's
        regions (the embedded captioner describing each crop), and two ablations. Columns: classification
        by description of novel entities (alone and with GRAIN's region score), common entities, by name,
        and the matched boxes' quality.
        ''',
        ("clip", "grain"),
        '''
        plot_bars({row: labels[row] for row in ("baseline", *table_rows)},
                  {metric: label for metric, label in config.table[:5]}, "CLIP vs GRAIN by description and boxes")
        ''',
    ),
}


def notebook(name: str) -> str:
    """The text of notebooks/<name>.ipynb: the cells of NOTEBOOKS[name], fixed ids, no outputs."""
    cells = NOTEBOOKS[name]()
    for number, cell in enumerate(cells):
        cell.id = f"{name}-{number:02d}"
    document = nbformat.v4.new_notebook(cells=cells, metadata=METADATA)
    nbformat.validate(document)
    return nbformat.writes(document) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = notebook(name)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
