"""vlm_jax.mllm.annotate, vlm_jax.mllm.detector and vlm_jax.data.annotations: description parsing, the score
threshold and top-k rule, the per-id rewrite choice, resumption, the file detector, the annotation reader's
errors, the crops mode against Shapes World's ground truth, and the config checks.

MLLMs and detectors are fakes with known answers and scores; corpora are small ArrayRecord files (the
recaption tests' `make_corpus`) or the embedded `shapes_world/test` build.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from test_recaption import captioner_export, make_corpus  # noqa: F401 - a fixture

from vlm_jax.config_lib import ConfigError, load_config_file
from vlm_jax.data import annotations as annotations_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.mllm import annotate as an
from vlm_jax.mllm import detector as det

SCORES = [0.9, 0.2, 0.31, 0.3, 0.95, 0.5, 0.6, 0.7, 0.4, 0.1]  # one per description "thing 0" ... "thing 9"
DESCRIBE = an.DEFAULT_PROMPTS["describe"].format(max_descriptions=10)


class ListingMLLM:
    """Answers the describe prompt with a numbered list of 10 things; a text rewrite with "rewritten <caption>"
    (image None); raises on call number `fail_on` (1-based)."""

    def __init__(self, fail_on: int = 0):
        self.calls: list[tuple[list, list]] = []
        self.fail_on = fail_on

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        self.calls.append((list(images), list(prompts)))
        if len(self.calls) == self.fail_on:
            raise RuntimeError("the MLLM went away")
        answers = []
        for image, prompt in zip(images, prompts):
            if prompt == DESCRIBE:
                assert image is not None
                answers.append("Descriptions:\n" + "\n".join(f"{i + 1}. thing {i}" for i in range(10)))
            else:
                assert image is None and prompt.startswith("Rewrite")
                answers.append("rewritten " + prompt.rsplit("Caption: ", 1)[1])
        return answers


class ScoredDetector:
    """Every query i of an image gets box (i/20, i/20, i/20 + 0.5, i/20 + 0.5) scored SCORES[i]; image ids in
    `low` score 0.3 at most (nothing kept)."""

    def __init__(self, low=()):
        self.low = set(low)
        self.seen: list[str] = []

    def detect(self, images, queries, ids):
        results = []
        for texts, identifier in zip(queries, ids):
            self.seen.append(identifier)
            assert list(texts) == [f"thing {i}" for i in range(10)]
            offsets = np.arange(len(texts)) / 20
            boxes = np.stack([offsets, offsets, offsets + 0.5, offsets + 0.5], axis=1)
            scores = np.minimum(SCORES, 0.3) if identifier in self.low else np.asarray(SCORES)
            results.append(det.Detections(boxes, scores, np.arange(len(texts))))
        return results


def image_section(data, **overrides):
    values = {"data": data, "mode": "image", "batch_size": 4, "shard_size": 8, "progress": False,
              "rewrite_input": "text", "rewrite_p": 0.5}
    values.update(overrides)
    return values


def shard_lines(out) -> list[dict]:
    lines = []
    for name in sorted(os.listdir(out)):
        if name.startswith(an.SHARD_PREFIX):
            with open(os.path.join(out, name), encoding="utf-8") as file:
                lines.extend(json.loads(line) for line in file)
    return lines


# -- descriptions -------------------------------------------------------------------------------------------------


def test_parse_descriptions_splits_strips_dedupes_and_drops():
    answer = ("Here are the descriptions:\n1. a red star\n2) A red star.\n3. \"a blue disc\"; a green square\n"
              "- " + " ".join(["word"] * 13) + "\n\n* a purple cross\n\u2022 a grey ring")
    assert an.parse_descriptions(answer) == ["a red star", "a blue disc", "a green square", "a purple cross",
                                             "a grey ring"]
    assert an.parse_descriptions(answer, max_descriptions=2) == ["a red star", "a blue disc"]
    assert an.parse_descriptions("1. a red star 2. a blue disc") == ["a red star", "a blue disc"]
    assert an.parse_descriptions("a small solid orange circle") == ["a small solid orange circle"]
    assert an.parse_descriptions("a b c d", max_words=3) == []
    assert an.parse_descriptions("") == [] and an.parse_descriptions(" ;\n - ") == []


def test_scene_captions_are_trimmed_to_their_first_object_without_size():
    from vlm_jax.data.shapes_world import world

    cut, drop = world.RELATIONS, world.SIZES
    caption = "a large striped red star to the left of a small solid blue ring above a large dotted black cross"
    assert an.trim_description(caption, cut, drop) == "a striped red star"
    assert an.trim_description("a Small solid Blue ring", cut, drop) == "a solid Blue ring"
    assert an.trim_description("a dotted black cross", cut, drop) == "a dotted black cross"
    assert an.trim_description("a boveline star", ("above",), ()) == "a boveline star"  # whole words only
    # Long scene captions (15 words) fit the word limit once trimmed; without the trim they are dropped.
    assert an.parse_descriptions(caption, cut=cut, drop=drop) == ["a striped red star"]
    assert an.parse_descriptions(caption) == []
    assert an.parse_descriptions("a large ring above a ring", cut=cut, drop=drop) == ["a ring"]


# -- the score threshold and top-k --------------------------------------------------------------------------------


def test_keep_is_strictly_above_the_threshold_and_the_best_max_boxes():
    detections = det.Detections(np.zeros((10, 4)), SCORES, np.arange(10))
    kept = detections.keep(0.3, 5)
    np.testing.assert_allclose(kept.scores, [0.95, 0.9, 0.7, 0.6, 0.5])
    assert kept.queries.tolist() == [4, 0, 7, 6, 5] and kept.queries.dtype == np.int32
    assert kept.keep(0.3, 2).queries.tolist() == [4, 0]
    assert len(detections.keep(0.95, 5)) == 0 and len(det.Detections.empty()) == 0


def test_the_pipeline_keeps_the_top_five_above_the_threshold_with_the_descriptions_that_fired_them(tmp_path):
    data = make_corpus(tmp_path / "corpus", 12)
    out = str(tmp_path / "out")
    detector = ScoredDetector(low={"5"})
    summary = an.annotate(image_section(data, rewrite_p=0.0), ListingMLLM(), detector, out)
    assert summary["written"] == 12 and summary["kept"] == 11 and summary["rejected"] == {"no_boxes": 1}
    assert summary["boxes_per_image"] == {"5": 11} and summary["remaining"] == 0
    annotations = annotations_lib.read_annotations(out)
    assert sorted(annotations, key=int) == [str(i) for i in range(12) if i != 5]
    annotation = annotations["0"]
    assert annotation.descriptions == ("thing 4", "thing 0", "thing 7", "thing 6", "thing 5")
    np.testing.assert_allclose(annotation.scores, [0.95, 0.9, 0.7, 0.6, 0.5], atol=1e-6)
    np.testing.assert_allclose(annotation.boxes[0], [0.2, 0.2, 0.7, 0.7], atol=1e-6)  # box of query 4
    assert annotation.caption == "alt text of record 0"  # rewrite_p = 0: the original
    rejected = [line for line in shard_lines(out) if line["rejected"]]
    assert rejected == [{"id": "5", "index": 5, "boxes": [], "descriptions": [], "scores": [], "rejected": "no_boxes"}]


# -- captions: the original or a rewrite --------------------------------------------------------------------------


def test_the_rewrite_choice_is_about_half_and_the_same_for_an_id_every_time():
    ids = [str(i) for i in range(400)]
    chosen = [an.rewrites(identifier, 0, 0.5) for identifier in ids]
    assert 170 <= sum(chosen) <= 230
    assert chosen == [an.rewrites(identifier, 0, 0.5) for identifier in ids]
    assert chosen != [an.rewrites(identifier, 1, 0.5) for identifier in ids]  # the seed changes the draw
    assert not any(an.rewrites(identifier, 0, 0.0) for identifier in ids)
    assert all(an.rewrites(identifier, 0, 1.0) for identifier in ids)


def test_captions_are_the_original_or_a_text_only_rewrite_by_the_per_id_rule(tmp_path):
    count = 40
    data = make_corpus(tmp_path / "corpus", count, corrupt=(3,))
    out = str(tmp_path / "out")
    mllm = ListingMLLM()
    summary = an.annotate(image_section(data, seed=7), mllm, ScoredDetector(), out)
    annotations = annotations_lib.read_annotations(out)
    expected = {str(i) for i in range(count) if i != 3 and an.rewrites(str(i), 7, 0.5)}
    assert 0 < len(expected) < count - 1 and summary["rewritten"] == len(expected)
    for identifier, annotation in annotations.items():
        original = f"alt text of record {identifier}"
        assert annotation.caption == (f"rewritten {original}" if identifier in expected else original)
    assert summary["rejected"] == {"corrupt_image": 1} and "3" not in annotations
    rewrite_prompts = [prompt for _, prompts in mllm.calls for prompt in prompts if prompt != DESCRIBE]
    assert len(rewrite_prompts) == len(expected)


# -- resumption ---------------------------------------------------------------------------------------------------


def test_a_run_that_dies_after_its_first_shard_resumes_and_every_id_appears_once(tmp_path):
    count = 30
    data = make_corpus(tmp_path / "corpus", count, corrupt=(12,))
    out = str(tmp_path / "out")
    section = image_section(data, rewrite_p=0.0, batch_size=4, shard_size=8)
    with pytest.raises(RuntimeError, match="went away"):  # calls 1-2 finish shard 0, call 3 fails
        an.annotate(section, ListingMLLM(fail_on=3), ScoredDetector(low={"20"}), out)
    first = shard_lines(out)
    assert sorted(line["index"] for line in first) == list(range(8))
    assert not os.path.exists(os.path.join(out, an.SUMMARY_FILE))
    detector = ScoredDetector(low={"20"})
    summary = an.annotate(section, ListingMLLM(), detector, out)
    assert sorted(detector.seen, key=int) == [str(i) for i in range(8, count) if i != 12]  # only what was left
    lines = shard_lines(out)
    assert sorted(line["index"] for line in lines) == list(range(count))
    assert sorted(line["id"] for line in lines) == sorted(str(i) for i in range(count))
    assert summary["written"] == count and summary["kept"] == count - 2
    assert summary["rejected"] == {"corrupt_image": 1, "no_boxes": 1}
    again = ListingMLLM()
    assert an.annotate(section, again, ScoredDetector(), out)["written"] == count and again.calls == []
    with pytest.raises(UserError, match="rewrite_p"):  # other content settings in the same directory
        an.annotate({**section, "rewrite_p": 0.5}, ListingMLLM(), ScoredDetector(), out)


# -- the file detector and the annotation format -------------------------------------------------------------------


def test_file_detector_round_trip_matches_stored_descriptions_to_queries(tmp_path):
    path = tmp_path / "boxes.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        annotations_lib.write_annotation_line(file, "a", [[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 1.0]],
                                              ["a red star", "a blue disc"], [0.8, 0.6], caption="two shapes")
        annotations_lib.write_annotation_line(file, 7, [[0.0, 0.0, 1.0, 1.0]], ["a green square"], [0.4])
        rejected = {"id": "x", "boxes": [], "descriptions": [], "scores": [], "rejected": "no_boxes"}
        file.write(json.dumps(rejected) + "\n")
    read = annotations_lib.read_annotations(str(path))
    assert sorted(read) == ["7", "a"] and read["a"].caption == "two shapes" and read["7"].caption is None
    np.testing.assert_allclose(read["a"].boxes, [[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 1.0]], atol=1e-6)
    assert read["a"].boxes.dtype == np.float32 and read["a"].scores.dtype == np.float32

    detector = det.make_detector({"backend": "file", "path": str(path)})
    image = np.zeros((8, 8, 3), np.uint8)
    found = detector.detect([image] * 3, [["A blue disc.", "a cat", "a red star"], ["a cat"], ["a dog"]],
                            ["a", "7", "missing"])
    assert found[0].queries.tolist() == [2, 0]  # best first: the star (0.8) is query 2, the disc query 0
    np.testing.assert_allclose(found[0].scores, [0.8, 0.6])
    np.testing.assert_allclose(found[0].boxes[0], [0.1, 0.1, 0.4, 0.5], atol=1e-6)
    assert len(found[1]) == 0 and len(found[2]) == 0 and detector.missing == 1

    plain = tmp_path / "plain.jsonl"  # boxes without descriptions: returned for the queries in order
    plain.write_text(json.dumps({"id": "p", "boxes": [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 1, 1]],
                                 "scores": [0.2, 0.9, 0.5]}) + "\n")
    found = det.FileDetector(str(plain)).detect([image], [["q0", "q1"]], ["p"])[0]
    assert found.queries.tolist() == [1, 0] and found.scores.tolist() == pytest.approx([0.9, 0.2])
    with pytest.raises(UserError, match="descriptions"):  # the reader of training annotations needs them
        annotations_lib.read_annotations(str(plain))


GOOD = {"id": "1", "boxes": [[0.1, 0.2, 0.3, 0.4]], "descriptions": ["a red star"], "scores": [0.9]}


@pytest.mark.parametrize("line, message", [
    ({**GOOD, "descriptions": ["a red star", "a blue disc"]}, "1 boxes and 2 descriptions"),
    ({**GOOD, "scores": [0.9, 0.8]}, "1 boxes and 2 scores"),
    ({**GOOD, "boxes": [[10, 20, 30, 40]]}, r"out of \[0, 1\]"),
    ({**GOOD, "boxes": [[0.5, 0.2, 0.3, 0.4]]}, "x1 < x0"),
    ({**GOOD, "boxes": [[0.1, 0.4, 0.3, 0.2]]}, "y1 < y0"),
    ({**GOOD, "scores": [float("nan")]}, "not finite"),
    ({**GOOD, "boxes": [[0.1, 0.2, float("inf"), 0.4]]}, "not finite"),
    ({**GOOD, "boxes": [[0.1, 0.2, 0.3]]}, r"not \[x0, y0, x1, y1\]"),
    ({key: value for key, value in GOOD.items() if key != "id"}, "no 'id' field"),
    ("{not json", "not a JSON object"),
])
def test_a_malformed_annotation_line_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    text = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps({**GOOD, "id": "0"}) + "\n" + text + "\n")
    with pytest.raises(UserError, match=message) as error:
        annotations_lib.read_annotations(str(path))
    assert str(error.value).startswith(f"{path}:2: ") and "\n" not in str(error.value)


def test_an_id_in_two_lines_and_an_empty_glob_are_user_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(UserError, match=r"b\.jsonl:2: image id '1' is annotated twice"):
        annotations_lib.read_annotations(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match="match no file"):
        annotations_lib.read_annotations(str(tmp_path / "none-*.jsonl"))
    with pytest.raises(UserError, match="out of"):
        annotations_lib.write_annotation_line(io.StringIO(), "1", [[0, 0, 2, 2]], ["a star"], [1.0])


# -- crops mode on Shapes World ------------------------------------------------------------------------------------


def test_crops_mode_on_shapes_world_is_compared_with_the_ground_truth(tmp_path):
    limit = 12
    config = load_config_file("experiments/annotate.py:shapes,smoke=True")
    section = config.annotate
    section.update(limit=limit, batch_size=5, shard_size=8, progress=False)
    section.crop.size = 48  # crops are 48 px, the whole images 32 px: the fake tells them apart
    section.detector.max_boxes = 10
    pipeline.prepare_embedded(section.data)
    source = pipeline.make_source(section.data)
    truth = {str(int(source[i]["index"])): source[i] for i in range(limit)}
    crops = [desc.decode() for i in range(limit) for desc in source[i]["regions"]["description"]]
    silent = str(int(source[2]["index"]))  # every crop of this image gets an empty answer: no_boxes
    silent_crops = len(source[2]["regions"]["description"])
    first_of_silent = sum(len(source[i]["regions"]["description"]) for i in range(2))

    class CropMLLM:
        def __init__(self):
            self.crop, self.wholes = 0, 0

        def generate(self, images, prompts, max_tokens=64, *, schema=None):
            assert set(prompts) == {an.SHAPES_WORLD_PROMPT}
            answers = []
            for image in images:
                if image.shape[0] == 32:  # a rewrite: the ungrounded caption of the whole image
                    self.wholes += 1
                    answers.append("a small solid red star on the grey ground")
                    continue
                assert image.shape == (48, 48, 3)
                number, self.crop = self.crop, self.crop + 1
                if first_of_silent <= number < first_of_silent + silent_crops:
                    answers.append("")
                else:  # the true description for even crops, a wrong one for odd crops
                    answers.append(crops[number] if number % 2 == 0 else "no such shape")
            return answers

    mllm = CropMLLM()
    out = str(tmp_path / "out")
    summary = an.annotate(section, mllm, None, out)
    assert mllm.crop == len(crops)
    assert summary["rejected"] == {"no_boxes": 1} and summary["kept"] == limit - 1
    answered = [n for n in range(len(crops)) if not first_of_silent <= n < first_of_silent + silent_crops]
    right = sum(n % 2 == 0 for n in answered)
    annotations = annotations_lib.read_annotations(out)
    assert silent not in annotations and sum(len(a) for a in annotations.values()) == len(answered)
    comparison = an.compare_with_ground_truth(annotations, truth)
    assert comparison["boxes"] == len(answered) and comparison["correct"] == right
    assert comparison["description_accuracy"] == pytest.approx(right / len(answered))
    assert comparison["mean_iou"] == pytest.approx(1.0, abs=1e-5) and comparison["matched_fraction"] == 1.0
    assert summary["ground_truth"]["description_accuracy"] == pytest.approx(right / len(answered))
    rewritten = {i for i in annotations if an.rewrites(i, 0, 0.5)}
    assert summary["rewritten"] == len(rewritten) == mllm.wholes
    for identifier, annotation in annotations.items():
        weak = truth[identifier]["weak_caption"].decode()
        assert annotation.caption == ("a small solid red star on the grey ground" if identifier in rewritten else weak)
    # descriptions moved to other boxes no longer count; boxes shrunk to a quarter of their area still match
    several = {i: a for i, a in annotations.items() if len(a) >= 2 and len(set(a.descriptions)) == len(a)}
    moved = {i: annotations_lib.Annotation(a.boxes[::-1], a.descriptions, a.scores) for i, a in several.items()}
    correct = an.compare_with_ground_truth(several, truth)["correct"]
    assert 0 < correct and an.compare_with_ground_truth(moved, truth)["correct"] < correct
    centres = lambda b: np.concatenate([(b[:, :2] * 3 + b[:, 2:]) / 4, (b[:, :2] + b[:, 2:] * 3) / 4], 1)  # noqa: E731
    shrunk = {i: annotations_lib.Annotation(centres(a.boxes), a.descriptions, a.scores) for i, a in annotations.items()}
    assert an.compare_with_ground_truth(shrunk, truth)["mean_iou"] == pytest.approx(0.25, abs=0.02)
    assert an.compare_with_ground_truth(shrunk, truth)["matched"] == 0  # IoU 0.25 < 0.5


# -- config checks ------------------------------------------------------------------------------------------------


def test_config_checks_reject_misspelt_keys_and_bad_values_in_one_line(tmp_path):
    def error(change) -> str:
        config = load_config_file("experiments/annotate.py:shapes,smoke=True")
        config.mllm.model_dir = ""
        change(config)
        with pytest.raises(ConfigError) as raised:
            an.check_annotate_config(config)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "did you mean config.annotate.rewrite_p" in error(lambda c: c.annotate.update({"rewrite_pp": 0.5}))
    misspelt = error(lambda c: c.annotate.detector.update({"max_boxs": 3}))
    assert "did you mean config.annotate.detector.max_boxes" in misspelt
    assert "annotate.rewrite_p must be a probability" in error(lambda c: setattr(c.annotate, "rewrite_p", 1.5))
    assert "annotate.mode='crop' is not a mode" in error(lambda c: setattr(c.annotate, "mode", "crop"))
    assert "score_threshold" in error(lambda c: setattr(c.annotate.detector, "score_threshold", 2.0))
    assert "placeholder {title}" in error(lambda c: c.annotate.prompts.update(crop="Describe {title}."))
    assert "has no {caption}" in error(lambda c: c.annotate.prompts.update(rewrite_text="Rewrite it."))
    assert "embedded captioner needs an image" in error(lambda c: setattr(c.annotate, "rewrite_input", "text"))
    image_mode = lambda c: c.annotate.update(mode="image", detector={"backend": "file"})  # noqa: E731
    assert "detector.path" in error(image_mode)
    assert "base_url" in error(lambda c: c.mllm.update(backend="openai"))
    config = load_config_file("experiments/annotate.py:shapes,smoke=True")
    an.check_annotate_config(config)  # the preset itself passes
    from vlm_jax.main import resolve_task  # noqa: PLC0415

    assert resolve_task("annotate") is an.annotate_task


def test_detector_registry_checks_each_backend():
    with pytest.raises(ConfigError, match="not a backend"):
        det.make_detector({"backend": "yolo"})
    with pytest.raises(ConfigError, match="detector.model_dir"):
        det.make_detector({"backend": "owlv2"})
    pytest.importorskip("vlm_jax.mllm.owlv2_detector")
    with pytest.raises(ConfigError, match="does not exist"):
        det.make_detector({"backend": "owlv2", "model_dir": "/no/such/owlv2"})
    truth = det.make_detector({"backend": "ground_truth"})
    record = {"regions": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6]]), "description": [b"a red star"]}}
    truth.observe_record("9", record)
    found = truth.detect([np.zeros((4, 4, 3), np.uint8)], [["a cat", "a red star"]], ["9"])[0]
    np.testing.assert_allclose(found.boxes, [[0.2, 0.1, 0.6, 0.5]])  # (ymin, xmin, ymax, xmax) -> xyxy
    assert found.queries.tolist() == [1] and found.scores.tolist() == [1.0]
    with pytest.raises(UserError, match="no regions for image"):
        truth.detect([np.zeros((4, 4, 3), np.uint8)], [["a cat"]], ["10"])


def test_the_annotate_task_runs_the_embedded_captioner_into_the_workdir(tmp_path, captioner_export, capsys):
    config = load_config_file("experiments/annotate.py:shapes,smoke=True")
    config.mllm.model_dir = captioner_export
    config.annotate.update(limit=6, progress=False, max_tokens=6, rewrite_max_tokens=6)
    config.annotate.crop.size = 32
    metrics = an.annotate_task(config, tmp_path / "work")
    directory = tmp_path / "work" / "annotations"
    summary = json.loads((directory / an.SUMMARY_FILE).read_text())
    assert summary["written"] == 6 == metrics["annotate/written"] and summary["remaining"] == 0
    assert metrics["annotate/kept"] == summary["kept"] == len(annotations_lib.read_annotations(str(directory)))
    assert "embedded" in summary["backend"] and "ground_truth" in summary
    assert "annotate (crops)" in capsys.readouterr().out
