"""Tokenizer parity with transformers, built offline from small trained vocabularies."""

import io
import json
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

from vlm_jax.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

_WORDS = (
    "a photo of the cat dog bird car truck plane ship horse deer frog red green blue small large circle square "
    "triangle star left right above below next to on in at with running jumping sitting man woman child people "
    "group street city beach mountain river forest sky cloud night day sunny painting drawing sketch close-up "
    "bright dark old new three two one many colorful striped"
).split()
_EXTRA_WORDS = [
    "café", "naïve", "résumé", "Über", "straße", "東京", "北京の空", "こんにちは", "😀", "🐱", "Ελλάδα", "ΟΔΟΣ",
    "москва", "It's", "don't", "we'll", "I'm", "you've", "he'd", "they're", "#1", "$3.50", "100%", "e-mail",
    "C++", "x=y+z", "(hello)", "[test]", "a.b.c", "1984", "3.14159", "2,000", "USA", "NASA", "iPhone",
]  # fmt: skip


def _training_corpus(n=3000, seed=0):
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(_WORDS) if rng.random() > 0.15 else rng.choice(_EXTRA_WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words)
        if rng.random() < 0.3:
            sentence = sentence.capitalize()
        if rng.random() < 0.3:
            sentence += rng.choice([".", "!", "?", "..."])
        sentences.append(sentence)
    return sentences


_HANDPICKED_TEXTS = [
    "", " ", "   ", "\t\n", "a", "A", "Hello, world!", "  leading and trailing  ", "a photo of a cat.",
    "A PHOTO OF A DOG", "It's a dog's life; isn't it?", "don't stop-believin'", "café naïve résumé",
    "Straße über alles", "東京タワーの写真", "北京的天空很蓝", "こんにちは世界", "한국어 텍스트", "😀😃🐱 emoji party 🎉",
    "👨‍👩‍👧 family", "Ελλάδα ΟΔΟΣ σοφός", "Москва — столица", "עברית", "مرحبا بالعالم", "हिन्दी", "ไทย",
    "123 4567 89.10", "$3.50 for 2,000 items (100%)", "e-mail: x@y.z", "C++ and C#", "x=y+z*2/3",
    "[brackets] {braces} <angle>", "multiple     spaces\tand\ttabs\nnewlines", "\u00a0non-breaking\u00a0space",
    "ideographic\u3000space", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "ﬁ ligature ﬀ", "Å Å composed and decomposed",
    "e\u0301 combining", "zero\u200bwidth", "trailing punctuation...!!!", "MiXeD CaSe WoRdS", "iPhone NASA USA",
    "a.b.c", "1984", "3.14159", "▁underline▁chars", "tab\there", "\x1c\x1d\x1e separators", "İstanbul",
    "ǅ titlecase", "SS ß ẞ", "ΣΑΣ.Σ ΑΣ' Σ", " ".join(["a photo of a very long caption with many words"] * 20),
    "x" * 500, "😀" * 100,
]  # fmt: skip


def _varied_texts(n=300, seed=1):
    """Hand-picked edge cases plus random strings over ASCII, accents, CJK, emoji, Greek and whitespace."""
    rng = random.Random(seed)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()[]{}@#$%^&*_+=/\\|~`<>"
    ) + list("éèêàçñöüß東京写真😀🐱ΩΣσ中文 \t\n\u00a0")
    texts = list(_HANDPICKED_TEXTS)
    while len(texts) < n:
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))))
    return texts


def _reference_ids(reference, texts, length):
    encoded = reference(texts, padding="max_length", truncation=True, max_length=length)
    return np.asarray(encoded["input_ids"])


