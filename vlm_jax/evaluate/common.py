"""Pieces shared by the evaluators: the evaluator registry and jitted, fixed-batch encoders."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
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


def iterate_batches(data: Callable[[], Iterable[dict[str, np.ndarray]]]) -> Iterator[dict[str, np.ndarray]]:
    """Calls the data factory for a fresh pass and checks that it yields dict batches."""
    for batch in data():
        if not isinstance(batch, dict):
            raise TypeError(f"Expected evaluation batches as dicts of numpy arrays, found {type(batch).__name__}.")
        yield batch


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalizes float [N, D] rows."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
