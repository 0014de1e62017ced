"""Text tokenizer backed by the `tokenizers` library, loaded from a model directory.

A model directory written by transformers holds `tokenizer.json` (the whole pipeline: normalizer,
pre-tokenizer, model, post-processor) plus `tokenizer_config.json` / `special_tokens_map.json` (special
tokens, `model_max_length`). SigLIP directories ship only a SentencePiece `spiece.model`; it is converted
here into an equivalent `tokenizers` pipeline that reproduces transformers' `SiglipTokenizer`
(lower-case, strip ASCII punctuation, collapse whitespace, SentencePiece Unigram, `</s>` appended).

Output is always `int32 [B, context_length]`: sequences longer than the context are cut so that the
closing special token (EOS) stays last, as transformers does with `truncation=True,
max_length=L, padding="max_length"`; shorter ones are right-padded with `pad_id`.
"""

from __future__ import annotations

import json
import os
import string
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

# transformers writes this sentinel as model_max_length when a tokenizer has no real limit.
_UNBOUNDED_LENGTH = 1_000_000

_SPIECE_UNDERLINE = "\u2581"


def _special_token_content(value: Any) -> str | None:
    """Returns the string of a special token given as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"Expected a special token as a string or a dict with 'content', found {value!r}.")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """Fixed-length tokenizer for a text tower.

    Attributes:
      context_length: L, the length of every returned row.
      pad_id, eos_id: ids of the padding and end-of-text tokens.
      bos_id: id of the start-of-text token, or None when the pipeline adds none (SigLIP).
      vocab_size: number of ids the tokenizer can emit, added tokens included.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        context_length: int,
        pad_token: str,
        eos_token: str,
        bos_token: str | None = None,
        unk_token: str | None = None,
        tokenizer_class: str = "PreTrainedTokenizerFast",
        extra_config: dict[str, Any] | None = None,
    ):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 to hold text and EOS, found {context_length}.")
        self._tokenizer = tokenizer
        self.context_length = int(context_length)
        self.pad_token, self.eos_token, self.bos_token, self.unk_token = pad_token, eos_token, bos_token, unk_token
        self.pad_id = self._token_id(pad_token)
        self.eos_id = self._token_id(eos_token)
        self.bos_id = None if bos_token is None else self._token_id(bos_token)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer_class = tokenizer_class
        self._extra_config = dict(extra_config or {})
        # A copy carries the fixed-length settings so that `save` writes the pipeline untouched.
        self._encoder = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._encoder.enable_truncation(max_length=self.context_length)
        self._encoder.enable_padding(length=self.context_length, pad_id=self.pad_id, pad_token=pad_token)

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Special token {token!r} is not in the vocabulary; add it to the tokenizer first.")
        return token_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, without padding or truncation."""
        return self._tokenizer

    @classmethod
    def from_tokenizers(
        cls,
        tok: tokenizers.Tokenizer,
        *,
        context_length: int,
        pad_token: str,
        bos_token: str | None,
        eos_token: str,
        unk_token: str | None = None,
    ) -> Tokenizer:
        """Wraps a trained `tokenizers.Tokenizer`.

        A tokenizer with no post-processor gets one that writes `[bos] text eos`, since the text tower
        pools at the EOS token and would otherwise never see it.
        """
        tok = tokenizers.Tokenizer.from_str(tok.to_str())
        tok.no_padding()
        tok.no_truncation()
        if tok.post_processor is None:
            single = f"{bos_token} $A {eos_token}" if bos_token is not None else f"$A {eos_token}"
            specials = [(t, tok.token_to_id(t)) for t in (bos_token, eos_token) if t is not None]
            missing = [t for t, i in specials if i is None]
            if missing:
                raise ValueError(
                    f"Special tokens {missing} are not in the vocabulary; train with them as special_tokens."
                )
            tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
        return cls(
            tok,
            context_length=context_length,
            pad_token=pad_token,
            eos_token=eos_token,
            bos_token=bos_token,
            unk_token=unk_token,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike, context_length: int | None = None) -> Tokenizer:
        """Loads `tokenizer.json` (or a SentencePiece `spiece.model`) from a model directory.

        Args:
          path: a directory written by transformers' `save_pretrained` or by `Tokenizer.save`.
          context_length: overrides the length read from the directory. Without it, the length is
            `model_max_length` of tokenizer_config.json when it is a real limit, else the text tower's
            `max_position_embeddings` in config.json.
        """
        path = os.fspath(path)
        tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_tokens_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        model_config = _read_json(os.path.join(path, "config.json"))

        def special(name: str) -> str | None:
            return _special_token_content(tokenizer_config.get(name, special_tokens_map.get(name)))

        tokenizer_class = tokenizer_config.get("tokenizer_class") or "PreTrainedTokenizerFast"
        tokenizer_json = os.path.join(path, "tokenizer.json")
        spiece_model = os.path.join(path, "spiece.model")
        extra_config = {}
        if os.path.exists(tokenizer_json):
            tok = tokenizers.Tokenizer.from_file(tokenizer_json)
            tok.no_padding()
            tok.no_truncation()
            defaults = _CLASS_DEFAULT_TOKENS.get(tokenizer_class.removesuffix("Fast"), {})
        elif os.path.exists(spiece_model):
            defaults = _CLASS_DEFAULT_TOKENS["SiglipTokenizer"]
            with open(spiece_model, "rb") as f:
                tok = siglip_tokenizer_from_spiece(
                    f.read(),
                    eos_token=special("eos_token") or defaults["eos_token"],
                    do_lower_case=tokenizer_config.get("do_lower_case", True),
                )
            # transformers would look for spiece.model under this class; tokenizer.json is generic.
            tokenizer_class = "PreTrainedTokenizerFast"
            extra_config["do_lower_case"] = tokenizer_config.get("do_lower_case", True)
        else:
            raise FileNotFoundError(
                f"Expected tokenizer.json or spiece.model in {path}, found neither; save the tokenizer with "
                "transformers' save_pretrained or Tokenizer.save."
            )

        token_names = ("bos_token", "eos_token", "pad_token", "unk_token")
        tokens = {name: special(name) or defaults.get(name) for name in token_names}
        if tokens["eos_token"] is None:
            raise ValueError(f"No eos_token in {path}/tokenizer_config.json or special_tokens_map.json; add one.")
        if tokens["pad_token"] is None:
            tokens["pad_token"] = tokens["eos_token"]
        # A bos token that the post-processor never writes (SigLIP) is no bos for the model.
        if tokens["bos_token"] is not None and tokens["bos_token"] not in tok.encode("").tokens:
            tokens["bos_token"] = None

        if context_length is None:
            context_length = _context_length_from_configs(tokenizer_config, model_config)
        if context_length is None:
            raise ValueError(
                f"Cannot tell the context length of {path}: no sane model_max_length in tokenizer_config.json and "
                "no text max_position_embeddings in config.json; pass context_length."
            )
        return cls(
            tok, context_length=context_length, tokenizer_class=tokenizer_class, extra_config=extra_config, **tokens
        )

    def with_context_length(self, context_length: int) -> Tokenizer:
        """The same tokenizer returning rows of `context_length` ids (longer texts are truncated)."""
        return Tokenizer(self._tokenizer, context_length=context_length, pad_token=self.pad_token,
                         eos_token=self.eos_token, bos_token=self.bos_token, unk_token=self.unk_token,
                         tokenizer_class=self.tokenizer_class, extra_config=self._extra_config)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes to fixed length.

        Args:
          texts: one string or a sequence of B strings.
        Returns:
          int32 [B, context_length] (B = 1 for a single string).
        """
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._encoder.encode_batch(list(texts))
        ids = np.zeros((len(encodings), self.context_length), dtype=np.int32)
        for row, encoding in zip(ids, encodings):
            row[:] = encoding.ids
        return ids

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        transformers' AutoTokenizer and by `Tokenizer.from_dir`."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tokenizer.save(os.path.join(path, "tokenizer.json"))
        special_tokens = {
            name: value
            for name, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
                ("unk_token", self.unk_token),
            )
            if value is not None
        }
        tokenizer_config = {
            **self._extra_config,
            "tokenizer_class": self.tokenizer_class,
            "model_max_length": self.context_length,
            **special_tokens,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special_tokens, f, indent=2, ensure_ascii=False)


