"""Name table between transformers CLIPModel / SiglipModel tensors and our CLIP params.

Our module tree mirrors transformers', so most entries are renames of the leaf
(``weight`` -> ``kernel`` / ``scale`` / ``embedding``). Layout changes happen here, once:
  kernel:    torch Linear weight [out, in] -> [in, out], with heads split out of the
             q/k/v (in=embed, out=heads*kv) and out_proj (in=heads*kv) dimensions.
  conv:      patch conv weight [width, 3, p, p] -> [p*p*3, width] in (row, col, channel) order.
  fused_qkv: SigLIP's MAP head torch.nn.MultiheadAttention ``in_proj_weight`` [3*width, width]
             (and ``in_proj_bias``) -> separate q/k/v kernels (biases).
  scalar1:   SigLIP's logit_scale / logit_bias [1] -> scalars.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.models.clip import CLIPConfig

Shape = tuple[int, ...]

# Non-persistent buffers that older transformers versions still wrote into checkpoints.
IGNORED_SUFFIXES = (".position_ids",)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """to_ours(hf_array, our_shapes) -> our arrays; to_hf(our arrays) -> hf_array;
    hf_shape(our_shapes) -> the shape transformers stores."""

    to_ours: Callable[[np.ndarray, Sequence[Shape]], list[np.ndarray]]
    to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]
    hf_shape: Callable[[Sequence[Shape]], Shape]


def _kernel(in_ndim: int) -> Conversion:
    def to_hf_one(kernel: np.ndarray) -> np.ndarray:
        return kernel.reshape(math.prod(kernel.shape[:in_ndim]), -1).T

    return Conversion(
        to_ours=lambda w, shapes: [w.T.reshape(shapes[0])],
        to_hf=lambda arrays: to_hf_one(arrays[0]),
        hf_shape=lambda shapes: (math.prod(shapes[0][in_ndim:]), math.prod(shapes[0][:in_ndim])))


def _conv_to_ours(weight: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
    return [weight.transpose(2, 3, 1, 0).reshape(shapes[0])]


def _conv_to_hf(arrays: Sequence[np.ndarray]) -> np.ndarray:
    kernel = arrays[0]
    patch = math.isqrt(kernel.shape[0] // 3)
    return kernel.reshape(patch, patch, 3, kernel.shape[1]).transpose(3, 2, 0, 1)


def _conv_hf_shape(shapes: Sequence[Shape]) -> Shape:
    patch = math.isqrt(shapes[0][0] // 3)
    return (shapes[0][1], 3, patch, patch)


def _split3(array: np.ndarray) -> list[np.ndarray]:
    if array.shape[0] % 3:
        raise ValueError(f"fused q/k/v tensor of shape {array.shape} does not split in three")
    return np.split(array, 3, axis=0)


CONVERSIONS: dict[str, Conversion] = {
    "copy": Conversion(lambda a, shapes: [a], lambda arrays: arrays[0], lambda shapes: shapes[0]),
    "kernel": _kernel(1),
    "kernel_from_heads": _kernel(2),
    "bias": Conversion(lambda b, shapes: [b.reshape(shapes[0])],
                       lambda arrays: arrays[0].reshape(-1),
                       lambda shapes: (math.prod(shapes[0]),)),
    "conv": Conversion(_conv_to_ours, _conv_to_hf, _conv_hf_shape),
    "fused_qkv_kernel": Conversion(
        lambda w, shapes: [part.T.reshape(shape) for part, shape in zip(_split3(w), shapes)],
        lambda arrays: np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays], axis=0),
        lambda shapes: (3 * math.prod(shapes[0][1:]), shapes[0][0])),
    "fused_qkv_bias": Conversion(
        lambda b, shapes: [part.reshape(shape) for part, shape in zip(_split3(b), shapes)],
        lambda arrays: np.concatenate([a.reshape(-1) for a in arrays]),
        lambda shapes: (3 * math.prod(shapes[0]),)),
    "scalar1": Conversion(lambda a, shapes: [a.reshape(())], lambda arrays: arrays[0].reshape(1),
                          lambda shapes: (1,)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One transformers tensor and the dotted paths of the params it becomes."""

    hf: str
    ours: tuple[str, ...]
    conversion: str = "copy"


def _linear(prefix: str, *, bias: bool = True, conversion: str = "kernel") -> list[Entry]:
    entries = [Entry(f"{prefix}.weight", (f"{prefix}.kernel",), conversion)]
    if bias:
        entries.append(Entry(f"{prefix}.bias", (f"{prefix}.bias",), "bias"))
    return entries


def _layer_norm(prefix: str) -> list[Entry]:
    return [Entry(f"{prefix}.weight", (f"{prefix}.scale",)), Entry(f"{prefix}.bias", (f"{prefix}.bias",))]


def _attention(prefix: str) -> list[Entry]:
    return [*_linear(f"{prefix}.q_proj"), *_linear(f"{prefix}.k_proj"), *_linear(f"{prefix}.v_proj"),
            *_linear(f"{prefix}.out_proj", conversion="kernel_from_heads")]


def _mlp(prefix: str) -> list[Entry]:
    return [*_linear(f"{prefix}.fc1"), *_linear(f"{prefix}.fc2")]


def _encoder(prefix: str, depth: int) -> list[Entry]:
    entries = []
    for i in range(depth):
        layer = f"{prefix}.layers.{i}"
        entries += [*_layer_norm(f"{layer}.layer_norm1"), *_attention(f"{layer}.self_attn"),
                    *_layer_norm(f"{layer}.layer_norm2"), *_mlp(f"{layer}.mlp")]
    return entries