def _assert_same_ids(ours, reference, texts, length):
    expected = _reference_ids(reference, texts, length)
    got = ours(texts)
    assert got.dtype == np.int32 and got.shape == (len(texts), length)
    mismatched = [texts[i][:60] for i in range(len(texts)) if not np.array_equal(got[i], expected[i])]
    assert not mismatched, f"{len(mismatched)} texts differ from transformers, e.g. {mismatched[:5]}"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIP tokenizer directory written by transformers' CLIPTokenizer from a BPE trained here with
    CLIP's pipeline (NFC + whitespace collapse + lower-case; CLIP split regex + ByteLevel; BPE with "</w>")."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    reference = transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)
    path = tmp_path_factory.mktemp("clip_tokenizer")
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A SigLIP tokenizer directory as the hub ships one: a SentencePiece Unigram `spiece.model` (pad 0,
    </s> 1, <unk> 2, nmt_nfkc normalization) and a tokenizer_config.json naming SiglipTokenizer."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()),
        model_writer=model,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("siglip_tokenizer")
    (path / "spiece.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "SiglipTokenizer",
        "model_max_length": 64,
        "do_lower_case": True,
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("length", [77, 12])
def test_clip_ids_match_transformers_clip_tokenizer(clip_dir, length):
    """Reference: transformers 5.x `CLIPTokenizer` (tokenizers-backed; AutoTokenizer gives the same class)."""
    reference = transformers.AutoTokenizer.from_pretrained(clip_dir)
    assert type(reference).__name__ == "CLIPTokenizer"
    ours = Tokenizer.from_dir(clip_dir, context_length=length)
    _assert_same_ids(ours, reference, _varied_texts(), length)


def test_clip_reads_special_tokens_and_context_length(clip_dir):
    tok = Tokenizer.from_dir(clip_dir)
    vocab = json.loads((clip_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.context_length == 77
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["<|endoftext|>"])
    assert tok.vocab_size == len(vocab)


def test_truncation_keeps_eos_last_and_padding_fills_with_pad(clip_dir):
    tok = Tokenizer.from_dir(clip_dir, context_length=6)
    long_text, short_text = tok(["a photo of a cat on a red car in the city"]), tok("a")
    assert long_text[0, 0] == tok.bos_id and long_text[0, -1] == tok.eos_id
    assert tok.eos_id not in long_text[0, :-1].tolist()
    assert short_text.shape == (1, 6)
    assert short_text[0, 0] == tok.bos_id and short_text[0, 2] == tok.eos_id
    assert (short_text[0, 3:] == tok.pad_id).all()


@pytest.mark.parametrize("length", [64, 8])
def test_siglip_ids_match_transformers_siglip_tokenizer(siglip_dir, length):
    """Reference: transformers 5.x `SiglipTokenizer` (the SentencePiece class that AutoTokenizer gives for a
    SigLIP directory with spiece.model). Ours converts spiece.model without sentencepiece."""
    reference = transformers.AutoTokenizer.from_pretrained(siglip_dir)
    assert type(reference).__name__ == "SiglipTokenizer"
    ours = Tokenizer.from_dir(siglip_dir, context_length=length)
    _assert_same_ids(ours, reference, _varied_texts(), length)


def test_siglip_has_no_bos_and_pads_with_eos(siglip_dir):
    tok = Tokenizer.from_dir(siglip_dir)
    assert tok.context_length == 64
    assert tok.bos_id is None and tok.eos_id == 1 and tok.pad_id == 1
    ids = tok("a photo")[0]
    assert ids[0] != tok.eos_id and (ids[ids.tolist().index(tok.eos_id) :] == tok.eos_id).all()


def test_saved_siglip_tokenizer_loads_in_transformers_with_same_ids(siglip_dir, tmp_path):
    """Reference after the round trip: transformers' AutoTokenizer on our tokenizer.json (TokenizersBackend)."""
    ours = Tokenizer.from_dir(siglip_dir)
    ours.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.context_length == 64 and reloaded.eos_id == ours.eos_id and reloaded.bos_id is None
    texts = _varied_texts(120)
    np.testing.assert_array_equal(reloaded(texts), ours(texts))
    _assert_same_ids(ours, transformers.AutoTokenizer.from_pretrained(tmp_path), texts, 64)


def test_saved_clip_tokenizer_round_trips_through_transformers(clip_dir, tmp_path):
    ours = Tokenizer.from_dir(clip_dir, context_length=20)
    ours.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.context_length == 20
    texts = _varied_texts(120)
    np.testing.assert_array_equal(reloaded(texts), ours(texts))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(reference).__name__ == "CLIPTokenizer"
    _assert_same_ids(ours, reference, texts, 20)


def test_context_length_falls_back_to_text_max_position_embeddings(clip_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((clip_dir / "tokenizer.json").read_bytes())
    config = json.loads((clip_dir / "tokenizer_config.json").read_text())
    config["model_max_length"] = int(1e30)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 33}}))
    assert Tokenizer.from_dir(tmp_path).context_length == 33
    assert Tokenizer.from_dir(tmp_path, context_length=9).context_length == 9
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="context length"):
        Tokenizer.from_dir(tmp_path)


def _shapes_style_bpe():
    """A word-level-split BPE with its own special tokens and no post-processor, as a procedural
    dataset trains for itself."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"], show_progress=False
    )
    bpe.train_from_iterator(_training_corpus(500), trainer)
    return bpe


def test_from_tokenizers_adds_bos_and_eos_and_loads_back_everywhere(tmp_path):
    bpe = _shapes_style_bpe()
    tok = Tokenizer.from_tokenizers(bpe, context_length=16, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    ids = tok(["a red circle", "a photo of the cat " * 10])
    body = bpe.encode("a red circle").ids
    np.testing.assert_array_equal(ids[0, : len(body) + 2], [2, *body, 3])
    assert (ids[0, len(body) + 2 :] == 0).all()
    assert ids[1, 0] == 2 and ids[1, -1] == 3

    tok.save(tmp_path)
    np.testing.assert_array_equal(Tokenizer.from_dir(tmp_path)(["a red circle"]), ids[:1])
    texts = _varied_texts(100)
    for reference in (
        transformers.AutoTokenizer.from_pretrained(tmp_path),
        transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path),
    ):
        _assert_same_ids(tok, reference, texts, 16)


def test_from_tokenizers_keeps_an_existing_post_processor():
    bpe = _shapes_style_bpe()
    bpe.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    tok = Tokenizer.from_tokenizers(bpe, context_length=8, pad_token="<pad>", bos_token=None, eos_token="<eos>")
    body = bpe.encode("a red circle").ids[:-1]
    np.testing.assert_array_equal(tok("a red circle")[0, : len(body) + 1], [*body, 3])
    assert tok.bos_id is None


def test_missing_tokenizer_files_raise_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or spiece.model"):
        Tokenizer.from_dir(tmp_path)
