"""Caption transforms applied while decoding training examples: sentence sampling and hard negatives.

Sentence sampling (DreamLIP; Stone et al.): a long caption becomes a random non-empty subset of its
sentences, kept in their order, so one dense recaption gives many short, true targets and a text
tower with a short context still sees every part of it over the epochs.

Hard negatives (NegCLIP-style, rule-based so that they need no parser or tagger):
  swap_attribute: two attribute words of one group (two colours, two sizes, ...) with different
    values exchange places: "a red cube left of a blue ball" -> "a blue cube left of a red ball".
    The words and the set of words stay the same; only their binding changes.
  swap_relation: one spatial relation is reversed: "left of" <-> "right of", "above" <-> "below".
A caption with nothing to swap has no negative (the loss then masks it out).

Both are pure functions of (text, numpy Generator), so a grain RandomMap makes them reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from vlm_jax.config_lib import ConfigError

# Attribute words by group; a swap exchanges two different words of one group. English words common
# in captions, and Shapes World's attribute vocabulary (its colours, patterns and sizes are in them).
ATTRIBUTE_GROUPS: Mapping[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown", "pink", "grey",
               "gray", "silver", "gold", "golden"),
    "size": ("small", "large", "big", "tiny", "huge", "little", "tall", "short", "long"),
    "pattern": ("solid", "striped", "dotted", "checkered", "spotted", "plaid", "floral"),
    "material": ("wooden", "metal", "plastic", "glass", "stone", "leather", "paper"),
    "age": ("old", "young", "new"),
    "state": ("open", "closed", "empty", "full", "wet", "dry"),
}

# Relations and their inverses, longest first so "to the left of" wins over "left".
RELATION_INVERSES: Mapping[str, str] = {
    "to the left of": "to the right of", "to the right of": "to the left of",
    "in front of": "behind", "behind": "in front of",
    "on top of": "underneath", "underneath": "on top of",
    "above": "below", "below": "above", "over": "under", "under": "over",
}

NEGATIVE_KINDS = ("swap_attribute", "swap_relation")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]+")
_RELATION = re.compile(r"\b(" + "|".join(sorted(map(re.escape, RELATION_INVERSES), key=len, reverse=True)) + r")\b")
_GROUP_OF = {word: group for group, words in ATTRIBUTE_GROUPS.items() for word in words}


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after . ! ? followed by whitespace), stripped, none empty."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def sample_sentences(text: str, rng: np.random.Generator, max_sentences: int = 0) -> str:
    """A random non-empty subset of the caption's sentences in their order: the subset's size is
    uniform in 1..min(n, max_sentences) (max_sentences 0: n), its members uniform without replacement."""
    parts = sentences(text)
    if len(parts) <= 1:
        return text.strip()
    most = len(parts) if max_sentences <= 0 else min(max_sentences, len(parts))
    count = int(rng.integers(1, most + 1))
    chosen = np.sort(rng.choice(len(parts), size=count, replace=False))
    return " ".join(parts[index] for index in chosen)


def swap_attribute(text: str, rng: np.random.Generator) -> str | None:
    """`text` with two different attribute words of one group exchanged; None when it has none."""
    words = [(match.start(), match.end(), match.group(0)) for match in _WORD.finditer(text)]
    by_group: dict[str, list[int]] = {}
    for index, (_, _, word) in enumerate(words):
        group = _GROUP_OF.get(word.lower())
        if group is not None:
            by_group.setdefault(group, []).append(index)
    pairs = [(i, j) for group in sorted(by_group) for a, i in enumerate(by_group[group])
             for j in by_group[group][a + 1:] if words[i][2].lower() != words[j][2].lower()]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    (start_i, end_i, word_i), (start_j, end_j, word_j) = words[i], words[j]
    return text[:start_i] + word_j + text[end_i:start_j] + word_i + text[end_j:]


def swap_relation(text: str, rng: np.random.Generator) -> str | None:
    """`text` with one spatial relation replaced by its inverse; None when it names none."""
    matches = list(_RELATION.finditer(text))
    if not matches:
        return None
    match = matches[int(rng.integers(len(matches)))]
    return text[: match.start()] + RELATION_INVERSES[match.group(1)] + text[match.end():]


_NEGATIVES = {"swap_attribute": swap_attribute, "swap_relation": swap_relation}


def check_negative_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    unknown = [kind for kind in kinds if kind not in _NEGATIVES]
    if unknown:
        raise ConfigError(f"data.hard_negatives names {unknown}, which are not among {list(NEGATIVE_KINDS)}.")
    return tuple(kinds)


def hard_negative(text: str, kinds: Sequence[str], rng: np.random.Generator) -> str | None:
    """One negative of `text`: a kind drawn uniformly among `kinds` that apply to it; None if none does."""
    candidates = [(kind, _NEGATIVES[kind](text, rng)) for kind in kinds]
    candidates = [negative for _, negative in candidates if negative is not None and negative != text]
    if not candidates:
        return None
    return candidates[int(rng.integers(len(candidates)))]
