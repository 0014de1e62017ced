"""Longer text context for a pretrained text tower: Long-CLIP's position-embedding stretch.

Long-CLIP (Zhang et al. 2024, "Long-CLIP: Unlocking the Long-Text Capability of CLIP"; its
``model/longclip.py``, ``load_from_clip``) keeps the first ``keep`` = 20 learned positions, which
CLIP trained well, and interpolates the rest ``factor`` = 4 times more finely: with ``old``
[L, D] and ``new`` [keep + factor * (L - keep), D],

    new[i]                    = old[i]                                            i < keep
    new[keep + f*i + j]       = ((f - j) * old[keep + i] + j * old[keep + i + 1]) / f
                                                            i = 0 .. L-keep-2, j = 0 .. f-1
    new[-f + j]               = old[L-1] + j * (old[L-1] - old[L-2]) / f          j = 0 .. f-1

(the last ``f`` rows extrapolate past the final position). CLIP's 77 positions become 248. Any
integer ``factor`` >= 1 follows the same rule (1 returns the embedding unchanged); the default is
exactly Long-CLIP's.

Rows 0..keep are the old ones (row ``keep`` starts the first interpolated group), so a causal text
tower pooled at its EOT token gives exactly the embeddings it gave before for texts of at most
``keep`` + 1 tokens (21 for CLIP): they read only those positions. Longer texts see new positions.
"""

from __future__ import annotations

import numpy as np

KEEP = 20
FACTOR = 4


def stretched_length(length: int, keep: int = KEEP, factor: int = FACTOR) -> int:
    """Rows of `stretch_positions` of a [length, D] embedding: keep + factor * (length - keep)."""
    _check(length, keep, factor)
    return keep + factor * (length - keep)


def stretch_factor(length: int, target: int, keep: int = KEEP) -> int:
    """The integer factor that stretches `length` positions to `target` ones (keep + factor * (length
    - keep) == target).

    Raises:
      ValueError: when `target` is shorter than `length`, or no integer factor reaches it; the
        message names both numbers and the rule.
    """
    _check(length, keep, 1)
    if target < length:
        raise ValueError(f"a text context of {target} is shorter than the {length} positions the model was "
                         "trained with; it can only be kept or stretched")
    factor, remainder = divmod(target - keep, length - keep)
    if remainder:
        options = ", ".join(str(keep + k * (length - keep)) for k in range(2, 6))
        raise ValueError(
            f"a text context of {target} is not a stretch of the stored {length} positions: Long-CLIP's stretch "
            f"keeps the first {keep} and interpolates the other {length - keep} an integer factor k times more "
            f"finely, giving {keep} + k*{length - keep} positions ({options}, ...; k={FACTOR} is Long-CLIP's "
            f"{stretched_length(length, keep)})")
    return factor


def stretch_positions(embedding: np.ndarray, keep: int = KEEP, factor: int = FACTOR) -> np.ndarray:
    """Long-CLIP's stretch of a learned position embedding (module docstring).

    embedding: [L, D]. Returns [keep + factor * (L - keep), D] in the input's dtype, computed in
    float64 (the first `keep` rows are exact copies).

    Raises:
      ValueError: when L <= keep (nothing to stretch) or factor < 1.
    """
    embedding = np.asarray(embedding)
    if embedding.ndim != 2:
        raise ValueError(f"expected a position embedding [L, D], got shape {embedding.shape}")
    length = embedding.shape[0]
    _check(length, keep, factor)
    old = embedding.astype(np.float64)
    steps = np.arange(factor, dtype=np.float64)[None, :, None]  # j, [1, f, 1]
    # Rows keep .. L-2 each give `factor` rows, from themselves towards the next one.
    start, end = old[keep:length - 1, None], old[keep + 1:length, None]  # [L-keep-1, 1, D]
    middle = (((factor - steps) * start + steps * end) / factor).reshape(-1, old.shape[1])
    tail = old[length - 1] + steps[0] * (old[length - 1] - old[length - 2]) / factor  # [f, D]
    new = np.concatenate([old[:keep], middle, tail], axis=0)
    return new.astype(embedding.dtype)


def _check(length: int, keep: int, factor: int) -> None:
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor}")
    if length <= keep:
        raise ValueError(f"a position embedding of {length} rows has nothing to stretch past the first {keep} "
                         f"kept ones; it needs more than {keep} rows")
    if length < 2:
        raise ValueError(f"a position embedding of {length} row(s) has no slope to extrapolate; it needs >= 2")
