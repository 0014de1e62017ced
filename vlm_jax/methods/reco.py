"""RECO: retrieval-enhanced contrastive vision-text models (Iscen, Caron, Fathi, Schmid; ICLR 2024).

A frozen CLIP embeds an image (v) and a text (t). Knowledge its parameters lack lives in a memory
of image-text pairs, embedded once by the same CLIP (`vlm_jax.memory.build`). RECO refines each
embedding with what the memory holds about it; only a small fusion module per modality trains.

1. Uni-modal search, cross-modal fusion: v searches the memory's *images* and receives the paired
   *texts* of its k nearest neighbours; t searches the *texts* and receives the paired *images*.
   Ablation `search="crossmodal"`: an image searches the memory's texts and receives them.
2. Fusion: one transformer layer per modality over [v; t_1 .. t_k]; the output at the query is
   the refined v̄ (`vlm_jax.models.fusion`). Ablations: `fusion="mean"`, `fusion="none"`.
3. Loss: L = NCE(v̄, t̄) + NCE(v̄, t) + NCE(v, t̄), one learnable temperature; the mixed terms keep
   a refined embedding compatible with the other modality's plain one (zero-shot prompts).

Retrieval is data: `RECO.refine(modality, query, retrieved, valid)` is pure. The memory is a
retriever (`vlm_jax.memory.device.DeviceRetriever`, rows sharded over devices, searched inside
jit; or `vlm_jax.memory.host.HostRetriever`, ScaNN on the host). Training on a frozen CLIP and a
fixed memory searches once: neighbour ids [M, k] are precomputed on the host, the batch carries
ids [B, k] and the values are gathered on device from the placed memory table. A training example
that is also in the memory never retrieves itself (`exclude_self`; `memory_row` in the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlm_jax.config_lib import (ConfigError, defaults_of, require_data_files, require_eval_files, require_path,
                                typed)
from vlm_jax.memory import neighbours as neighbours_lib
from vlm_jax.memory.device import DeviceRetriever, default_mesh, place_memory
from vlm_jax.memory.index import IndexConfig
from vlm_jax.models.clip import CLIP
from vlm_jax.models.fusion import Fusion, FusionConfig, MeanFusion
from vlm_jax.models.layers import l2_normalize
from vlm_jax.models.losses import DEFAULT_BATCH_AXES, softmax_contrastive_loss

MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class RecoConfig:
    """`config.reco`. k: neighbours per query. search: "unimodal" | "crossmodal". fusion:
    "transformer" | "mean" | "none"; fusion_config: `FusionConfig` (embed_dim and dtypes come from
    the CLIP). logit_scale_init: None takes the CLIP's. train_encoders: let gradients reach the
    towers. memory_dir / eval_memory_dir ("": memory_dir): `vlm_jax.memory.build` directories.
    index: the memory search (`IndexConfig`). training_retrieval: "on_the_fly" (search in the
    step) | "precomputed". exclude_self / dedup_threshold: drop the example's own memory row /
    neighbours with cosine >= threshold. train_embeddings_dirs, train_weights: train on stored
    frozen-CLIP pairs of these directories, mixed by weight (() : pixels of `config.data`). eval_ks: each
    zero-shot eval of view "reco" again as "<name>@k<j>", view "reco@k<j>": the fusion over j items."""

    k: int = 10
    search: str = "unimodal"
    fusion: str = "transformer"
    fusion_config: FusionConfig = FusionConfig()
    logit_scale_init: float | None = None
    train_encoders: bool = False
    memory_dir: str = ""
    eval_memory_dir: str = ""
    index: IndexConfig = IndexConfig()
    training_retrieval: str = "on_the_fly"
    exclude_self: bool = True
    dedup_threshold: float | None = None
    train_embeddings_dirs: tuple[str, ...] = ()
    train_weights: tuple[float, ...] = ()
    eval_ks: tuple[int, ...] = ()

    def __post_init__(self):
        for field, allowed in (("search", ("unimodal", "crossmodal")), ("fusion", ("transformer", "mean", "none")),
                               ("training_retrieval", ("on_the_fly", "precomputed"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"reco.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.k < 1 or any(k < 1 for k in self.eval_ks):
            raise ValueError(f"reco.k and every reco.eval_ks entry must be >= 1, got {self.k} and {self.eval_ks}")


def reco_config() -> ml_collections.ConfigDict:
    """The `config.reco` section with every field and its default."""
    return defaults_of(RecoConfig)


def parse_reco(section: Any) -> RecoConfig:
    """`config.reco` -> RecoConfig; an unknown field anywhere in it is a one-line ConfigError."""
    return typed(RecoConfig, section, "reco")


def keys_and_values(modality: str, search: str) -> tuple[str, str]:
    """Memory embeddings a query of `modality` searches (keys) and receives (values)."""
    other = "text" if modality == "image" else "image"
    return (modality, other) if search == "unimodal" else (other, other)


class RECO(nnx.Module):
    """A frozen CLIP, one fusion per modality and the fusion temperature `logit_scale`."""

    def __init__(self, clip: CLIP, config: RecoConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.clip = clip
        fusion = dataclasses.replace(config.fusion_config, embed_dim=clip.config.embed_dim)
        make = {"transformer": lambda: Fusion(fusion, rngs=rngs), "mean": lambda: MeanFusion(fusion.retrieved_dropout),
                "none": lambda: None}[config.fusion]
        self.image_fusion, self.text_fusion = make(), make()
        initial = clip.logit_scale[...] if config.logit_scale_init is None else config.logit_scale_init
        self.logit_scale = nnx.Param(jnp.asarray(initial, jnp.dtype(fusion.param_dtype)), out_sharding=(),
                                     eager_sharding=False)

    def refine(self, modality: str, query: jax.Array, retrieved: jax.Array, valid: jax.Array,
               rng: jax.Array | None = None) -> jax.Array:
        """Unit queries [B, D], retrieved values [B, k, D] and their mask [B, k] -> float32 [B, D]."""
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        if fusion is None:
            return query.astype(jnp.float32)
        return fusion(query, retrieved, valid, rng=rng)


def retrieve(retriever, modality: str, queries: jax.Array, config: RecoConfig,
             exclude_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Uni-modal search (or the ablation) for unit queries [B, D]: (values [B, k, D], valid [B, k])."""
    key, value = keys_and_values(modality, config.search)
    ids = retriever.search(queries, key, config.k, exclude_rows=exclude_rows, dedup_threshold=config.dedup_threshold)
    return retriever.gather(ids, value), ids >= 0


