"""The Shapes World text tokenizer: a CLIP-style byte-level BPE trained on the caption vocabulary.

Lower-casing normalizer, byte-level pre-tokenizer (so no text is ever unknown), a vocabulary small
enough that invented entity names split into sub-words, `<|startoftext|> ... <|endoftext|>` around
every text, and a separate `<|pad|>` token. `<|endoftext|>` has the largest id, so both EOT pooling
rules (argmax of ids, first EOS id) find it. The training corpus depends only on the generator
version, so every config and seed shares one tokenizer.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlm_jax.data.shapes_world import world

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 640
# The longest dense caption (4 objects, 3 relations) is 45 tokens with BOS and EOS; see tests.
CONTEXT_LENGTH = 64
_CORPUS_SEED = 7


def caption_corpus() -> list[str]:
    """Every kind of text the dataset writes, with every entity name, in fixed order."""
    corpus_world = world.World(world.WorldConfig(seed=_CORPUS_SEED, num_pretrain=2000, num_rare=0, num_novel=0))
    entities = corpus_world.entities
    texts = [e.description for e in entities]
    texts += [template.format(e.name) for e in entities for template in world.PROMPT_TEMPLATES]
    texts += [template.format(e.attributes) for e in entities for template in world.PROMPT_TEMPLATES]
    rng = np.random.default_rng(_CORPUS_SEED)
    for index in range(corpus_world.config.num_pretrain):
        scene = corpus_world.layout("pretrain", index)
        ids, _ = corpus_world.entity_draw("pretrain", index)
        texts.append(world.dense_caption(scene.objects, scene.relations))
        texts.append(world.weak_caption(scene, entities[ids[0]].name, corpus_world.config, rng))
    return texts


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Trains the BPE on `caption_corpus()`; deterministic for a given vocab_size."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(caption_corpus(), trainer=trainer)
    # Added after training so that they take the last ids, EOS the very last.
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
        ),
    ])
    return tokenizer


def save_tokenizer(path: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> str:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns `path`.

    The three files are what `transformers.PreTrainedTokenizerFast.from_pretrained(path)` and
    `vlm_jax.data.tokenizer.Tokenizer.from_dir(path)` read.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "padding_side": "right",
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return path
