"""Compositional and long-caption benchmarks, read from the files each benchmark publishes.

Most are one test, `choice_correct`: K candidate texts scored against one image, right when the true
text wins. SugarCrepe, ARO (VG-Relation, VG-Attribution, COCO-/Flickr30k-Order) and Shapes World's
`eval_compositional` are that test with their own cases and averages; Winoground scores 2 images x 2
captions; long-caption retrieval (DOCCI) is recall@K with descriptions past most text contexts.

Images are decoded, cropped where the benchmark says (ARO's boxes), made RGB (transparency onto white)
and preprocessed for the model; each distinct image (or crop) and text is embedded once, images
`batch_size` at a time. A missing or unreadable image skips the cases that use it ("skipped/
missing_image", "skipped/corrupt_image"). Scores are fractions in [0, 1].
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import PIL.Image
from absl import logging
from etils import epath

from vlm_jax.config_lib import BENCHMARK_FILES, ConfigError, require_benchmark_path
from vlm_jax.data.decoding import decode_image
from vlm_jax.data.preprocess import PreprocessSpec, preprocess_image
from vlm_jax.evaluate.common import Evaluator, get_evaluator, register_evaluator, skip_metrics
from vlm_jax.evaluate.retrieval import retrieval_metrics
from vlm_jax.evaluate.views import View

SUGARCREPE_GROUPS = {"add": ("add_obj", "add_att"), "replace": ("replace_obj", "replace_att", "replace_rel"),
                     "swap": ("swap_obj", "swap_att")}
# The relations left out of ARO's published VG-Relation macro accuracy: the list `symmetric` of
# mertyg/vision-language-models-are-bows, "notebooks/Replicate ARO! VG-Relation, VG-Attribution.ipynb"
# ("_" for a space). Besides symmetric relations ("next to", "near", "with", "by", "of", ...) it names
# many others, so the macro runs over the relations that remain.
SYMMETRIC_RELATIONS = frozenset(name.replace("_", " ") for name in (
    "adjusting attached_to between bigger_than biting boarding brushing chewing cleaning climbing close_to "
    "coming_from coming_out_of contain crossing dragging draped_over drinking drinking_from driving driving_down "
    "driving_on eating_from eating_in enclosing exiting facing filled_with floating_in floating_on flying "
    "flying_above flying_in flying_over flying_through full_of going_down going_into going_through grazing_in "
    "growing_in growing_on guiding hanging_from hanging_in hanging_off hanging_over higher_than holding_onto "
    "hugging in_between jumping_off jumping_on jumping_over kept_in larger_than leading leaning_over leaving "
    "licking longer_than looking_in looking_into looking_out looking_over looking_through lying_next_to "
    "lying_on_top_of making mixed_with mounted_on moving on_the_back_of on_the_edge_of on_the_front_of "
    "on_the_other_side_of opening painted_on parked_at parked_beside parked_by parked_in parked_in_front_of "
    "parked_near parked_next_to perched_on petting piled_on playing playing_in playing_on playing_with pouring "
    "reaching_for reading reflected_on riding_on running_in running_on running_through seen_through "
    "sitting_behind sitting_beside sitting_by sitting_in_front_of sitting_near sitting_next_to sitting_under "
    "skiing_down skiing_on sleeping_in sleeping_on smiling_at sniffing splashing sprinkled_on stacked_on "
    "standing_against standing_around standing_behind standing_beside standing_in_front_of standing_near "
    "standing_next_to staring_at stuck_in surrounding swimming_in swinging talking_to topped_with touching "
    "traveling_down traveling_on tying typing_on underneath wading_in waiting_for walking_across walking_by "
    "walking_down walking_next_to walking_through working_in working_on worn_on wrapped_around wrapped_in "
    "by of near next_to with beside on_the_side_of around").split())
MIN_PAIR_COUNT = 25  # VG-Attribution averages the attribute pairs with at least this many cases, as ARO does
ORDER_MAX_WORDS = 30  # ARO cuts every Order option to 30 words
_READ_THREADS = 8  # PIL releases the GIL while it decodes and resizes


@dataclasses.dataclass(frozen=True)
class Case:
    """One test: K candidate `texts` for `image` (a key the loader reads; cases with equal keys share
    one embedding); `correct` indexes the true text; `group` names the case's category."""

    image: Hashable
    texts: tuple[str, ...]
    correct: int = 0
    group: str = ""


