"""RECO: retrieval-enhanced contrastive models on a frozen CLIP, CLIP vs CLIP+RECO side by side.

    python -m vlm_jax.main --config=experiments/reco.py                      # Shapes World (start here)
    python -m vlm_jax.main --config=experiments/reco.py:shapes,smoke=True    # CI-sized, about a minute
    python -m vlm_jax.main --config=experiments/reco.py:cc12m_b32 \\
        --config.clip_dir=/ckpt/clip-vit-base-patch32 \\
        --config.memory.data.paths='/data/laion400m/*.array_record' \\
        --config.train_data.cc12m.paths='/data/cc12m/*.array_record' --config.data_dir=/data/tfds
    python -m vlm_jax.main --config=experiments/reco.py:cc12m_b32,backend=scann ...   # memory on the host

What runs (`vlm_jax.methods.reco.reco_task` on the shared runner, each stage resumable): the frozen CLIP (clip_dir, or the
Shapes World CLIP of experiments/clip.py, trained once into the shared cache and reused), the memory
embedded into <workdir>/memory, the training pairs and eval sets embedded once, then the fusion
trained by the shared trainer for every variant (RECO, cross-modal search, mean fusion) and seed,
and a table of CLIP vs each variant (mean ± std over seeds) printed and written to results.json.

Presets:
  shapes (default): Shapes World. Memory: the `memory` split's "a photo of a <name>." texts, which
    name every entity, rare ones included (novel ones are only described). Training pairs: the
    `pretrain` split's weak (alt-text-like) captions, the same data the CLIP saw: nothing new is
    learnt from them except how to use the memory. Zero-shot top-1 on all / common / rare / novel
    entities and image<->dense-caption retrieval R@1.
  cc12m_b32: a pretrained CLIP ViT-B/32 directory (Hugging Face format) frozen; memory from a
    user's image-text corpus (LAION/CC12M-style ArrayRecord written by `vlm_jax.data.corpora`),
    searched on device (exact top-k, rows sharded over every device) or with backend=scann on the
    host; the fusion trained on CC12M (batch 4096, lr 1e-3, 10 epochs as in the paper) on stored
    embeddings; zero-shot top-1 on Cars, CUB, Flowers, ImageNet, Places365 and Stanford Dogs.
Options: smoke=True (tiny CLIP, shapes_world/test, a few steps, one seed); backend=exact|approx|scann
  (where the memory is searched at evaluation; training always uses precomputed neighbours).
Plots (`vlm_jax.plots`): training.png, reco_accuracy.png and reco_k.png (top-1 against the k of
`reco.eval_ks`) in <workdir>/plots.
"""

import pathlib

import ml_collections

from vlm_jax import config_lib
from vlm_jax.data import pipeline
from vlm_jax.evaluate.suite import eval_spec
from vlm_jax.memory.build import memory_config
from vlm_jax.methods.reco import reco_config
from vlm_jax.train.trainer import trainer_config

PRESETS = ("shapes", "cc12m_b32")


def _sibling(name: str):
    """Another config file of experiments/ as a module (its shared snippets)."""
    return config_lib.experiment_module(pathlib.Path(__file__).with_name(f"{name}.py"))