def _map_head(prefix: str) -> list[Entry]:
    attention = f"{prefix}.attention"
    qkv = ("q_proj", "k_proj", "v_proj")
    return [
        Entry(f"{prefix}.probe", (f"{prefix}.probe",)),
        Entry(f"{attention}.in_proj_weight", tuple(f"{attention}.{p}.kernel" for p in qkv),
              "fused_qkv_kernel"),
        Entry(f"{attention}.in_proj_bias", tuple(f"{attention}.{p}.bias" for p in qkv), "fused_qkv_bias"),
        *_linear(f"{attention}.out_proj", conversion="kernel_from_heads"),
        *_layer_norm(f"{prefix}.layernorm"),
        *_mlp(f"{prefix}.mlp"),
    ]


def hf_param_table(config: CLIPConfig) -> list[Entry]:
    """Every tensor of the transformers checkpoint for ``config`` and where it goes."""
    vision, text = config.vision, config.text
    siglip = config.kind == "siglip"
    v = "vision_model"
    entries = [Entry(f"{v}.embeddings.patch_embedding.weight",
                     (f"{v}.embeddings.patch_embedding.kernel",), "conv")]
    if vision.patch_bias:
        entries.append(Entry(f"{v}.embeddings.patch_embedding.bias",
                             (f"{v}.embeddings.patch_embedding.bias",)))
    if vision.pooling == "cls":
        entries.append(Entry(f"{v}.embeddings.class_embedding", (f"{v}.embeddings.class_embedding",)))
    entries.append(Entry(f"{v}.embeddings.position_embedding.weight",
                         (f"{v}.embeddings.position_embedding.embedding",)))
    if vision.pre_norm:
        entries += _layer_norm(f"{v}.pre_layrnorm")
    entries += _encoder(f"{v}.encoder", vision.depth)
    entries += _layer_norm(f"{v}.post_layernorm")
    if vision.pooling == "map":
        entries += _map_head(f"{v}.head")

    t = "text_model"
    entries += [
        Entry(f"{t}.embeddings.token_embedding.weight", (f"{t}.embeddings.token_embedding.embedding",)),
        Entry(f"{t}.embeddings.position_embedding.weight",
              (f"{t}.embeddings.position_embedding.embedding",)),
        *_encoder(f"{t}.encoder", text.depth),
        *_layer_norm(f"{t}.final_layer_norm"),
    ]
    if siglip:
        entries += _linear(f"{t}.head")
        entries += [Entry("logit_scale", ("logit_scale",), "scalar1"),
                    Entry("logit_bias", ("logit_bias",), "scalar1")]
    else:
        entries += [*_linear("visual_projection", bias=False), *_linear("text_projection", bias=False),
                    Entry("logit_scale", ("logit_scale",))]
    return entries


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose tensors do not match the model built from its config (a one-line message
    naming the file and the first differing parameter)."""


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def mismatch_error(source: str, *, against: str, first: str, missing: Sequence[str], unexpected: Sequence[str],
                   mismatched: Sequence[str], fix: str) -> CheckpointMismatchError:
    """The one-line error for a checkpoint `source` (a file) that does not match `against` ("the
    model built from <config file>"); `first` is the first differing parameter and what differs."""
    problems = [f"{title} ({len(items)}): {_listed(list(items))}" for title, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
    return CheckpointMismatchError(f"checkpoint {source} does not match {against}: first difference {first}; "
                                   f"{'; '.join(problems)}; {fix}")


def convert_from_hf(
    tensors: Mapping[str, np.ndarray],
    table: Sequence[Entry],
    shapes: Mapping[str, Shape],
    *,
    source: str,
    against: str,
) -> dict[str, np.ndarray]:
    """transformers tensors -> {our dotted param path: array}.

    shapes: our param shapes by dotted path. source: the weights file and against: the model
    ("the model built from <config.json>"), for messages. Raises one CheckpointMismatchError naming the first differing
    tensor and counting every missing, unexpected and shape-mismatched one.
    """
    known = {entry.hf for entry in table}
    unexpected = sorted(name for name in tensors
                        if name not in known and not name.endswith(IGNORED_SUFFIXES))
    missing, mismatched, differences = [], [], []
    for entry in table:
        if entry.hf not in tensors:
            missing.append(entry.hf)
            differences.append(f"{entry.hf} (missing from the checkpoint)")
            continue
        want = CONVERSIONS[entry.conversion].hf_shape([shapes[path] for path in entry.ours])
        found = tuple(tensors[entry.hf].shape)
        if found != tuple(want):
            mismatched.append(f"{entry.hf}: checkpoint {found}, model expects {tuple(want)}")
            differences.append(mismatched[-1])
    differences += [f"{name} (not in the model)" for name in unexpected]
    if differences:
        raise mismatch_error(source, against=against, first=differences[0], missing=missing, unexpected=unexpected,
                             mismatched=mismatched, fix="fix config.json or the weights so they describe the same "
                             "model.")
    params = {}
    for entry in table:
        conversion = CONVERSIONS[entry.conversion]
        arrays = conversion.to_ours(np.asarray(tensors[entry.hf]), [shapes[p] for p in entry.ours])
        params.update(zip(entry.ours, arrays))
    return params


def convert_to_hf(params: Mapping[str, np.ndarray], table: Sequence[Entry]) -> dict[str, np.ndarray]:
    """{our dotted param path: array} -> transformers tensors (C-contiguous)."""
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them [1]).
    return {entry.hf: np.require(
                CONVERSIONS[entry.conversion].to_hf([params[p] for p in entry.ours]), requirements="C")
            for entry in table}