def reco_loss(image, text, refined_image, refined_text, logit_scale, *, mesh=None, axis=DEFAULT_BATCH_AXES):
    """L = NCE(v̄, t̄) + NCE(v̄, t) + NCE(v, t̄) over the global batch; (loss, metrics per term)."""
    nce = functools.partial(softmax_contrastive_loss, logit_scale=logit_scale, mesh=mesh, axis=axis)
    terms = {"refined_refined": nce(refined_image, refined_text), "refined_image": nce(refined_image, text),
             "refined_text": nce(image, refined_text)}
    metrics = {"scale": terms["refined_refined"][1]["scale"]}
    for name, (term_loss, term_metrics) in terms.items():
        metrics[f"loss_{name}"] = term_loss
        metrics[f"i2t_accuracy_{name}"] = term_metrics["i2t_accuracy"]
        metrics[f"t2i_accuracy_{name}"] = term_metrics["t2i_accuracy"]
    return sum(term_loss for term_loss, _ in terms.values()), metrics


@flax.struct.dataclass
class RecoConstants:
    """What every train step receives unchanged: the memory retriever (None for fusion "none")."""

    retriever: DeviceRetriever | None
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    batch_axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=DEFAULT_BATCH_AXES)


def loss_fn(model: RECO, batch: Mapping[str, jax.Array], constants: RecoConstants, rng: jax.Array | None):
    """Batch: "image_embedding"/"text_embedding" [B, D] (or "image" pixels / "text_ids"); optional
    precomputed "neighbours_image"/"neighbours_text" int32 [B, k] (memory rows, -1 none) and
    "memory_row" int32 [B] (the example's own row, excluded from an on-the-fly search)."""
    images = batch["image_embedding"] if "image_embedding" in batch else model.clip.encode_image(batch["image"])
    texts = batch["text_embedding"] if "text_embedding" in batch else model.clip.encode_text(batch["text_ids"])
    images, texts = l2_normalize(images.astype(jnp.float32)), l2_normalize(texts.astype(jnp.float32))
    if not model.config.train_encoders:
        images, texts = jax.lax.stop_gradient(images), jax.lax.stop_gradient(texts)
    rngs = jax.random.split(rng) if rng is not None else (None, None)
    refined = {}
    for modality, queries, fusion_rng in zip(MODALITIES, (images, texts), rngs):
        if constants.retriever is None:
            refined[modality] = queries
            continue
        ids = batch.get(f"neighbours_{modality}")
        if ids is None:
            values, valid = retrieve(constants.retriever, modality, queries, model.config, batch.get("memory_row"))
        else:
            values = constants.retriever.gather(ids, keys_and_values(modality, model.config.search)[1])
            valid = ids >= 0
        refined[modality] = model.refine(modality, queries, values, valid, rng=fusion_rng)
    loss, metrics = reco_loss(images, texts, refined["image"], refined["text"], model.logit_scale[...],
                              mesh=constants.mesh, axis=constants.batch_axes)
    return loss, {**metrics, "loss": loss}