# Defaults of the transformers classes, used when a directory's configs leave a token unset.
_CLASS_DEFAULT_TOKENS = {
    "CLIPTokenizer": {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    },
    "SiglipTokenizer": {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
}


def _context_length_from_configs(tokenizer_config: dict[str, Any], model_config: dict[str, Any]) -> int | None:
    model_max_length = tokenizer_config.get("model_max_length")
    if isinstance(model_max_length, (int, float)) and 0 < model_max_length < _UNBOUNDED_LENGTH:
        return int(model_max_length)
    text_config = model_config.get("text_config", model_config)
    return text_config.get("max_position_embeddings")


# SentencePiece model protobuf, read with a minimal wire-format decoder so that neither `sentencepiece`
# nor generated protobuf code is needed. Field numbers follow sentencepiece_model.proto.
_PIECE_TYPE_UNKNOWN, _PIECE_TYPE_CONTROL, _PIECE_TYPE_USER_DEFINED = 2, 3, 4
_MODEL_TYPE_UNIGRAM = 1


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decodes one protobuf message into (field number, value) pairs; length-delimited values stay bytes."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"Unsupported protobuf wire type {wire_type} in a SentencePiece model.")
        fields.append((number, value))
    return fields


def _parse_spiece(model_bytes: bytes) -> dict[str, Any]:
    pieces, model_type, unk_id, byte_fallback, charsmap = [], _MODEL_TYPE_UNIGRAM, 0, False, b""
    for number, value in _proto_fields(model_bytes):
        if number == 1:
            piece = {"piece": "", "score": 0.0, "type": 1}
            for field, field_value in _proto_fields(value):
                if field == 1:
                    piece["piece"] = field_value.decode("utf-8")
                elif field == 2:
                    piece["score"] = struct.unpack("<f", field_value)[0]
                elif field == 3:
                    piece["type"] = field_value
            pieces.append(piece)
        elif number == 2:
            for field, field_value in _proto_fields(value):
                if field == 3:
                    model_type = field_value
                elif field == 40:
                    unk_id = field_value
                elif field == 35:
                    byte_fallback = bool(field_value)
        elif number == 3:
            for field, field_value in _proto_fields(value):
                if field == 2:
                    charsmap = field_value
    if model_type != _MODEL_TYPE_UNIGRAM:
        raise ValueError(
            f"Expected a Unigram SentencePiece model (type 1) as SigLIP uses, found model type {model_type}."
        )
    return {"pieces": pieces, "unk_id": unk_id, "byte_fallback": byte_fallback, "precompiled_charsmap": charsmap}


def siglip_tokenizer_from_spiece(
    model_bytes: bytes, *, eos_token: str = "</s>", do_lower_case: bool = True
) -> tokenizers.Tokenizer:
    """Builds the `tokenizers` pipeline equivalent to transformers' `SiglipTokenizer`.

    SiglipTokenizer canonicalizes each text as big_vision does (lower-case, drop ASCII punctuation,
    collapse whitespace, strip), then runs SentencePiece, then appends EOS.

    Args:
      model_bytes: the serialized `spiece.model`.
    Returns:
      a `tokenizers.Tokenizer` without padding or truncation.
    """
    spiece = _parse_spiece(model_bytes)
    vocab = [(piece["piece"], piece["score"]) for piece in spiece["pieces"]]
    tok = tokenizers.Tokenizer(
        tokenizers.models.Unigram(vocab, unk_id=spiece["unk_id"], byte_fallback=spiece["byte_fallback"])
    )
    # `\s` of Python's `re` (what SigLIP's canonicalization collapses) is `str.isspace`, wider than
    # the regex engine's `\s`, so the class is spelled out.
    python_whitespace = (c for c in map(chr, range(0x3001)) if c.isspace())
    whitespace = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in python_whitespace) + "]+"
    punctuation = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in string.punctuation) + "]"
    canonicalize = [normalizers.Replace(_SPIECE_UNDERLINE, " ")]
    if do_lower_case:
        # Python's str.lower maps a word-final capital sigma to "ς"; the Lowercase normalizer maps
        # characters one at a time, so the context rule is applied first. Look-behind must have bounded
        # length, hence up to eight case-ignorable characters between the cased letter and the sigma.
        preceded = "|".join(r"\p{Cased}" + r"\p{Case_Ignorable}" * n for n in range(9))
        final_sigma = Regex(rf"(?<={preceded})\x{{3a3}}(?!\p{{Case_Ignorable}}*\p{{Cased}})")
        canonicalize += [normalizers.Replace(final_sigma, "\u03c2"), normalizers.Lowercase()]
    canonicalize += [
        normalizers.Replace(Regex(punctuation), ""),
        normalizers.Replace(Regex(whitespace), " "),
        normalizers.Strip(),
    ]
    sentencepiece_normalize = []
    if spiece["precompiled_charsmap"]:
        sentencepiece_normalize.append(normalizers.Precompiled(spiece["precompiled_charsmap"]))
    sentencepiece_normalize += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(canonicalize + sentencepiece_normalize)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    special_pieces = [
        tokenizers.AddedToken(piece["piece"], special=True, normalized=False)
        for piece in spiece["pieces"]
        if piece["type"] in (_PIECE_TYPE_UNKNOWN, _PIECE_TYPE_CONTROL)
    ]
    tok.add_special_tokens(special_pieces)
    user_pieces = [piece["piece"] for piece in spiece["pieces"] if piece["type"] == _PIECE_TYPE_USER_DEFINED]
    if user_pieces:
        tok.add_tokens([tokenizers.AddedToken(piece, normalized=False) for piece in user_pieces])
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"EOS token {eos_token!r} is not a piece of the SentencePiece model.")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos_token}", special_tokens=[(eos_token, eos_id)])
    return tok