def _read(load: Callable[[Hashable], Any], key: Hashable, preprocess: PreprocessSpec):
    try:
        return preprocess_image(load(key), preprocess), None
    except FileNotFoundError:
        return None, "missing_image"
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        logging.warning("Skipping unreadable image %r: %s", key, error)
        return None, "corrupt_image"


def embed_images(view: View, items: Sequence, keys_of: Callable[[Any], Sequence[Hashable]], load, preprocess,
                 batch_size: int) -> tuple[np.ndarray, dict[Hashable, int], list, dict[str, int]]:
    """Embeds each distinct image of the items (`keys_of(item)`: its image keys; `load(key)` -> image)
    once, `batch_size` at a time. Returns unit float32 [U, D], {key: row}, the items whose images all
    read, and {bad-input kind: items skipped} (each counted by its first unreadable image)."""
    unique = list(dict.fromkeys(key for item in items for key in keys_of(item)))
    rows, failed, embeddings = {}, {}, []
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        for start in range(0, len(unique), batch_size):
            chunk, pixels = unique[start : start + batch_size], []
            for key, (image, kind) in zip(chunk, pool.map(lambda key: _read(load, key, preprocess), chunk)):
                if kind:
                    failed[key] = kind
                else:
                    rows[key] = len(rows)
                    pixels.append(image)
            if pixels:
                embeddings.append(np.asarray(view.images({"image": np.stack(pixels)}), np.float32))
    bad = [[failed[key] for key in keys_of(item) if key in failed] for item in items]
    skipped = dict(collections.Counter(kinds[0] for kinds in bad if kinds))
    kept = [item for item, kinds in zip(items, bad) if not kinds]
    if not kept:
        raise ValueError(f"No example could be scored ({len(items)} examples; skipped for their images: {skipped}).")
    return np.concatenate(embeddings), rows, kept, skipped