@functools.partial(jax.jit, static_argnames=("graphdef", "modality", "host", "k"))
def _refine_embeddings(graphdef, state, table, embeddings, *, modality, host, k):
    """Evaluation: unit embeddings [b, D] -> refined [b, D] over the k nearest items, searching `host`
    or the placed `table`."""
    model = nnx.merge(graphdef, state)
    values, valid = retrieve(host if host is not None else table, modality, l2_normalize(embeddings),
                             dataclasses.replace(model.config, k=k))
    return model.refine(modality, l2_normalize(embeddings), values, valid)


class NeighbourIds:
    """Batch map: precomputed neighbour ids [M, k] of the concatenated sources' examples as
    "neighbours_image"/"neighbours_text" int32 [B, k]. An example's row is its "index" plus the
    offset of its "source" (a mixture numbers examples within each source)."""

    def __init__(self, ids: Mapping[str, np.ndarray], offsets: tuple[int, ...] = (0,)):
        self.ids, self.offsets = ids, np.asarray(offsets, np.int64)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = np.asarray(batch["index"], np.int64)
        if "source" in batch:
            rows = rows + self.offsets[np.asarray(batch["source"], np.int64)]
        return {**batch, **{f"neighbours_{m}": self.ids[m][rows].astype(np.int32) for m in MODALITIES}}


