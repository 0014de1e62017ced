"""Plain CLIP / SigLIP pre-training: `ClipMethod`, the trainer's method for this task, with the
contrastive losses over the global batch from `vlm_jax.models.losses` (softmax for CLIP, sigmoid for
SigLIP; re-exported here)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from vlm_jax.config_lib import ConfigError, require_data_files, require_eval_files, require_path
from vlm_jax.errors import UserError
from vlm_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlm_jax.models.losses import (  # noqa: F401  (re-exported: methods.clip is where callers find them)
    DEFAULT_BATCH_AXES, clamped_scale, sigmoid_loss, sigmoid_loss_dense, softmax_contrastive_loss,
    softmax_contrastive_loss_dense)

# What `vlm_jax.data.tokenizer.Tokenizer.from_dir` reads a tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def model_config_dict(config: CLIPConfig) -> ml_collections.ConfigDict:
    """A `CLIPConfig` as the nested `config.model` section of an experiment (every field overridable)."""
    return ml_collections.ConfigDict(dataclasses.asdict(config))


def text_trainable_rules(depth: int, trainable_layers: int) -> tuple[tuple[str, bool], ...]:
    """The `optim.trainable` rules of `text_trainable_layers`: (regex, False) pairs freezing the
    text tower's token and position embeddings and all but the last `trainable_layers` of its
    `depth` blocks; () for -1 (nothing frozen). They only freeze: the final LayerNorm, the text
    projection (SigLIP: the text head) and the image tower are left to the other rules."""
    if trainable_layers < 0:
        return ()
    if trainable_layers > depth:
        raise ValueError(f"text_trainable_layers={trainable_layers} exceeds the text tower's {depth} blocks")
    rules = [(r"^text_model/embeddings/", False)]
    frozen = depth - trainable_layers
    if frozen:
        rules.append((rf"^text_model/encoder/layers/({'|'.join(str(i) for i in range(frozen))})/", False))
    return tuple(rules)


def _int_field(config, name: str, default: int) -> int:
    value = config.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or int(value) != value:
        raise ConfigError(f"{name}={value!r} is not an integer; pass --config.{name}=N.")
    return int(value)


def _is_shapes_world(data_config) -> bool:
    return str(data_config.get("tfds_name", "") or "").startswith("shapes_world") or data_config.get("dataset") == "shapes_world"


def _shapes_world_build(data_config) -> str:
    name = str(data_config.get("tfds_name", "") or "shapes_world/default")
    return name.split("/", 1)[1].split(":")[0] if "/" in name else "default"


class NamedCaptionSource:
    """Shapes World records with a "named_caption": the weak caption's naming, as a short caption.

    Where a record's `weak_caption` contains the name of its main object's entity, "named_caption"
    is one of the dataset's prompt templates filled with that name ("a photo of a zorvid."), chosen
    by record index; elsewhere it is the weak caption itself. No entity is named more often than the
    weak captions name it (rare entities stay rare); only the wording changes, from a bag of words
    to the short "a photo of a ..." alt-text that web data has and that zero-shot prompts use.
    """

    def __init__(self, source, class_names, templates):
        self.source, self.class_names, self.templates = source, tuple(class_names), tuple(templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        record = dict(self.source[index])
        weak = record.get("weak_caption")
        weak = weak.decode("utf-8") if isinstance(weak, bytes) else str(weak)
        name = self.class_names[int(record["label"])]
        named = name in weak.split()
        record["named_caption"] = self.templates[index % len(self.templates)].format(name) if named else weak
        return record


class ClipMethod:
    """Contrastive image-text pre-training of a two-tower model: CLIP (softmax) or SigLIP (sigmoid).

    Config fields (besides the trainer's, see `vlm_jax.train.trainer`):
      model: a `CLIPConfig` as a nested section (`model_config_dict`); the text tower's vocab_size
        and eos/pad/bos ids are taken from the tokenizer. Ignored when `clip_dir` is set, except
        model.dtype / model.param_dtype (compute and storage dtypes).
      clip_dir: a Hugging Face CLIPModel/SiglipModel directory to start from ("" = from scratch);
        its tokenizer and preprocessing are used unless `tokenizer_dir` says otherwise.
      loss: "softmax" (CLIP's symmetric InfoNCE) or "sigmoid" (SigLIP; needs a model with a logit bias).
      label_smoothing: for the softmax loss.
      tokenizer_dir: directory with tokenizer.json; "" = the clip_dir directory, else the Shapes
        World tokenizer when training on Shapes World.
      data: pipeline section (`vlm_jax.data.pipeline.default_config()`); text_keys pick the captions.
      named_caption_weight: Shapes World only; the chance that an example's caption is its
        `NamedCaptionSource` "named_caption" instead of data.text_keys[0] (0: never).
      text_context_length: the text context in tokens; the tokenizer pads and truncates to it.
        0 (default): the model's own (clip_dir's, else model.text.context_length). With clip_dir, a
        longer one loads the text tower with Long-CLIP's stretch of its position embedding
        (`vlm_jax.weights.positions`: 77 -> 248; any 20 + k * (stored - 20) for an integer k); a
        shorter one is a ConfigError. Without clip_dir it sets model.text.context_length.
      text_trainable_layers: -1 (default): the whole text tower trains (as optim.trainable says).
        N >= 0: the text tower's token and position embeddings and all but its last N transformer
        blocks are frozen; its final LayerNorm and the text projection train. Needs clip_dir (frozen
        params come from a pretrained model) and N <= the text tower's depth. `check_config` puts the
        rules (`text_trainable_rules`) in front of optim.trainable, the policy the trainer reads:
        they only freeze, and the user's rules decide every other param (LiT's frozen image tower
        stays frozen), so a param trains only where both allow it. `trainable_policy` gives the
        combined policy.
      evals: evaluator specs (`vlm_jax.evaluate.suite`).

    Export: `<workdir>/export/` in the Hugging Face format (config.json, model.safetensors,
    tokenizer and preprocessor configs), readable by `load_pretrained` and transformers.
    """

    def __init__(self, *, tokenizer=None, preprocess=None):
        self._tokenizer = tokenizer
        self._preprocess = preprocess
        self._mesh = None
        self._batch_axes = DEFAULT_BATCH_AXES
        self._loss = "softmax"
        self._label_smoothing = 0.0
        self._clip_dir_config = None  # (clip_dir, its CLIPConfig), read by check_config

    # -- pieces derived from the config ---------------------------------------------------------

    def tokenizer(self, config):
        """The text tokenizer (loaded once; see `tokenizer_dir`)."""
        if self._tokenizer is None:
            from vlm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415

            directory = config.get("tokenizer_dir") or config.get("clip_dir")
            if not directory and _is_shapes_world(config.data):
                from vlm_jax.data import shapes_world  # noqa: PLC0415

                directory = shapes_world.tokenizer_dir(config.data.data_dir, _shapes_world_build(config.data))
            if not directory:
                raise ConfigError("No tokenizer: set --config.tokenizer_dir to a directory with tokenizer.json.")
            context_length = _int_field(config, "text_context_length", 0) or (
                None if config.get("clip_dir") else int(config.model.text.context_length))
            self._tokenizer = Tokenizer.from_dir(directory, context_length=context_length)
        return self._tokenizer

    def preprocess(self, config):
        """The model's `PreprocessSpec`: the clip_dir directory's, else CLIP's or SigLIP's default."""
        if self._preprocess is None:
            from vlm_jax.data.preprocess import PreprocessSpec  # noqa: PLC0415

            if config.get("clip_dir"):
                from vlm_jax.weights import load_pretrained  # noqa: PLC0415

                self._preprocess = load_pretrained(config.clip_dir).preprocess
            else:
                size = int(config.model.vision.image_size)
                self._preprocess = (PreprocessSpec.siglip(size) if config.model.kind == "siglip"
                                    else PreprocessSpec.clip(size))
        return self._preprocess

    def model_config(self, config) -> CLIPConfig:
        """The `CLIPConfig` of a from-scratch model, with the tokenizer's vocabulary and special ids."""
        fields = config.model.to_dict()
        tokenizer = self.tokenizer(config)
        text = {**fields.pop("text"), "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id}
        context_length = _int_field(config, "text_context_length", 0)
        if context_length:
            text["context_length"] = context_length
        return CLIPConfig(vision=VisionConfig(**fields.pop("vision")), text=TextConfig(**text), **fields)

    def text_layer_rules(self, config) -> tuple[tuple[str, bool], ...]:
        """The (regex, False) rules that `text_trainable_layers` adds to optim.trainable (() for -1);
        the text tower's depth is clip_dir's. One-line ConfigErrors for a value the model cannot have."""
        layers = _int_field(config, "text_trainable_layers", -1)
        if layers < -1:
            raise ConfigError(f"text_trainable_layers={layers}; use -1 (the whole text tower trains) or N >= 0 (only "
                              "its last N blocks, final LayerNorm and projection train).")
        if layers == -1:
            return ()
        if not config.get("clip_dir"):
            raise ConfigError(f"clip_dir is not set, but text_trainable_layers={layers} freezes the text tower's "
                              "embeddings and early blocks: frozen params must come from a pretrained CLIP; pass "
                              "--config.clip_dir=DIR (a Hugging Face CLIP/SigLIP directory).")
        depth = self._stored_config(config).text.depth
        if layers > depth:
            raise ConfigError(f"text_trainable_layers={layers} exceeds the {depth} blocks of the text tower of clip_dir "
                              f"{config.clip_dir!r}; use 0..{depth}, or -1 for the whole tower.")
        return text_trainable_rules(depth, layers)

    def trainable_policy(self, config) -> tuple[tuple[str, bool], ...]:
        """optim.trainable with the `text_trainable_layers` rules in front (first match decides; see
        the class docstring); optim.trainable itself when they are already there or there are none."""
        from vlm_jax.train.optim import optim_config  # noqa: PLC0415

        user = config.optim.trainable if "optim" in config else optim_config().trainable
        user = tuple((str(pattern), bool(trains)) for pattern, trains in user)
        rules = self.text_layer_rules(config)
        if user[:len(rules)] == rules:
            return user
        return rules + user

    def _stored_config(self, config) -> CLIPConfig:
        """clip_dir's config (read once); a one-line ConfigError when it cannot be read."""
        cached = getattr(self, "_clip_dir_config", None)
        if cached is None or cached[0] != config.clip_dir:
            from vlm_jax.weights.pretrained import read_config  # noqa: PLC0415

            try:
                self._clip_dir_config = (config.clip_dir, read_config(config.clip_dir))
            except UserError as error:
                raise ConfigError(f"clip_dir {config.clip_dir!r}: {error}") from None
        return self._clip_dir_config[1]

    def _check_text_context_length(self, config) -> None:
        length = _int_field(config, "text_context_length", 0)
        if length == 0:
            return
        if length < 2:
            raise ConfigError(f"text_context_length={length}; use 0 (the model's own) or a length >= 2.")
        if config.get("clip_dir"):
            from vlm_jax.weights.pretrained import with_text_context  # noqa: PLC0415

            try:
                with_text_context(self._stored_config(config), length, where=f"clip_dir {config.clip_dir!r}")
            except UserError as error:
                raise ConfigError(f"{error} Fix --config.text_context_length (0 keeps the model's own).") from None

    # -- the Method protocol --------------------------------------------------------------------

    def check_config(self, config) -> None:
        """One-line ConfigErrors for the paths `config` names, before any data is built or model made:
        clip_dir (with config.json; required when optim.trainable freezes params, as LiT does, and by
        text_trainable_layers), text_context_length against clip_dir's context, text_trainable_layers
        against its depth, the tokenizer (tokenizer_dir, else clip_dir's, else Shapes World's), and the
        data and eval files.

        Then it writes `trainable_policy(config)` to config.optim.trainable, so the run's config.json
        shows the policy in force (idempotent: the rules are added once); the trainer asks
        `trainable_policy` itself, so a run that skips this call freezes the same params."""
        clip_dir = config.get("clip_dir")
        if clip_dir:
            require_path(clip_dir, "clip_dir", field="clip_dir", containing=("config.json",))
        else:
            frozen = [pattern for pattern, trains in config.optim.trainable if not trains] if "optim" in config else []
            if frozen:
                raise ConfigError(f"clip_dir is not set, but optim.trainable freezes {', '.join(frozen)}: frozen params "
                                  "must come from a pretrained CLIP; pass --config.clip_dir=DIR (a Hugging Face "
                                  "CLIP/SigLIP directory).")
        rules = self.text_layer_rules(config)
        self._check_text_context_length(config)
        if config.get("tokenizer_dir"):
            require_path(config.tokenizer_dir, "tokenizer_dir", field="tokenizer_dir", containing=TOKENIZER_FILES)
        elif clip_dir:
            if not any((epath.Path(clip_dir) / name).exists() for name in TOKENIZER_FILES):
                raise ConfigError(f"clip_dir {clip_dir!r} has no {' or '.join(TOKENIZER_FILES)} and tokenizer_dir is "
                                  "not set; pass --config.tokenizer_dir=DIR (a directory with tokenizer.json).")
        elif not _is_shapes_world(config.data):
            raise ConfigError("tokenizer_dir is not set; pass --config.tokenizer_dir=DIR (a directory with "
                              "tokenizer.json).")
        require_data_files(config.data, "data")
        require_eval_files(config.get("evals"))
        if rules and "optim" in config:
            config.optim.trainable = self.trainable_policy(config)

    def reads_weights(self, config) -> bool:
        return bool(config.get("clip_dir"))

    def create_model(self, config, rngs):
        if config.get("clip_dir"):
            from vlm_jax.weights import load_model  # noqa: PLC0415

            model = load_model(config.clip_dir, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                               text_context_length=_int_field(config, "text_context_length", 0) or None)
        else:
            model = CLIP(self.model_config(config), rngs=rngs)
        if config.loss not in ("softmax", "sigmoid"):
            raise ConfigError(f"config.loss={config.loss!r} is not 'softmax' or 'sigmoid'.")
        if config.loss == "sigmoid" and model.logit_bias is None:
            raise ConfigError("config.loss='sigmoid' needs a model with a logit bias; set model.kind='siglip'.")
        return model

    def constants(self, config, mesh):
        # The loss needs the mesh and loss settings at trace time; they are static, not arrays.
        self._mesh = mesh
        self._batch_axes = tuple(config.sharding.batch_axes)
        self._loss, self._label_smoothing = config.loss, float(config.get("label_smoothing", 0.0))
        return None

    def loss_fn(self, model, batch, constants, rng):
        """Contrastive loss over the global batch {"image": [B, S, S, 3], "text_ids": [B, L]}; with
        "negative_ids" [B, L] and "negative_mask" [B] (data.hard_negatives), each image is also
        contrasted with every hard negative of the batch (softmax loss only)."""
        del constants, rng
        image_emb = model.encode_image(batch["image"])
        text_emb = model.encode_text(batch["text_ids"])
        negatives = {}
        if "negative_ids" in batch:
            negatives = {"negatives": model.encode_text(batch["negative_ids"]), "negative_mask": batch["negative_mask"]}
        if self._loss == "sigmoid":
            if negatives:
                raise ConfigError("data.hard_negatives needs loss='softmax' (the sigmoid loss has no negatives term).")
            loss, metrics = sigmoid_loss(image_emb, text_emb, model.logit_scale[...], model.logit_bias[...],
                                         mesh=self._mesh, axis=self._batch_axes)
            metrics["logit_bias"] = metrics.pop("bias")
        else:
            loss, metrics = softmax_contrastive_loss(
                image_emb, text_emb, model.logit_scale[...], label_smoothing=self._label_smoothing,
                mesh=self._mesh, axis=self._batch_axes, **negatives)
            if negatives:
                metrics["hard_negatives"] = jnp.mean(jnp.asarray(batch["negative_mask"], jnp.float32))
        metrics["logit_scale"] = metrics.pop("scale")
        return loss, metrics

    def train_source(self, config):
        """(data config, record source or None) for `pipeline.make_train_iterator`: config.data and
        None (the pipeline opens the source itself), except on Shapes World with named_caption_weight,
        where the source is a `NamedCaptionSource` and the data config samples its "named_caption"
        with that weight. Builds Shapes World when it is not built yet. Subclasses override this to
        wrap the source."""
        from vlm_jax.data import pipeline  # noqa: PLC0415

        data, source = config.data, None
        if _is_shapes_world(config.data):
            from vlm_jax.data import shapes_world  # noqa: PLC0415

            shapes_world.prepare(config.data.data_dir, _shapes_world_build(config.data))
            weight = float(config.get("named_caption_weight", 0.0))
            if weight:
                source = NamedCaptionSource(pipeline.make_source(config.data), shapes_world.class_names(),
                                            shapes_world.prompt_templates())
                data = ml_collections.ConfigDict(config.data.to_dict())
                data.text_keys = (config.data.text_keys[0], "named_caption")
                data.text_weights = (1.0 - weight, weight)
        elif config.get("named_caption_weight", 0.0):
            raise ConfigError("named_caption_weight applies to Shapes World data only; set it to 0.")
        return data, source

    def train_iterator(self, config, process_index, process_count):
        from vlm_jax.data import pipeline  # noqa: PLC0415

        data, source = self.train_source(config)
        return pipeline.make_train_iterator(
            data, self.preprocess(config), self.tokenizer(config), int(config.global_batch_size),
            int(config.seed), process_index=process_index, process_count=process_count, source=source)

    def evaluators(self, config):
        from vlm_jax.evaluate import suite  # noqa: PLC0415

        return suite.build_evaluators(config.get("evals", {}), self.preprocess(config), self.tokenizer(config))

    def export(self, model, workdir):
        from vlm_jax.weights import save_pretrained  # noqa: PLC0415

        save_pretrained(model, epath.Path(workdir) / "export", tokenizer=self._tokenizer,
                        preprocess=self._preprocess)