def embed_texts(view: View, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Embeds each distinct text once: unit float32 [U, D] and {text: row}."""
    unique = list(dict.fromkeys(texts))
    return np.asarray(view.prompts(unique), np.float32), {text: row for row, text in enumerate(unique)}


def choice_correct(view: View, cases: Sequence[Case], load: Callable[[Hashable], Any], preprocess: PreprocessSpec,
                   batch_size: int, ties_to_first: bool = False) -> tuple[np.ndarray, list[Case], dict[str, int]]:
    """Scores each case's texts against its image: right when the true text scores strictly above
    every other, or with `ties_to_first` when it is the first of the best (np.argmax: ARO's rule).

    Returns: bool [N] over the N cases whose image was read, those cases, {kind: cases skipped}.
    """
    images, image_rows, kept, skipped = embed_images(view, cases, lambda case: (case.image,), load, preprocess,
                                                     batch_size)
    text_embeddings, text_rows = embed_texts(view, [text for case in kept for text in case.texts])
    correct = np.zeros(len(kept), bool)
    for index, case in enumerate(kept):
        scores = text_embeddings[[text_rows[text] for text in case.texts]] @ images[image_rows[case.image]]
        correct[index] = (int(np.argmax(scores)) == case.correct if ties_to_first
                          else bool(scores[case.correct] > np.delete(scores, case.correct).max()))
    return correct, kept, skipped


def accuracy_by_group(correct: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """{group: accuracy over its cases}, groups in first-seen order."""
    groups = np.asarray(groups, dtype=object)
    return {group: float(correct[groups == group].mean()) for group in dict.fromkeys(groups.tolist())}


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


class _Benchmark:
    """Images under `image_dir`; run(): `cases()` scored by `choice_correct`, then `summarize`d."""

    ties_to_first = False
    lines = False  # the file holds one JSON object per line

    def __init__(self, preprocess: PreprocessSpec, file: str | epath.Path = "", image_dir: str | epath.Path = "",
                 batch_size: int = 256, max_examples: int = 0):
        self.preprocess, self.batch_size, self.max_examples = preprocess, int(batch_size), int(max_examples)
        self.file, self.image_dir = epath.Path(file), epath.Path(image_dir)

    def load(self, key: Hashable) -> PIL.Image.Image:
        """An RGB image: a file name under image_dir, or (name, (x, y, w, h)) cropped as ARO crops
        (`image.crop((x, y, x + w, y + h))`; outside the image is black)."""
        name, box = key if isinstance(key, tuple) else (key, None)
        image = PIL.Image.fromarray(decode_image((self.image_dir / name).read_bytes()))
        return image if box is None else image.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))

    def _head(self, entries: list) -> list:
        return entries[: self.max_examples] if self.max_examples else entries

    def _entries(self) -> Any:
        text = self.file.read_text("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()] if self.lines else json.loads(text)

    def evaluated(self, kept: Sequence[Case]) -> int:
        return len(kept)

    def run(self, view: View) -> dict[str, float]:
        cases = self.cases()
        correct, kept, skipped = choice_correct(view, cases, self.load, self.preprocess, self.batch_size,
                                                self.ties_to_first)
        return {**self.summarize(correct, kept, cases), **skip_metrics(skipped, self.evaluated(kept))}


@register_evaluator("sugarcrepe")
class SugarCrepeEvaluator(_Benchmark):
    """SugarCrepe: per category, accuracy of s(image, caption) > s(image, negative_caption).

    `file`: the folder holding `<category>.json` ({"<idx>": {filename, caption, negative_caption}}); `categories`:
    those to run (() = every file there); `max_examples` applies per category. Metrics: `<category>`,
    `mean` over the categories, and the group means `add`, `replace`, `swap`.
    """

    def __init__(self, categories: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        folder, known = self.file, [c for names in SUGARCREPE_GROUPS.values() for c in names]
        missing = [c for c in categories if c not in known or not (folder / f"{c}.json").exists()]
        if missing:
            raise ConfigError(f"SugarCrepe folder {str(folder)!r} has no {missing[0]}.json; categories are some of "
                              f"{known}.")
        self.files = {c: folder / f"{c}.json" for c in (categories or known) if (folder / f"{c}.json").exists()}

    def cases(self) -> list[Case]:
        return [Case(entry["filename"], (entry["caption"], entry["negative_caption"]), 0, category)
                for category, file in self.files.items()
                for entry in self._head(list(json.loads(file.read_text("utf-8")).values()))]

    def summarize(self, correct, kept, cases) -> dict[str, float]:
        accuracy = accuracy_by_group(correct, [case.group for case in kept])
        groups = {group: [accuracy[c] for c in categories if c in accuracy]
                  for group, categories in SUGARCREPE_GROUPS.items()}
        return {**accuracy, "mean": _mean(accuracy.values()), **{g: _mean(a) for g, a in groups.items() if a}}


class _VisualGenome(_Benchmark):
    """ARO's VG-Relation and VG-Attribution: the image cropped to the box, [false_caption, true_caption]."""

    def cases(self) -> list[Case]:
        return [Case((e["image_path"], (e["bbox_x"], e["bbox_y"], e["bbox_w"], e["bbox_h"])),
                     (e["false_caption"], e["true_caption"]), 1, self.group_of(e)) for e in self._head(self._entries())]

    def summarize(self, correct, kept, cases) -> dict[str, float]:
        counts = collections.Counter(case.group for case in cases)  # over the file's cases, read or not
        groups = np.asarray([case.group for case in kept], dtype=object)
        keep = np.asarray([self.keeps(group, counts[group]) for group in groups], bool)
        accuracy = accuracy_by_group(correct[keep], groups[keep].tolist())
        return {"macro": _mean(accuracy.values()), "micro": _mean(correct[keep]), self.count_name: float(len(accuracy))}


@register_evaluator("aro_relation")
class AroRelationEvaluator(_VisualGenome):
    """VG-Relation. Metrics: `macro` (mean accuracy over the relations not in SYMMETRIC_RELATIONS),
    `micro` (over their cases), `relations` (how many the macro averages)."""

    count_name = "relations"
    group_of = staticmethod(lambda entry: entry["relation_name"])
    keeps = staticmethod(lambda relation, count: relation not in SYMMETRIC_RELATIONS)


@register_evaluator("aro_attribution")
class AroAttributionEvaluator(_VisualGenome):
    """VG-Attribution. Metrics: `macro` (mean accuracy over the attribute pairs "a_b" with at least
    `min_count` cases in the file), `micro` (over their cases), `pairs` (how many the macro averages)."""

    count_name = "pairs"
    group_of = staticmethod(lambda entry: "_".join(entry["attributes"][:2]))

    def __init__(self, min_count: int = MIN_PAIR_COUNT, **kwargs):
        super().__init__(**kwargs)
        self.min_count = min_count

    def keeps(self, group: str, count: int) -> bool:
        return count >= self.min_count


# The default Order tagger's lexicon (spaCy's trained tagger, which ARO uses, is not available).
_CLOSED_CLASS = frozenset("""
a an the this that these those some any each every all both no another other such and or but nor so yet if than
then as of in on at to from by with without into onto over under above below behind beside besides between among
near through across along around against toward towards up down out off about after before during inside outside
underneath beneath upon via within while i you he she it we they me him her us them my your his its our their who
whom whose which what where when why how there here is are was were be been being am has have had having do does
did can could will would shall should may might must not very too also just only one two three four five six
seven eight nine ten several many few sits stands holds rides walks plays looks eats flies lays lies wears carries
watches throws catches swings waits runs talks drinks drives parks shows sit stand hold ride walk play look eat fly
lay lie wear carry watch throw catch swing wait run talk drink drive park show""".split())
_ADJECTIVES = frozenset("""
red orange yellow green blue purple pink brown black white grey gray silver gold golden big large small little
tiny huge tall short long old young new wooden plastic metal empty full open dark light bright busy clean dirty
wet dry hot cold snowy sunny cloudy grassy rocky sandy fresh giant round square""".split())
_ING_NOUNS = frozenset("building ceiling clothing painting railing awning morning evening something nothing".split())


def _tag(word: str) -> str:
    if word in _ADJECTIVES or (len(word) > 5 and word.endswith(("ful", "ous", "less", "ish", "ive"))):
        return "JJ"
    verb_form = len(word) > 4 and (word.endswith("ed") or word.endswith("ing") and word not in _ING_NOUNS)
    return "X" if word in _CLOSED_CLASS or not word[:1].isalpha() or verb_form else "NN"


def lexicon_tagger(tokens: Sequence[str]) -> list[str]:
    """Penn Treebank-like tags from a lexicon and suffix rules, not a trained tagger: "JJ" for listed
    adjectives and -ful/-ous/-less/-ish/-ive words; "X" for function words, numbers, listed verbs,
    -ing (but a few nouns) and -ed forms and punctuation; "NN" for every other word."""
    return [_tag(token.lower()) for token in tokens]


def pre_caption(caption: str, max_words: int = ORDER_MAX_WORDS) -> str:
    """ARO's `pre_caption`: lower case, .!"()*#:;~ to spaces, runs of spaces collapsed, cut to max_words."""
    caption = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", caption.lower())).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def order_options(caption: str, rng: np.random.Generator, tagger: Callable[[Sequence[str]], Sequence[str]]
                  = lexicon_tagger, max_words: int = ORDER_MAX_WORDS) -> tuple[str, ...]:
    """ARO's five Order options: the original, nouns and adjectives shuffled (each among themselves),
    all other tokens shuffled, tokens shuffled within trigrams, trigrams shuffled; each `pre_caption`ed.
    `tagger`: tokens -> Penn tags (NN* nouns, JJ* adjectives)."""
    tokens = re.findall(r"\w+(?:['-]\w+)*|[^\w\s]", caption)  # words and punctuation, as a word tokenizer
    tags = list(tagger(tokens))

    def shuffled_at(*position_lists):
        words = list(tokens)
        for positions in position_lists:
            for position, source in zip(positions, rng.permutation(positions)):
                words[position] = tokens[source]
        return words

    nouns = [i for i, tag in enumerate(tags) if tag.startswith("NN")]
    adjectives = [i for i, tag in enumerate(tags) if tag.startswith("JJ")]
    others = [i for i, tag in enumerate(tags) if not tag.startswith(("NN", "JJ"))]
    trigrams = [tokens[start : start + 3] for start in range(0, len(tokens), 3)]
    within = [word for trigram in trigrams for word in rng.permutation(trigram).tolist()]
    across = [word for index in rng.permutation(len(trigrams)) for word in trigrams[index]]
    options = [shuffled_at(nouns, adjectives), shuffled_at(others), within, across]
    return (pre_caption(caption, max_words), *(pre_caption(" ".join(words), max_words) for words in options))


@register_evaluator("coco_order")
@register_evaluator("flickr30k_order")
class OrderEvaluator(_Benchmark):
    """COCO-/Flickr30k-Order from a Karpathy test file ([{image, caption: [...]}]), image to text: each
    caption's five `order_options`, right when the original (option 0) scores highest, ties to it (ARO's
    argmax). Shuffles are seeded per caption by (seed, caption number). The perturbations follow ARO's
    rules but the default `lexicon_tagger` is not spaCy's, so scores are close to, not identical with,
    the published ones. Metric: `accuracy`."""

    ties_to_first = True

    def __init__(self, seed: int = 0, tagger=lexicon_tagger, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.tagger = int(seed), tagger

    def cases(self) -> list[Case]:
        pairs = self._head([(entry["image"], caption) for entry in self._entries() for caption in entry["caption"]])
        return [Case(image, order_options(caption, np.random.default_rng([self.seed, number]), self.tagger))
                for number, (image, caption) in enumerate(pairs)]

    def summarize(self, correct, kept, cases) -> dict[str, float]:
        return {"accuracy": float(correct.mean())}


@register_evaluator("winoground")
class WinogroundEvaluator(_Benchmark):
    """Winoground (`examples.jsonl`; images `<image_dir>/<image_0>.png`). Metrics, over the examples:
    `text`: s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1); `image`: s(c0, i0) > s(c0, i1) and
    s(c1, i1) > s(c1, i0); `group`: both."""

    lines = True

    def run(self, view: View) -> dict[str, float]:
        # The image fields name files without their extension ("ex_0_img_0" is images/ex_0_img_0.png).
        file = lambda name: name if re.search(r"\.(png|jpe?g)$", name, re.I) else f"{name}.png"  # noqa: E731
        examples = [(e, [file(e["image_0"]), file(e["image_1"])]) for e in self._head(self._entries())]
        images, image_rows, kept, skipped = embed_images(view, examples, lambda example: example[1], self.load,
                                                         self.preprocess, self.batch_size)
        texts, text_rows = embed_texts(view, [e[f"caption_{i}"] for e, _ in kept for i in (0, 1)])
        scores = np.stack([texts[[text_rows[e["caption_0"]], text_rows[e["caption_1"]]]]
                           @ images[[image_rows[f] for f in pair]].T for e, pair in kept])  # [N, caption, image]
        text = (scores[:, 0, 0] > scores[:, 1, 0]) & (scores[:, 1, 1] > scores[:, 0, 1])
        image = (scores[:, 0, 0] > scores[:, 0, 1]) & (scores[:, 1, 1] > scores[:, 1, 0])
        return {"text": float(text.mean()), "image": float(image.mean()), "group": float((text & image).mean()),
                **skip_metrics(skipped, len(kept))}


@register_evaluator("long_retrieval")
class LongRetrievalEvaluator(_Benchmark):
    """Long-caption retrieval over one split of DOCCI's `docci_descriptions.jsonlines` (example_id,
    split, image_file, description; one description per image). Metrics: recall@1/5/10 both ways
    (`retrieval_metrics`), `context_length` (the tokenizer's; longer descriptions are cut to it) and
    `truncated` (the share of descriptions longer than that, in tokens with the special ones)."""

    lines = True

    def __init__(self, tokenizer, split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if not hasattr(tokenizer, "backend"):
            raise ConfigError("long_retrieval needs the model's Tokenizer (vlm_jax.data.tokenizer) to count tokens.")
        self.tokenizer, self.split = tokenizer, split

    def run(self, view: View) -> dict[str, float]:
        rows = self._head([row for row in self._entries() if row["split"] == self.split])
        if not rows:
            raise ConfigError(f"{str(self.file)!r} has no descriptions of split {self.split!r}; set data.split.")
        images, image_rows, kept, skipped = embed_images(view, rows, lambda row: (row["image_file"],),
                                                         self.load, self.preprocess, self.batch_size)
        descriptions = [row["description"] for row in kept]
        texts, text_rows = embed_texts(view, descriptions)
        metrics = retrieval_metrics(images[[image_rows[row["image_file"]] for row in kept]],
                                    texts[[text_rows[text] for text in descriptions]], np.arange(len(kept)))
        lengths = np.asarray([len(encoding.ids) for encoding in self.tokenizer.backend.encode_batch(descriptions)])
        context = self.tokenizer.context_length
        return {**metrics, "context_length": float(context), "truncated": float((lengths > context).mean()),
                **skip_metrics(skipped, len(kept))}


@register_evaluator("shapes_compositional")
class ShapesCompositionalEvaluator(_Benchmark):
    """Shapes World's `eval_compositional` split, read as a `vlm_jax.data.pipeline` data section says:
    per hard-negative kind, accuracy of s(image, dense_caption) > s(image, negative). Metrics:
    `<kind>`, `mean`; `evaluated` counts images."""

    def __init__(self, data: Mapping[str, Any], categories: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        from vlm_jax.data.shapes_world import HARD_NEGATIVE_KINDS  # noqa: PLC0415 - registers the TFDS builder

        if set(categories) - set(HARD_NEGATIVE_KINDS):
            raise ConfigError(f"Shapes World kinds are {HARD_NEGATIVE_KINDS}; found categories {list(categories)}.")
        self.data, self.kinds, self.images = data, tuple(categories) or HARD_NEGATIVE_KINDS, {}

    def load(self, index: int) -> np.ndarray:
        return decode_image(self.images[index])

    def cases(self) -> list[Case]:
        from vlm_jax.data import pipeline  # noqa: PLC0415 - keeps TFDS out of this module's import

        pipeline.prepare_embedded(self.data)
        source = pipeline.make_source(self.data)
        cases = []
        for index in range(min(len(source), self.max_examples or len(source))):
            record = source[index]  # TFDS gives bytes: the image's PNG and UTF-8 texts
            self.images[index], positive = record["image"], record["dense_caption"].decode()
            cases.extend(Case(index, (positive, record["negatives"][kind].decode()), 0, kind)
                         for kind in self.kinds if record["negatives"][kind])
        if not cases:
            raise ConfigError(f"Shapes World split {self.data['split']!r} holds no hard negatives; use "
                              "eval_compositional.")
        return cases

    def evaluated(self, kept: Sequence[Case]) -> int:
        return len({case.image for case in kept})

    def summarize(self, correct, kept, cases) -> dict[str, float]:
        accuracy = accuracy_by_group(correct, [case.group for case in kept])
        return {**accuracy, "mean": _mean(accuracy.values())}


TYPES = (*BENCHMARK_FILES, "shapes_compositional")
# Where each benchmark ships its images, relative to the folder of its file (SugarCrepe: its folder).
_IMAGE_DIRS = {"sugarcrepe": "val2017", "aro_relation": "images", "aro_attribution": "images", "coco_order": "",
               "flickr30k_order": "", "winoground": "images", "long_retrieval": "images"}


def build(name: str, spec, preprocess: PreprocessSpec, tokenizer) -> Evaluator:
    """The evaluator of one eval spec (`suite.eval_spec`) of a type in TYPES."""
    where = f"evals.{name}"
    if spec.stored_dir:
        raise ConfigError(f"{where}: {spec.type} reads the benchmark's images, not stored embeddings; unset "
                          "stored_dir.")
    if spec.categories and spec.type not in ("sugarcrepe", "shapes_compositional"):
        raise ConfigError(f"{where}.categories applies to sugarcrepe and shapes_compositional only; unset it.")
    common = {"preprocess": preprocess, "batch_size": int(spec.batch_size), "max_examples": int(spec.max_examples)}
    if spec.type == "shapes_compositional":
        data = spec.data.to_dict()
        data.update(tfds_name=data["tfds_name"] or "shapes_world/default", split=data["split"] or "eval_compositional")
        return get_evaluator(spec.type, data=data, categories=tuple(spec.categories), **common)
    path = require_benchmark_path(spec, where)
    if spec.type == "sugarcrepe" and not path.is_dir():
        raise ConfigError(f"{where}.path must be the SugarCrepe folder that holds its seven JSON files.")
    if spec.type != "sugarcrepe" and path.is_dir():
        path = next(path / f for f in BENCHMARK_FILES[spec.type] if (path / f).exists())
    folder = path if spec.type == "sugarcrepe" else path.parent
    common["image_dir"] = epath.Path(spec.image_dir) if spec.image_dir else folder / _IMAGE_DIRS[spec.type]
    extra = {"sugarcrepe": {"categories": tuple(spec.categories)}, "coco_order": {"seed": int(spec.seed)},
             "flickr30k_order": {"seed": int(spec.seed)},
             "long_retrieval": {"tokenizer": tokenizer, "split": spec.data.split or "test"}}.get(spec.type, {})
    return get_evaluator(spec.type, file=path, **extra, **common)