class RecoMethod:
    """RECO for the trainer (`vlm_jax.train.trainer.Method`); views "clip" and "reco".

    Config: clip_dir (the frozen CLIP), dtype, reco (`RecoConfig`), data (pixel training),
    global_batch_size, seed, evals. One instance serves a whole experiment: the CLIP, memories and
    neighbour tables load once.
    """

    def __init__(self):
        self._cache: dict[Any, Any] = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def pretrained(self, config):
        from vlm_jax.weights import load_pretrained  # noqa: PLC0415

        def load():
            with jax.ensure_compile_time_eval():  # create_model runs under a trace; the weights must be concrete
                return load_pretrained(config.clip_dir, dtype=config.dtype)

        return self._once(("clip", config.clip_dir, config.dtype), load)

    def memory(self, directory: str):
        from vlm_jax.memory.store import load_memory  # noqa: PLC0415

        if not directory:
            raise ConfigError("reco.memory_dir is not set; point it at a memory built by vlm_jax.memory.build.")
        return self._once(("memory", directory), lambda: load_memory(directory))

    def check_config(self, config) -> None:
        """One-line ConfigErrors for what a run on the frozen CLIP reads, before anything is built:
        clip_dir (with config.json), the memory, the stored training pairs or the pixel data, the
        eval files."""
        require_path(config.get("clip_dir"), "clip_dir", field="clip_dir", containing=("config.json",))
        reco = parse_reco(config.reco)
        if reco.fusion != "none":
            require_path(reco.memory_dir, "reco.memory_dir", field="reco.memory_dir")
        for directory in reco.train_embeddings_dirs:
            require_path(directory, "a reco.train_embeddings_dirs entry", field="reco.train_embeddings_dirs")
        if not reco.train_embeddings_dirs:
            require_data_files(config.data, "data")
        require_eval_files(config.get("evals"))

    def reads_weights(self, config) -> bool:
        return True

    def create_model(self, config, rngs: nnx.Rngs) -> RECO:
        return RECO(self.pretrained(config).model, parse_reco(config.reco), rngs=rngs)

    def _table(self, directory: str, index: IndexConfig, mesh: Mesh | None):
        """The memory's rows placed once on device (read chunk by chunk, never whole on the host): in
        the index's dtype for a device search, in their stored dtype where the table only serves
        gathers (host-searched neighbours). Sharded over `mesh` (None: every device) when first
        placed; later calls reuse it, whichever mesh they name (every mesh here spans all devices)."""
        memory = self.memory(directory)
        dtype = index.dtype if index.backend in ("exact", "approx") else None
        if mesh is None and jax.device_count() > 1:
            mesh = default_mesh()
        return self._once(("table", directory, dtype, index.mesh_axes), lambda: place_memory(
            memory.rows("image_embeddings"), memory.rows("text_embeddings"), mesh=mesh, axes=index.mesh_axes,
            dtype=dtype))

    def constants(self, config, mesh: Mesh | None) -> RecoConstants:
        reco = parse_reco(config.reco)
        axes = tuple(config.sharding.batch_axes) if mesh is not None else DEFAULT_BATCH_AXES
        if reco.fusion == "none":
            return RecoConstants(None, mesh, axes)
        if reco.training_retrieval == "on_the_fly" and reco.index.backend not in ("exact", "approx"):
            raise ConfigError(f"on-the-fly retrieval searches on device; reco.index.backend={reco.index.backend!r} "
                              "is a host backend: use 'exact'/'approx' or reco.training_retrieval='precomputed'.")
        table = self._table(reco.memory_dir, reco.index, mesh)
        return RecoConstants(DeviceRetriever(table, approximate=reco.index.backend == "approx",
                                             recall_target=reco.index.recall_target), mesh, axes)

    loss_fn = staticmethod(loss_fn)

    def train_iterator(self, config, process_index: int, process_count: int):
        from vlm_jax.data import pipeline  # noqa: PLC0415

        reco = parse_reco(config.reco)
        if reco.train_embeddings_dirs:
            parts = [self.memory(directory) for directory in reco.train_embeddings_dirs]
            # No weights: each source in proportion to its size, i.e. uniform over the union.
            weights = reco.train_weights or tuple(float(part.num_rows) for part in parts)
            if len(weights) != len(parts):
                raise ConfigError(f"reco.train_weights has {len(weights)} entries for {len(parts)} "
                                  "reco.train_embeddings_dirs; give one weight per directory.")
            sources = [pipeline.WeightedSource(pipeline.ArraySource(
                {"image_embedding": part.image_embeddings, "text_embedding": part.text_embeddings}),
                pipeline.ArrayDecoder(), weight) for part, weight in zip(parts, weights)]
            offsets = tuple(int(offset) for offset in np.cumsum([0] + [part.num_rows for part in parts[:-1]]))
            maps = () if reco.fusion == "none" else (NeighbourIds(self._stored_neighbours(reco, parts), offsets),)
            return iter(pipeline.train_mixture(
                sources, global_batch_size=int(config.global_batch_size), seed=int(config.seed),
                process_index=process_index, process_count=process_count, batch_maps=maps))
        pretrained = self.pretrained(config)
        maps = ()
        if reco.fusion != "none" and reco.exclude_self:
            maps = (neighbours_lib.MemoryRowLookup(self.memory(reco.memory_dir).ids),)
        return iter(pipeline.make_train_iterator(
            config.data, pretrained.preprocess, pretrained.tokenizer, int(config.global_batch_size), int(config.seed),
            process_index=process_index, process_count=process_count, batch_maps=maps))

    def _stored_neighbours(self, reco: RecoConfig, parts) -> dict[str, np.ndarray]:
        """Memory rows of each stored training pair's k neighbours, searched once on the host; a
        pair never retrieves its own memory row."""
        key = ("neighbours", reco.train_embeddings_dirs, reco.memory_dir, reco.k, reco.search, reco.exclude_self,
               reco.dedup_threshold, reco.index)

        def search():
            memory = self.memory(reco.memory_dir)
            exclude = (np.concatenate([neighbours_lib.self_match_rows(part, memory) for part in parts])
                       if reco.exclude_self else None)
            # A device index searches the table the train step gathers from, where it lives.
            retriever = (self.eval_retriever(dataclasses.replace(reco, eval_memory_dir=""))
                         if reco.index.backend in ("exact", "approx") else None)
            return {modality: neighbours_lib.neighbours_of_stored(
                parts, f"{modality}_embeddings", memory, f"{keys_and_values(modality, reco.search)[0]}_embeddings",
                k=reco.k, index_config=reco.index, retriever=retriever, exclude_rows=exclude,
                dedup_threshold=reco.dedup_threshold) for modality in MODALITIES}

        return self._once(key, search)

    def views(self, model: RECO, inputs) -> dict[str, Any]:
        """"clip": the frozen CLIP; "reco": the CLIP followed by the fusion over the eval memory;
        "reco@k<k>" per k of `reco.eval_ks`: the same with the k nearest items."""
        base = inputs(model.clip)
        ks = {"reco": model.config.k, **{f"reco@k{k}": k for k in model.config.eval_ks}}
        if model.config.fusion == "none":
            return {"clip": base, **{name: base for name in ks}}
        retriever = self.eval_retriever(model.config)
        host, table = (retriever, None) if not isinstance(retriever, DeviceRetriever) else (None, retriever)
        graphdef, state = nnx.split(model)
        refine = functools.partial(_refine_embeddings, graphdef, state, table, host=host)
        return {"clip": base, **{name: base.refined(functools.partial(refine, modality="image", k=k),
                                                    functools.partial(refine, modality="text", k=k))
                                 for name, k in ks.items()}}

    def eval_retriever(self, reco: RecoConfig):
        """The evaluation memory: device rows sharded over every device, or a host index (ScaNN)."""
        directory = reco.eval_memory_dir or reco.memory_dir
        if reco.index.backend in ("exact", "approx"):
            return DeviceRetriever(self._table(directory, reco.index, None),
                                   approximate=reco.index.backend == "approx", recall_target=reco.index.recall_target)
        from vlm_jax.memory.host import HostRetriever  # noqa: PLC0415

        memory = self.memory(directory)
        return self._once(("host", directory, reco.index), lambda: HostRetriever(
            memory.image_embeddings, memory.text_embeddings, reco.index))

    def evaluators(self, config):
        from vlm_jax.evaluate import suite  # noqa: PLC0415

        pretrained = self.pretrained(config)
        evals = {name: spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
                 for name, spec in config.evals.items()}
        evals.update({f"{name}@k{k}": {**spec, "pred": f"reco@k{k}"} for name, spec in list(evals.items())
                      if spec.get("type", "zero_shot") == "zero_shot" and spec.get("pred", "clip") == "reco"
                      for k in parse_reco(config.reco).eval_ks})
        return suite.build_evaluators(evals, pretrained.preprocess, pretrained.tokenizer, self.views)

    def export(self, model: RECO, workdir) -> None:
        """The trained fusions and temperature in `<workdir>/export` (`load_fusion` reads them back)."""
        from vlm_jax.weights import heads  # noqa: PLC0415

        heads.save_head(model, f"{workdir}/export", dataclasses.asdict(model.config), include=_trained)


