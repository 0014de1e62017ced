"""Evaluators: zero-shot classification, retrieval, compositional benchmarks."""
