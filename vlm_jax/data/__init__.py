"""Datasets, tokenizers, preprocessing and grain input pipelines."""
