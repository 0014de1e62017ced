"""Caption transforms: sentence sampling, rule-made hard negatives, and the decoder fields they fill."""

import collections

import numpy as np
import pytest

from vlm_jax.data import captions
from vlm_jax.data.bad_input import Fetched
from vlm_jax.data.decoding import ExampleDecoder

LONG = "A red car is parked. A dog sleeps under it! Is it raining? The street is wet."


def test_sentences_split_after_terminal_punctuation_only():
    assert captions.sentences(LONG) == ["A red car is parked.", "A dog sleeps under it!", "Is it raining?",
                                        "The street is wet."]
    assert captions.sentences("  one sentence without a stop  ") == ["one sentence without a stop"]
    assert captions.sentences("v1.5 is out. Yes.") == ["v1.5 is out.", "Yes."]


def test_sample_sentences_draws_ordered_nonempty_subsets_of_every_size():
    rng = np.random.default_rng(0)
    parts = captions.sentences(LONG)
    sizes, subsets = collections.Counter(), set()
    for _ in range(2000):
        sample = captions.sample_sentences(LONG, rng)
        chosen = captions.sentences(sample)
        indices = [parts.index(sentence) for sentence in chosen]
        assert indices == sorted(indices) and len(set(indices)) == len(indices)  # in order, no repeats
        sizes[len(chosen)] += 1
        subsets.add(tuple(indices))
    assert set(sizes) == {1, 2, 3, 4}
    assert all(abs(count / 2000 - 0.25) < 0.04 for count in sizes.values())  # size uniform in 1..n
    assert len(subsets) == 2 ** 4 - 1  # every non-empty subset occurs
    capped = {len(captions.sentences(captions.sample_sentences(LONG, rng, max_sentences=2))) for _ in range(200)}
    assert capped == {1, 2}
    assert captions.sample_sentences("just one", rng) == "just one"


def test_swap_attribute_exchanges_two_different_words_of_one_group():
    rng = np.random.default_rng(0)
    text = "a large striped red star to the left of a small solid blue circle"
    seen = set()
    for _ in range(200):
        negative = captions.swap_attribute(text, rng)
        assert sorted(negative.split()) == sorted(text.split())  # the same words, rebound
        changed = [(a, b) for a, b in zip(text.split(), negative.split()) if a != b]
        assert len(changed) == 2 and changed[0] == changed[1][::-1]
        seen.add(negative)
    assert seen == {
        "a small striped red star to the left of a large solid blue circle",
        "a large solid red star to the left of a small striped blue circle",
        "a large striped blue star to the left of a small solid red circle",
    }
    assert captions.swap_attribute("a red star next to a red circle", rng) is None  # same value: no swap
    assert captions.swap_attribute("a photo of a zorvid", rng) is None
    assert captions.swap_attribute("A Red cube and a blue ball.", rng) == "A blue cube and a Red ball."


def test_swap_relation_reverses_one_relation_and_prefers_the_longest_phrase():
    rng = np.random.default_rng(1)
    text = "a red star to the left of a blue circle, which is above a green ring"
    seen = {captions.swap_relation(text, rng) for _ in range(50)}
    assert seen == {"a red star to the right of a blue circle, which is above a green ring",
                    "a red star to the left of a blue circle, which is below a green ring"}
    assert captions.swap_relation("a cat in front of a door", rng) == "a cat behind a door"
    assert captions.swap_relation("a red star", rng) is None
    assert captions.swap_relation("overall a fine day", rng) is None  # whole words only


def test_hard_negative_draws_among_applicable_kinds_and_rejects_unknown_ones():
    rng = np.random.default_rng(2)
    text = "a red star to the left of a blue circle"
    kinds = collections.Counter(
        "relation" if "right" in negative else "attribute"
        for negative in (captions.hard_negative(text, ("swap_attribute", "swap_relation"), rng) for _ in range(400)))
    assert 150 < kinds["relation"] < 250 and 150 < kinds["attribute"] < 250
    assert captions.hard_negative("a red star", ("swap_attribute", "swap_relation"), rng) is None
    with pytest.raises(ValueError, match="swap_colour"):
        captions.check_negative_kinds(("swap_colour",))


class _Words:
    """A whitespace tokenizer with ids by first appearance (context 12, pad 0)."""

    context_length, pad_id = 12, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts):
        rows = np.zeros((len(texts), self.context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()][: self.context_length]
            rows[row, : len(ids)] = ids
        return rows


def _decode(decoder, record, index=0, seed=0):
    return decoder.random_map(Fetched(index=index, record=record), np.random.default_rng(seed))


def test_decoder_adds_tokenized_negatives_with_a_mask_and_eval_form_drops_transforms():
    tokenizer = _Words()
    decoder = ExampleDecoder(tokenizer=tokenizer, image_key=None, text_keys=("caption",), keep_text=True,
                             hard_negatives=("swap_attribute",))
    example = _decode(decoder, {"caption": "a red star left of a blue ring"})
    assert example["text"] == "a red star left of a blue ring" and bool(example["negative_mask"])
    np.testing.assert_array_equal(example["negative_ids"], tokenizer(["a blue star left of a red ring"])[0])
    none = _decode(decoder, {"caption": "a photo of a zorvid"})
    assert not bool(none["negative_mask"]) and none["negative_ids"].shape == (12,)
    np.testing.assert_array_equal(none["negative_ids"], np.zeros(12, np.int32))
    plain = _decode(decoder.for_eval(), {"caption": "a red star left of a blue ring"})
    assert "negative_ids" not in plain
    with pytest.raises(ValueError, match="tokenizer"):
        ExampleDecoder(tokenizer=None, keep_text=True, image_key=None, text_keys=("caption",),
                       hard_negatives=("swap_attribute",))


def test_decoder_sentence_sampling_is_reproducible_per_example_and_off_in_eval():
    decoder = ExampleDecoder(tokenizer=None, image_key=None, text_keys=("caption",), keep_text=True,
                             sentence_sampling=True, max_sentences=2)
    texts = [_decode(decoder, {"caption": LONG}, seed=seed)["text"] for seed in range(40)]
    assert texts == [_decode(decoder, {"caption": LONG}, seed=seed)["text"] for seed in range(40)]
    assert len(set(texts)) > 5 and all(1 <= len(captions.sentences(text)) <= 2 for text in texts)
    assert _decode(decoder.for_eval(), {"caption": LONG})["text"] == LONG
