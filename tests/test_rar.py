"""RAR's parts: few-shot rows, candidates de-duplicated in rank order, ranking by an MLLM (answers
parsed, fallbacks counted) and by score, the ranking fine-tune windows and their conversations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlm_jax.config_lib import ConfigError
from vlm_jax.memory.index import IndexConfig
from vlm_jax.memory.neighbours import first_distinct, rows_per_label
from vlm_jax.methods import rar
from vlm_jax.mllm.training import read_conversations, write_conversations

NAMES = ["zorvid", "kalpo", "Bewick's wren", "Cessna 172, Skyhawk", "mub"]


class ScriptedMLLM:
    """Answers from a script; records what it was asked."""

    def __init__(self, answers=(), scores=None):
        self.answers, self.scores, self.calls = list(answers), scores, []

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        self.calls.append((len(images), list(prompts), max_tokens, schema))
        return [self.answers.pop(0) for _ in prompts]

    def score(self, images, prompts, candidates, *, normalize=False):
        self.calls.append(("score", list(prompts), [list(row) for row in candidates], normalize))
        return np.asarray(self.scores, np.float32)


def test_few_shot_rows_take_n_per_class_seeded():
    labels = np.repeat(np.arange(4), 5)
    rows = rows_per_label(labels, 2, seed=0)
    assert np.bincount(labels[rows]).tolist() == [2, 2, 2, 2]
    assert np.array_equal(rows, rows_per_label(labels, 2, seed=0))
    assert not np.array_equal(rows, rows_per_label(labels, 2, seed=1))
    assert len(rows_per_label(labels, 9, seed=0)) == 20  # fewer than N: every row of the class


def test_distinct_labels_keep_rank_order_and_pad():
    neighbours = np.asarray([[3, 3, 1, 3, 2, 0], [5, -1, 5, -1, -1, -1]])
    assert first_distinct(neighbours, 3).tolist() == [[3, 1, 2], [5, -1, -1]]


def test_retrieve_returns_distinct_labels_of_nearest_rows():
    keys = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # rows 0 and 1 are the same point
    values = np.asarray([7, 7, 8, 9, 6])
    query = np.asarray([[1.0, 0.6, 0.3, 0.0]], np.float32)
    query /= np.linalg.norm(query)
    candidates = rar.retrieve(keys, values, query, 3, IndexConfig(), search_k=5)
    assert candidates.tolist() == [[7, 8, 9]]


def test_ranking_prompt_and_schema():
    config = rar.RarConfig()
    prompt = rar.ranking_prompt(config, NAMES[:2])
    assert prompt.startswith("Please play the role of a classification expert, and sort the provided 2 categories")
    assert prompt.endswith("Here are the optional categories:['zorvid', 'kalpo'].")
    plain = rar.RarConfig(prompt="Sort {k}: {names}", list_style="plain")
    assert rar.ranking_prompt(plain, NAMES[:2]) == "Sort 2: [zorvid, kalpo]"
    assert rar.ranking_schema(2) == {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}
    with pytest.raises(ConfigError, match="rar.list_style"):
        rar.parse_rar({"list_style": "yaml"})
    with pytest.raises(ConfigError, match="rar.kk is not a field; did you mean rar.k"):
        rar.parse_rar({"kk": 3})


def test_rank_parses_answers_and_counts_every_fallback():
    candidates = np.asarray([[0, 1, 2], [0, 1, 2], [3, 4, -1], [0, 1, 2]])
    # Row 2 with its 2 candidates is asked first, then the rows with 3 (0, 1, 3) in one call.
    mllm = ScriptedMLLM([
        "[mub, Cessna 172, Skyhawk]",                     # a name holding a comma, two candidates
        "['Bewick's wren', 'zorvid', 'kalpo']",        # all named
        "Sure: [kalpo, kalpo, dax]",                      # duplicate, unknown name, completed
        "I'm sorry, I can't help with that.",             # unparseable: the retrieval order
    ])
    ranked, events = rar.rank(mllm, [np.zeros((4, 4, 3), np.uint8)] * 4, candidates, NAMES, rar.RarConfig(k=3))
    assert ranked.tolist() == [[2, 0, 1], [1, 0, 2], [4, 3, -1], [0, 1, 2]]
    assert events["answers"] == 4 and events["answers_with_fallback"] == 2
    assert events["duplicate"] == 1 and events["unknown_name"] == 1 and events["unparseable"] == 1
    # one call per candidate count, each with the k-name array schema
    assert [(count, schema["minItems"]) for count, _, _, schema in mllm.calls] == [(1, 2), (3, 3)]


def test_rank_by_score_sorts_by_likelihood_with_padding_last():
    candidates = np.asarray([[0, 1, 2], [3, 4, -1]])
    mllm = ScriptedMLLM(scores=[[-3.0, -1.0, -2.0], [-5.0, -4.0, 0.0]])
    ranked = rar.rank_by_score(mllm, [None, None], candidates, NAMES, rar.RarConfig(score_prompt="What is this?"))
    assert ranked.tolist() == [[1, 2, 0], [4, 3, -1]]
    assert mllm.calls[0][2] == [NAMES[:3], [NAMES[3], NAMES[4], ""]]


def test_ranking_windows_follow_the_paper():
    neighbours = ["a", "b", "a", "c", "d", "e", "f", "g"]  # de-duplicated: a b c d e f g
    windows = rar.ranking_windows(neighbours, "c", 5)
    assert windows == [(["a", "b", "c", "d", "e"], ["c", "a", "b", "d", "e"]),
                       (["b", "c", "d", "e", "f"], ["c", "b", "d", "e", "f"]),
                       (["c", "d", "e", "f", "g"], ["c", "d", "e", "f", "g"])]
    assert rar.ranking_windows(neighbours, "z", 5) == []
    assert rar.ranking_windows(["a", "b"], "a", 5) == []  # shorter than a window


def test_ranking_conversations_round_trip(tmp_path):
    images = [np.full((8, 8, 3), value, np.uint8) for value in (10, 200)]
    neighbours = np.asarray([[0, 1, 2, 3, 4, 0], [3, 4, 0, 1, 2, -1]])
    config = rar.RarConfig(prompt="Sort {k}: {names}", list_style="plain", window=5, neighbours=5)
    examples = list(rar.ranking_conversations(images, neighbours, np.asarray([2, 0]), NAMES, config))
    assert [(key, prompt, answer) for key, _, prompt, answer in examples] == [
        (0, "Sort 5: [zorvid, kalpo, Bewick's wren, Cessna 172, Skyhawk, mub]",
         "[Bewick's wren, zorvid, kalpo, Cessna 172, Skyhawk, mub]"),
        (1, "Sort 5: [Cessna 172, Skyhawk, mub, zorvid, kalpo, Bewick's wren]",
         "[zorvid, Cessna 172, Skyhawk, mub, kalpo, Bewick's wren]")]
    path = tmp_path / "ranking" / "ranking.jsonl"
    assert write_conversations(path, examples) == 2
    record = json.loads(path.read_text().splitlines()[0])
    assert record["image"] == "images/0.png" and record["conversations"][0]["value"].startswith("<image>\n")
    read_images, pairs = read_conversations(str(path))
    assert [pair[1:] for pair in pairs] == [(prompt, answer) for _, _, prompt, answer in examples]
    assert np.array_equal(read_images[pairs[1][0]], images[1])