def _common(config: ml_collections.ConfigDict) -> None:
    config.method = "reco"  # vlm_jax.methods.reco.RecoMethod, trained by the shared trainer
    config.dtype = "float32"  # compute dtype of the fusion (RecoMethod)
    # Frozen CLIP: a Hugging Face CLIP/SigLIP directory. "" with clip_config set: the base CLIP that
    # experiment trains, built once per resolved config in the cache (cache_dir) and reused.
    config.clip_dir = ""
    config.clip_config = ""
    # Where the base CLIP of clip_config is trained once and reused ("": $VLM_JAX_CACHE, else ~/.cache/vlm_jax).
    config.cache_dir = ""
    config.seeds = 3  # fusion runs per variant, seeds seed, seed + 1, ...
    # Variants trained and evaluated side by side: nested overrides of this config (checked field by field).
    config.variants = ml_collections.ConfigDict({
        "reco": {},                                       # uni-modal search, transformer fusion (the paper's design)
        "crossmodal": {"reco": {"search": "crossmodal"}},  # ablation: image -> memory texts directly (and text -> images)
        "mean": {"reco": {"fusion": "mean"}},             # ablation: average of query and retrieved, no fusion transformer
    })
    config.baseline_label = "CLIP (frozen)"
    config.variant_labels = ml_collections.ConfigDict({
        "reco": "CLIP+RECO", "crossmodal": "  cross-modal search", "mean": "  mean instead of fusion"})
    config.reco = reco_config()
    config.reco.training_retrieval = "precomputed"
    # Stored frozen-CLIP embeddings: of the training pairs of every `train_data` source (train) and of
    # the eval sets (eval).
    config.embeddings = ml_collections.ConfigDict(
        {"train": True, "eval": True, "shard_size": 4096, "batch_size": 256, "dtype": "float32", "progress": True})
    # Sampling weight per train_data source (empty: in proportion to size, uniform over the union).
    config.train_weights = ml_collections.ConfigDict()
    config.optim.trainable = ((r"^clip/", False), (r".*", True))  # the CLIP stays frozen: only fusions and temperature
    config.progress = True  # a bar per fusion run (rate, ETA)
    config.eval_every = 0


def _index(backend: str, *, dtype: str) -> dict:
    """The memory search (`vlm_jax.memory.index.IndexConfig`): device exact/approx top-k with rows
    sharded over every device, or ScaNN on the host (tree size chosen from the memory size)."""
    if backend == "scann":
        return {"backend": "scann"}
    return {"backend": backend, "dtype": dtype, "recall_target": 0.95}


def _shapes(config: ml_collections.ConfigDict, smoke: bool, backend: str) -> None:
    clip_arg = ":shapes,smoke=True" if smoke else ":shapes"
    config.clip_config = str(pathlib.Path(__file__).with_name("clip.py")) + clip_arg
    tfds_name = "shapes_world/test" if smoke else "shapes_world/default"
    shapes = dict(source="tfds", tfds_name=tfds_name, data_dir=config.get_ref("data_dir"))

    config.memory = memory_config()
    for key, value in shapes.items():
        setattr(config.memory.data, key, value)
    config.memory.data.split = "memory"
    config.memory.data.text_keys = ("name_caption",)
    config.memory.shard_size = 64 if smoke else 1024
    config.memory.batch_size = 64 if smoke else 256

    # Training pairs: the CLIP's own pre-training pairs (weak captions), plus the memory's pairs, each
    # kept from retrieving itself (reco.exclude_self): the naming texts teach the fusion to use what
    # the memory says about an entity (README, Results, measures the choice).
    pretrain = pipeline.default_config()
    memory_pairs = pipeline.default_config()
    for section in (pretrain, memory_pairs):
        for key, value in shapes.items():
            setattr(section, key, value)
    pretrain.split, pretrain.text_keys = "pretrain", ("weak_caption",)
    memory_pairs.split, memory_pairs.text_keys = "memory", ("name_caption",)
    config.train_data = ml_collections.ConfigDict({"pretrain": pretrain, "memory": memory_pairs})
    # A quarter of each batch from the memory pairs (their share by size is 15%). This share is the
    # knob between rare and common entities: more of it (or more steps, a larger batch) moves
    # rare-entity accuracy up and common-entity accuracy down (README, Results, measures the trade-off).
    config.train_weights = ml_collections.ConfigDict({"pretrain": 0.75, "memory": 0.25})
    config.embeddings.shard_size = 128 if smoke else 4096
    config.embeddings.batch_size = 64 if smoke else 256

    config.reco.k = 16  # every memory pair of an entity (16 per entity) can reach a query
    config.reco.fusion_config.width = 32 if smoke else 128  # 64: rare 6.2%, common 20.7% (2 seeds)
    config.reco.fusion_config.heads = 4
    config.reco.fusion_config.mlp_ratio = 2.0
    config.reco.fusion_config.retrieved_dropout = 0.1
    config.reco.index = _index(backend, dtype="float32")
    # Each trained fusion evaluated again with k items for every k here (plots/reco_k.png); on the
    # stored eval embeddings every k costs one more pass of the fusion over them, not of the CLIP.
    config.reco.eval_ks = (1, 4) if smoke else (1, 2, 4, 8, 16, 32)

    config.seeds = 1 if smoke else 3
    config.global_batch_size = 32 if smoke else 256
    config.total_steps = 4 if smoke else 300
    config.log_every = 2 if smoke else 100
    config.optim.learning_rate = 4e-4
    config.optim.warmup_steps = 1 if smoke else 20
    config.optim.weight_decay = 0.0
    config.checkpoint.save_interval_steps = 100_000  # runs take seconds: only the final step is saved
    config.checkpoint.max_to_keep = 1

    config.evals = _sibling("zero_shot").shapes_evals(smoke=smoke, data_dir=config.get_ref("data_dir"))
    config.table = (
        ("shapes/top1", "all"),
        ("shapes/top1_common", "common"),
        ("shapes/top1_rare", "rare"),
        ("shapes/top1_novel", "novel"),
        ("shapes_retrieval/image_retrieval_recall@1", "T->I R@1"),
        ("shapes_retrieval/text_retrieval_recall@1", "I->T R@1"),
    )


