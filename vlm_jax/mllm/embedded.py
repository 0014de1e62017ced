"""The embedded MLLM backend: the captioner of `vlm_jax.models.captioner`, offline and jitted.

    mllm = EmbeddedMLLM.load("/path/to/captioner/export")
    mllm.generate(images, ["Describe the image."] * len(images), max_tokens=48)
    mllm.score(images, ["What is this?"] * B, [["zorvid", "kalpo"]] * B)      # float32 [B, 2]

An export directory (`save_captioner`) holds captioner.safetensors and captioner.json (the model
config), the tokenizer files and preprocessor_config.json; experiments/captioner.py writes one.
Calls run in fixed-size batches (`batch_size` rows, the last padded) and prompt lengths rounded up
to a multiple of 16, so a run compiles a handful of programs. Decoding is greedy (`beam_size` 1)
or beam search; `generate` ignores `schema` (the model writes what it was trained to write;
`vlm_jax.mllm.answers` parses it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath
from flax import nnx

from vlm_jax.errors import UserError
from vlm_jax.mllm.protocol import check_candidates
from vlm_jax.models import captioner as captioner_lib
from vlm_jax.weights import atomic

WEIGHTS_FILE = "captioner.safetensors"
CONFIG_FILE = "captioner.json"
LENGTH_BUCKET = 16


def save_captioner(model: captioner_lib.Captioner, directory: epath.PathLike, tokenizer, preprocess) -> None:
    """Writes the whole captioner, its tokenizer and preprocessing to `directory` (atomically)."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {"/".join(map(str, path)): np.require(np.asarray(value.get_value()), requirements="C")
               for path, value in params}
    with atomic.atomic_export(directory, format="captioner") as staging:
        (staging / WEIGHTS_FILE).write_bytes(safetensors.numpy.save(tensors))
        (staging / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
        tokenizer.save(staging)
        preprocess.save(staging)


def load_captioner(directory: epath.PathLike) -> tuple[captioner_lib.Captioner, Any, Any]:
    """(model, tokenizer, preprocess) of an export `save_captioner` wrote; a UserError naming the
    directory when it is not one."""
    from vlm_jax.data.preprocess import PreprocessSpec  # noqa: PLC0415
    from vlm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415

    directory = epath.Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json"):
        if not (directory / name).exists():
            raise UserError(f"{directory} has no {name}; expected a captioner export (experiments/captioner.py "
                            "writes one to <workdir>/export).")
    config = captioner_lib.CaptionerConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    model = nnx.eval_shape(lambda: captioner_lib.Captioner(config, rngs=nnx.Rngs(0)))
    tensors = safetensors.numpy.load((directory / WEIGHTS_FILE).read_bytes())
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    names = {"/".join(map(str, path)) for path, _ in flat}
    if names != set(tensors):
        difference = sorted(names ^ set(tensors))
        raise UserError(f"{directory / WEIGHTS_FILE} does not match captioner.json: parameter {difference[0]} is in "
                        "one and not the other; export the captioner again.")
    for path, value in flat:
        name = "/".join(map(str, path))
        if tuple(tensors[name].shape) != tuple(value.get_value().shape):
            raise UserError(f"{directory / WEIGHTS_FILE} does not match captioner.json: parameter {name} is "
                            f"{tuple(tensors[name].shape)} in the weights and {tuple(value.get_value().shape)} in "
                            "the config; export the captioner again.")
    updates = [(path, value.replace(jnp.asarray(tensors["/".join(map(str, path))], value.dtype)))
               for path, value in flat]
    nnx.update(model, nnx.from_flat_state(updates))
    return model, Tokenizer.from_dir(directory), PreprocessSpec.from_dir(directory)


class PromptCoder:
    """Texts <-> the captioner's token ids (`captioner.sequence_ids` layout)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend
        self.ids = dict(bos_id=tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id,
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def sequence(self, prompt: str, answer: str | None, length: int | None = None):
        """(ids [L], loss mask [L], prefix length) of `[bos] prompt [eos] answer [eos]`."""
        answer_ids = None if answer is None else self.encode(answer)
        return captioner_lib.sequence_ids(self.encode(prompt), answer_ids, **self.ids,
                                          length=length or self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids up to (not including) the first eos -> text."""
        ids = [int(i) for i in ids]
        if self.ids["eos_id"] in ids:
            ids = ids[: ids.index(self.ids["eos_id"])]
        return self.backend.decode(ids, skip_special_tokens=True).strip()

    def token_text(self, token: int) -> str:
        return self.backend.decode([int(token)], skip_special_tokens=False)


def _bucket(length: int, limit: int) -> int:
    return min(limit, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)


class EmbeddedMLLM:
    """The `vlm_jax.mllm.MLLM` protocol on a captioner; `generate_tokens` adds per-token log-probs
    (what `vlm_jax.mllm.serve` answers `logprobs` requests with)."""

    def __init__(self, model: captioner_lib.Captioner, tokenizer, preprocess, *, batch_size: int = 64,
                 beam_size: int = 1):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.coder = PromptCoder(tokenizer, model.config.context_length)
        self.preprocess = preprocess
        self.batch_size, self.beam_size = int(batch_size), int(beam_size)
        self._warned_cut = False

    @classmethod
    def load(cls, directory: epath.PathLike, **options: Any) -> "EmbeddedMLLM":
        return cls(*load_captioner(directory), **options)

    @classmethod
    def from_config(cls, config) -> "EmbeddedMLLM":
        """From an `MLLMConfig` (model_dir, batch_size, beam_size)."""
        if not config.model_dir:
            raise UserError("mllm.model_dir is not set; point it at a captioner export (experiments/captioner.py).")
        return cls.load(config.model_dir, batch_size=config.batch_size, beam_size=config.beam_size)

    # -- host side -----------------------------------------------------------------------------------

    def _pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from vlm_jax.data.preprocess import preprocess_images  # noqa: PLC0415

        return np.asarray(preprocess_images([np.asarray(image, np.uint8) for image in images], self.preprocess),
                          np.float32)

    def _chunks(self, count: int):
        for start in range(0, count, self.batch_size):
            yield start, min(count, start + self.batch_size)

    def _pad(self, array: np.ndarray, axis: int = 0) -> np.ndarray:
        missing = self.batch_size - array.shape[axis]
        if missing == 0:
            return array
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, missing)
        return np.pad(array, widths, mode="edge" if array.shape[axis] else "constant")

    def _prefixes(self, prompts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(prefix ids [B, P], lengths [B], the answer tokens that fit: max_tokens, or fewer where the
        longest prompt leaves less of the context, as a server's context limit cuts an answer)."""
        limit = self.config.context_length
        try:
            rows = [self.coder.sequence(prompt, None) for prompt in prompts]
        except ValueError as error:
            raise UserError(f"a prompt is longer than the embedded MLLM's context: {error}") from None
        lengths = np.asarray([row[2] for row in rows], np.int32)
        fits = min(max_tokens, limit - int(lengths.max(initial=0)))
        if fits < max_tokens and not self._warned_cut:
            self._warned_cut = True
            logging.warning("A prompt of %d tokens leaves %d of max_tokens=%d in the captioner's context_length %d; "
                            "longer answers are cut (said once).", lengths.max(), fits, max_tokens, limit)
        width = _bucket(int(lengths.max(initial=1)), limit)
        return np.stack([row[0][:width] for row in rows]), lengths, max(fits, 1)

    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str], max_tokens: int = 64, *,
                 schema: dict[str, Any] | None = None) -> list[str]:
        del schema  # the embedded model writes its trained format; see the module docstring
        check_candidates(images, prompts, [()] * len(images))
        texts = []
        for start, end in self._chunks(len(images)):
            prefix, lengths, fits = self._prefixes(prompts[start:end], max_tokens)
            pixels = self._pad(self._pixels(images[start:end]))
            if self.beam_size > 1:
                tokens = _beam(self.graphdef, self.state, pixels, self._pad(prefix), self._pad(lengths),
                               max_tokens=fits, beam_size=self.beam_size)
            else:
                tokens = _greedy(self.graphdef, self.state, pixels, self._pad(prefix), self._pad(lengths),
                                 max_tokens=fits, top_logprobs=0)[0]
            texts.extend(self.coder.decode(row) for row in np.asarray(tokens)[: end - start])
        return texts

    def generate_tokens(self, images: Sequence[np.ndarray], prompts: Sequence[str], max_tokens: int,
                        top_logprobs: int) -> list[tuple[str, list[tuple[str, float, list[tuple[str, float]]]]]]:
        """Greedy answers with, per generated token (closing eos excluded): its text, log-prob and the
        top `top_logprobs` alternatives (text, log-prob)."""
        check_candidates(images, prompts, [()] * len(images))
        results = []
        for start, end in self._chunks(len(images)):
            prefix, lengths, fits = self._prefixes(prompts[start:end], max_tokens)
            outputs = _greedy(self.graphdef, self.state, self._pad(self._pixels(images[start:end])), self._pad(prefix),
                              self._pad(lengths), max_tokens=fits, top_logprobs=max(top_logprobs, 1))
            tokens, chosen, top_ids, top_values = (np.asarray(x)[: end - start] for x in outputs)
            for row in range(end - start):
                steps = []
                for t, token in enumerate(tokens[row]):
                    if token == self.coder.ids["eos_id"]:
                        break
                    alternatives = [(self.coder.token_text(i), float(v))
                                    for i, v in zip(top_ids[row, t, :top_logprobs], top_values[row, t, :top_logprobs])]
                    steps.append((self.coder.token_text(token), float(chosen[row, t]), alternatives))
                results.append((self.coder.decode(tokens[row]), steps))
        return results

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
              normalize: bool = False) -> np.ndarray:
        count = check_candidates(images, prompts, candidates)
        scores = np.zeros((len(images), count), np.float32)
        if count == 0:
            return scores
        for start, end in self._chunks(len(images)):
            rows = [[self.coder.sequence(prompts[b], candidate) for candidate in candidates[b]]
                    for b in range(start, end)]
            width = _bucket(max(int(np.count_nonzero(r[1])) + r[2] for row in rows for r in row),
                            self.config.context_length)
            ids = np.stack([[rows[b][c][0][:width] for b in range(end - start)] for c in range(count)])
            mask = np.stack([[rows[b][c][1][:width] for b in range(end - start)] for c in range(count)])
            pixels = self._pad(self._pixels(images[start:end]))
            values = _score(self.graphdef, self.state, pixels, self._pad(ids, 1), self._pad(mask, 1),
                            normalize=bool(normalize))
            scores[start:end] = np.asarray(values)[: end - start]
        return scores


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens", "top_logprobs"))
def _greedy(graphdef, state, pixels, prefix, lengths, *, max_tokens, top_logprobs):
    model = nnx.merge(graphdef, state)
    return captioner_lib.greedy_decode(model, model.image_context(pixels), prefix, lengths, max_tokens, top_logprobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens", "beam_size"))
def _beam(graphdef, state, pixels, prefix, lengths, *, max_tokens, beam_size):
    model = nnx.merge(graphdef, state)
    return captioner_lib.beam_decode(model, model.image_context(pixels), prefix, lengths, max_tokens, beam_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def _score(graphdef, state, pixels, ids, mask, *, normalize):
    model = nnx.merge(graphdef, state)
    return captioner_lib.score_candidates(model, model.image_context(pixels), ids, mask, normalize)
