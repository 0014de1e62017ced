"""Pieces shared by the evaluators: the evaluator registry, jitted fixed-batch encoders, and the
counts of evaluated and skipped inputs every evaluator reports.

Every evaluator's metrics hold "evaluated" (examples scored), "skipped" (inputs skipped as bad)
and "skipped/<reason>" per bad-input kind (`vlm_jax.data.bad_input`), so under a suite's
`<name>/` prefix they read "cars/evaluated", "cars/skipped", "cars/skipped/corrupt_image";
`skip_footnote` turns them into a results table's footnote.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models.layers import l2_normalize


class Evaluator(Protocol):
    def run(self, model: nnx.Module) -> dict[str, float]: ...


_EVALUATORS: dict[str, Callable[..., Evaluator]] = {}


def register_evaluator(name: str):
    """Class decorator adding an evaluator to the registry under `name`."""

    def register(cls):
        if name in _EVALUATORS:
            raise ValueError(
                f"Evaluator {name!r} is registered twice ({_EVALUATORS[name].__name__} and {cls.__name__})."
            )
        _EVALUATORS[name] = cls
        return cls

    return register


def get_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """Builds the evaluator registered as `name` with its keyword arguments."""
    if name not in _EVALUATORS:
        raise KeyError(f"Unknown evaluator {name!r}; registered: {sorted(_EVALUATORS)}.")
    return _EVALUATORS[name](**kwargs)


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _encode_normalized(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, method: str) -> jax.Array:
    model = nnx.merge(graphdef, state)
    # Padding rows may embed to zero; they are dropped, but must not produce NaNs on the way.
    return l2_normalize(getattr(model, method)(inputs), eps=1e-12)


class BatchedEncoder:
    """Encodes numpy arrays with `model.<method>` in fixed-size batches and L2-normalizes the result.

    The model is split once; the jitted function of (graphdef, state, batch) is compiled once per input
    shape and cached across encoders of models with the same structure. A last partial batch is padded
    with zeros to `batch_size` and its padding rows dropped, so ragged inputs cause no recompiles.
    """

    def __init__(self, model: nnx.Module, method: str, batch_size: int):
        if not hasattr(model, method):
            raise AttributeError(f"The model has no {method}(); evaluators need encode_image and encode_text.")
        self.graphdef, self.state = nnx.split(model)
        self.method = method
        self.batch_size = batch_size

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """Args: inputs [N, ...]. Returns: float32 [N, D] unit-norm embeddings."""
        inputs = np.asarray(inputs)
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            rows = len(chunk)
            if rows < self.batch_size:
                padding = np.zeros((self.batch_size - rows, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            embeddings = _encode_normalized(self.graphdef, self.state, jnp.asarray(chunk), method=self.method)
            outputs.append(np.asarray(embeddings)[:rows])
        if not outputs:
            raise ValueError("Nothing to encode: the input is empty.")
        return np.concatenate(outputs)


def iterate_batches(data: Callable[[], Iterable[dict[str, np.ndarray]]],
                    skipped: dict[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Calls the data factory for a fresh pass and yields its dict batches without "bad_input".

    Each batch's skip counts ("bad_input": {kind: count}) are added to `skipped`; a batch of counts
    alone (a pass whose inputs were all bad) is counted and not yielded. The batches are not changed.
    """
    for batch in data():
        if not isinstance(batch, dict):
            raise TypeError(f"Expected evaluation batches as dicts of numpy arrays, found {type(batch).__name__}.")
        if "bad_input" in batch:
            if skipped is not None:
                for kind, count in batch["bad_input"].items():
                    skipped[kind] = skipped.get(kind, 0) + int(count)
            batch = {key: value for key, value in batch.items() if key != "bad_input"}
            if not batch:
                continue
        yield batch


def real_rows(batch: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
    """bool [rows]: the batch's "mask" (False on padding and wrap-around rows), else all True."""
    if "mask" not in batch:
        return np.ones(rows, bool)
    return np.asarray(batch["mask"], bool).reshape(rows)


def take_rows(batch: Mapping[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """The rows `keep` (bool [B]) of every per-example field of a batch ("bad_input" counts stay out)."""
    rows = len(keep)
    return {key: np.asarray(value)[keep] for key, value in batch.items()
            if key != "bad_input" and np.ndim(value) and len(value) == rows}


def among_rows(batch: Mapping[str, Any], labels: np.ndarray, real: np.ndarray, among) -> tuple[Any, np.ndarray, np.ndarray]:
    """(batch, labels, real) cut to the real rows whose label is in `among` (None: unchanged), so a
    closed-set evaluation encodes only its own images."""
    if among is None:
        return batch, labels, real
    keep = real & np.isin(labels, np.asarray(among))
    return take_rows(batch, keep), labels[keep], np.ones(int(keep.sum()), bool)


def skip_metrics(skipped: Mapping[str, int], evaluated: int) -> dict[str, float]:
    """{"evaluated", "skipped", "skipped/<reason>" for every reason the batches counted} as floats."""
    metrics = {"evaluated": float(evaluated), "skipped": float(sum(skipped.values()))}
    metrics.update({f"skipped/{kind}": float(count) for kind, count in sorted(skipped.items())})
    return metrics


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Suffixes that a results summary adds under a metric (spread over seeds); they are not reasons.
_SUMMARY_SUFFIXES = ("std", "min", "max")


def skip_footnote(metrics: Mapping[str, float]) -> str:
    """A results table's footnote, one line per evaluator that skipped inputs ("" when none did):

        * zero_shot/cars: 5 of 9 inputs skipped (corrupt_image 5)

    `metrics` holds "<name>/skipped", "<name>/skipped/<reason>" and "<name>/evaluated" as the
    evaluators return them (any prefix before <name> is kept in the line).
    """
    lines = []
    for key in sorted(metrics):
        if not key.endswith("/skipped") or not metrics[key]:
            continue
        name = key[: -len("/skipped")]
        reasons = []
        for reason_key in sorted(metrics):
            reason = reason_key[len(key) + 1:]
            if (reason_key.startswith(key + "/") and "/" not in reason and metrics[reason_key]
                    and reason not in _SUMMARY_SUFFIXES and not reason.startswith("seed_")):
                reasons.append(f"{reason} {_count(metrics[reason_key])}")
        evaluated = metrics.get(f"{name}/evaluated")
        total = f" of {_count(metrics[key] + evaluated)}" if evaluated is not None else ""
        why = f" ({', '.join(reasons)})" if reasons else ""
        lines.append(f"* {name}: {_count(metrics[key])}{total} inputs skipped{why}")
    return "\n".join(lines)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalizes float [N, D] rows."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