def _cc12m_b32(config: ml_collections.ConfigDict, smoke: bool, backend: str) -> None:
    corpus = dict(source="array_record", paths="", text_keys=("caption",), id_key="id", worker_count=16)
    config.memory = memory_config()  # e.g. LAION-400M de-duplicated against the eval sets
    for key, value in corpus.items():
        setattr(config.memory.data, key, value)
    config.memory.shard_size = 1 << 18
    config.memory.batch_size = 1024
    config.memory.dtype = "float16"  # 1 KB per pair at D = 512: 400 GB for LAION-400M
    config.memory.model_dtype = "bfloat16"

    cc12m = pipeline.default_config()  # the training pairs
    for key, value in corpus.items():
        setattr(cc12m, key, value)
    config.train_data = ml_collections.ConfigDict({"cc12m": cc12m})
    config.embeddings.train = True  # 10 epochs on one stored pass: the frozen towers run once
    config.embeddings.eval = False  # evaluation searches the memory from inside encode_image/encode_text
    config.embeddings.shard_size = 1 << 18
    config.embeddings.batch_size = 1024
    config.embeddings.dtype = "float16"

    config.reco.k = 10
    # One layer of width 512 per modality (attention 1.05M, output projection 0.26M, MLP 0.26M at
    # ratio 0.5): 2 x 1.6M, the ~3.2M fusion parameters the paper gives for B/32.
    config.reco.fusion_config.width = 512
    config.reco.fusion_config.heads = 8
    config.reco.fusion_config.mlp_ratio = 0.5
    config.reco.fusion_config.retrieved_dropout = 0.1
    config.reco.index = _index(backend, dtype="bfloat16")
    # No k sweep by default: on pixels each k of reco.eval_ks runs the image tower over the eval sets again.

    config.seeds = 1
    epochs, examples = 10, 12_000_000
    config.global_batch_size = 64 if smoke else 4096
    config.total_steps = 4 if smoke else epochs * examples // 4096
    config.log_every = 1 if smoke else 100
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1 if smoke else 1000
    config.optim.weight_decay = 0.0
    config.checkpoint.save_interval_steps = 4 if smoke else 2000
    config.checkpoint.max_to_keep = 2
    config.sharding.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))

    suite = _sibling("zero_shot").RECO_SUITE
    config.evals = ml_collections.ConfigDict({
        name: eval_spec(type="zero_shot", data=dict(dataset=name, data_dir=config.get_ref("data_dir")))
        for name in suite
    })
    config.table = tuple((f"{name}/top1", name) for name in suite)


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, presets=PRESETS, default="shapes", smoke=False, backend="exact")
    if arg.backend not in ("exact", "approx", "scann"):
        raise config_lib.ConfigError(f"backend={arg.backend!r} is not 'exact', 'approx' or 'scann'.")
    config = trainer_config()
    config.task = "reco"  # vlm_jax.methods.reco.reco_task
    config.preset = arg.preset
    config.seed = 0
    # TFDS data_dir for Shapes World (built there on first use) and the eval datasets.
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    _common(config)
    if arg.preset == "shapes":
        _shapes(config, arg.smoke, arg.backend)
    else:
        _cc12m_b32(config, arg.smoke, arg.backend)
    return config