def load_fusion(directory, clip: CLIP) -> RECO:
    """The RECO model `RecoMethod.export` wrote, on `clip` (the frozen CLIP it was trained on)."""
    from vlm_jax.weights import heads  # noqa: PLC0415

    model = RECO(clip, parse_reco(heads.read_head_config(directory)), rngs=nnx.Rngs(0))
    heads.load_head(model, directory, include=_trained)
    return model


def _trained(name: str) -> bool:
    """What RECO trains on its frozen CLIP: the fusions and the temperature."""
    return not name.startswith("clip/")


def reco_task(config, workdir) -> dict[str, float]:
    """The `reco` task (experiments/reco.py): the frozen CLIP, its memory, the training pairs and eval
    sets embedded once, then every variant x seed trained on them, and CLIP vs CLIP+RECO."""
    from etils import epath  # noqa: PLC0415

    from vlm_jax.methods import runner  # noqa: PLC0415

    workdir = epath.Path(workdir)
    runner.check_frozen_clip_config(config, reco=reco_config())
    runner.check_frozen_clip_paths(config)
    if config.reco.memory_dir:
        require_path(config.reco.memory_dir, "reco.memory_dir", field="reco.memory_dir")

    def run_config(variant, context):
        run = runner.frozen_clip_run(config, variant, context, method="reco", pred="reco")
        run.reco.memory_dir = context["memory_dir"]
        if context["train_dirs"]:
            run.reco.train_embeddings_dirs = context["train_dirs"]
            run.reco.train_weights = runner.train_weights(config)
            run.reco.training_retrieval = "precomputed"
        parse_reco(run.reco)
        return run

    return runner.run_experiment(
        config, workdir, RecoMethod(), run_config=run_config,
        stages=lambda steps: runner.frozen_clip_stages(config, workdir, steps, config.reco.memory_dir),
        baseline_metrics=lambda context: runner.baseline(context["evals"], context["clip_dir"]))
