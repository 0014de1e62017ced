"""Evaluators: zero-shot classification, retrieval, compositional benchmarks.

Each evaluator is a small object with `run(model) -> dict[str, float]`, built by name from a config
with `get_evaluator(name, **kwargs)`.
"""

from vlm_jax.evaluate import compositional, retrieval, zero_shot
from vlm_jax.evaluate.common import BatchedEncoder, get_evaluator, register_evaluator
from vlm_jax.evaluate.retrieval import RetrievalEvaluator, retrieval_metrics
from vlm_jax.evaluate.zero_shot import ZeroShotEvaluator, classification_metrics, zero_shot_classifier

__all__ = [
    "BatchedEncoder",
    "RetrievalEvaluator",
    "ZeroShotEvaluator",
    "classification_metrics",
    "compositional",
    "get_evaluator",
    "register_evaluator",
    "retrieval",
    "retrieval_metrics",
    "zero_shot",
    "zero_shot_classifier",
]
