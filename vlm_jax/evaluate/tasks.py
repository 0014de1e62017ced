"""Evaluation-only tasks run by `vlm_jax.main`."""

from __future__ import annotations

import json

from absl import logging
from etils import epath

from vlm_jax.config_lib import ConfigError, require_path
from vlm_jax.evaluate import suite
from vlm_jax.evaluate.common import skip_footnote


def write_results(workdir: epath.Path, metrics: dict[str, float]) -> None:
    """Writes the final metrics of an experiment to `<workdir>/results.json`."""
    (workdir / "results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")


def zero_shot_eval(config, workdir: epath.Path) -> dict[str, float]:
    """Loads `config.clip_dir` (a Hugging Face CLIP/SigLIP directory) and runs `config.evals` on it."""
    from vlm_jax.weights import load_pretrained  # noqa: PLC0415 - keeps `main --help` fast

    model_dir = require_path(config.clip_dir, "the pretrained CLIP directory", field="clip_dir")
    pretrained = load_pretrained(model_dir, dtype=config.dtype)
    if pretrained.tokenizer is None:
        raise ConfigError(f"{model_dir} has no tokenizer.json; zero-shot evaluation needs the model's tokenizer.")
    if not config.evals:
        raise ConfigError("config.evals is empty; name at least one evaluator.")
    evaluators = suite.build_evaluators(config.evals, pretrained.preprocess, pretrained.tokenizer)
    metrics = suite.run_evaluators(evaluators, pretrained.model)
    for name, value in sorted(metrics.items()):
        logging.info("%s = %.4f", name, value)
    footnote = skip_footnote(metrics)
    if footnote:
        print(footnote, flush=True)
    write_results(workdir, metrics)
    return metrics
