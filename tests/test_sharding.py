"""Mesh construction, logical-axis rules, sharded model creation and global batches."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vlm_jax.train import sharding


def _run_in_8_device_process(check_name: str) -> None:
    """Runs `check_name()` of this module in a fresh interpreter that sees 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import {__name__.split('.')[-1]} as m; m.{check_name}()"
    result = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _partitioned(init, *names):
    return nnx.with_partitioning(init, names)


class TinyTower(nnx.Module):
    """Embed -> Linear -> LayerNorm -> Linear with logical axis names on every weight."""

    def __init__(self, *, rngs: nnx.Rngs, vocab: int = 16, width: int = 8, mlp: int = 32, odd: int = 5):
        self.embed = nnx.Embed(vocab, width, rngs=rngs, embedding_init=_partitioned(nnx.initializers.normal(), "vocab", "embed"))
        self.fc1 = nnx.Linear(
            width, mlp, rngs=rngs,
            kernel_init=_partitioned(nnx.initializers.lecun_normal(), "embed", "mlp"),
            bias_init=_partitioned(nnx.initializers.zeros, "mlp"),
        )
        self.norm = nnx.LayerNorm(
            mlp, rngs=rngs,
            scale_init=_partitioned(nnx.initializers.ones, "mlp"),
            bias_init=_partitioned(nnx.initializers.zeros, "mlp"),
        )
        # "odd" is not divisible by the tensor axis and "unruled" has no rule: both stay whole.
        self.fc2 = nnx.Linear(
            mlp, odd, rngs=rngs,
            kernel_init=_partitioned(nnx.initializers.lecun_normal(), "mlp", "unruled"),
            bias_init=_partitioned(nnx.initializers.zeros, "proj"),
        )
        self.logit_scale = nnx.Param(jnp.asarray(2.3))

    def __call__(self, ids):
        return self.fc2(self.norm(self.fc1(self.embed(ids).mean(axis=1))))


def test_resolve_mesh_shape_gives_the_remaining_devices_to_the_minus_one_axis():
    assert sharding.resolve_mesh_shape((("data", -1), ("fsdp", 2), ("tensor", 1)), 8) == (
        ("data", "fsdp", "tensor"), (4, 2, 1))
    assert sharding.resolve_mesh_shape((("data", 2), ("fsdp", 2), ("tensor", 2)), 8)[1] == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.resolve_mesh_shape((("data", -1), ("fsdp", -1)), 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.resolve_mesh_shape((("data", -1), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match="8 are available"):
        sharding.resolve_mesh_shape((("data", 2), ("fsdp", 2)), 8)


def test_mesh_axes_are_auto_so_gspmd_propagates_shardings():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(axis_type == jax.sharding.AxisType.Auto for axis_type in mesh.axis_types)


def test_param_without_logical_names_is_an_error_unless_allowed():
    mesh = sharding.make_mesh()

    class Unnamed(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)
            self.temperature = nnx.Param(jnp.zeros(()))

    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: Unnamed(nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"2 parameters carry no logical axis names.*dense/bias.*dense/kernel"):
        sharding.state_partition_specs(state, mesh)
    specs = sharding.state_partition_specs(state, mesh, allow_unannotated=[r"^dense/"])
    assert specs["dense"]["kernel"].get_value() == P()


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="lacks"):
        sharding.logical_to_mesh_spec(("embed",), (8,), (("embed", "model"),), mesh)


def test_logical_spec_never_uses_a_mesh_axis_twice():
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    spec = sharding.logical_to_mesh_spec(("embed", "embed"), (8, 8), sharding.DEFAULT_RULES, mesh)
    assert spec == P("fsdp", None)
    spec = sharding.logical_to_mesh_spec(("vocab", "embed"), (16, 8), (("vocab", ("fsdp", "tensor")), ("embed", "fsdp")), mesh)
    assert spec == P(("fsdp", "tensor"), None)


def _check_sharded_model_follows_rules_and_matches_plain_init():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    model = sharding.create_sharded_model(lambda: TinyTower(rngs=nnx.Rngs(0)), mesh)
    params = nnx.state(model, nnx.Param)
    expected = {
        "embed/embedding": P("tensor", "fsdp"),
        "fc1/kernel": P("fsdp", "tensor"),
        "fc1/bias": P("tensor"),
        "norm/scale": P("tensor"),
        "norm/bias": P("tensor"),
        "fc2/kernel": P("tensor", None),
        "fc2/bias": P(None),
        "logit_scale": P(),
    }
    found = {
        sharding.path_to_name(path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert found == expected, found
    # A device holds a quarter of fc1/kernel (split over fsdp and tensor), not a copy.
    assert model.fc1.kernel.get_value().addressable_shards[0].data.shape == (4, 16)
    with nnx.use_eager_sharding(False):
        plain = TinyTower(rngs=nnx.Rngs(0))
    for (path, sharded), (_, reference) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(nnx.state(plain, nnx.Param))[0],
    ):
        # Same random streams; jitted and eager initializers may round the last bit differently.
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), rtol=1e-6, atol=1e-8, err_msg=str(path))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(8, 2)
    batch = sharding.shard_batch({"ids": np.asarray(ids)}, mesh)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, batch["ids"]), plain(ids), rtol=1e-5, atol=1e-6)


def test_sharded_model_follows_rules_and_matches_plain_init_on_8_devices():
    _run_in_8_device_process("_check_sharded_model_follows_rules_and_matches_plain_init")


def _check_shard_batch_splits_rows_over_data_axes():
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = sharding.shard_batch({"image": images, "label": np.arange(16, dtype=np.int32)}, mesh)
    assert batch["image"].sharding.spec == P(("data", "fsdp"), None)
    assert {shard.data.shape for shard in batch["image"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), images)
    with np.testing.assert_raises_regex(ValueError, "not divisible"):
        sharding.shard_batch({"label": np.arange(12)}, mesh)


def test_shard_batch_splits_rows_over_data_axes_on_8_devices():
    _run_in_8_device_process("_check_shard_batch_splits_rows_over_data_axes")


def _two_process_worker(process_id: int, port: int) -> None:
    sharding.initialize_distributed(
        dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, cpu_collectives="gloo")
    )
    mesh = sharding.make_mesh()
    assert mesh.shape["data"] == 2 and jax.process_count() == 2
    local_rows = np.full((2, 3), process_id + 1, np.float32)
    batch = sharding.shard_batch({"x": local_rows}, mesh)
    assert batch["x"].shape == (4, 3)
    total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, P()))(batch["x"])
    assert float(total) == 2 * 3 * 1 + 2 * 3 * 2, float(total)
    print("TOTAL", float(total))


@pytest.mark.slow
def test_two_processes_assemble_one_global_batch_over_gloo():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    command = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_sharding as m; "
        "m._two_process_worker(int(sys.argv[1]), int(sys.argv[2]))"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", command, str(i), str(port)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-4000:]
        assert "TOTAL 18.0" in stdout


def _check_clip_models_shard_with_the_default_rules():
    from vlm_jax.methods import clip as clip_losses
    from vlm_jax.models.clip import CLIP, tiny

    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    pixels = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    ids = np.random.default_rng(1).integers(1, 990, size=(8, 16)).astype(np.int32)
    for kind in ("clip", "siglip"):
        model = sharding.create_sharded_model(lambda: CLIP(tiny(kind), rngs=nnx.Rngs(0)), mesh)
        specs = {
            sharding.path_to_name(path): leaf.sharding.spec
            for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        }
        assert specs["vision_model/encoder/layers/0/mlp/fc1/kernel"] == P("fsdp", "tensor"), specs
        assert specs["text_model/encoder/layers/0/self_attn/q_proj/kernel"] == P("fsdp", "tensor", None), specs
        batch = sharding.shard_batch({"image": pixels, "text": ids}, mesh)

        @nnx.jit
        def forward(model, batch):
            image_emb, text_emb = model.encode_image(batch["image"]), model.encode_text(batch["text"])
            if model.logit_bias is None:
                loss, _ = clip_losses.softmax_contrastive_loss(image_emb, text_emb, model.logit_scale[...], mesh=mesh)
            else:
                loss, _ = clip_losses.sigmoid_loss(
                    image_emb, text_emb, model.logit_scale[...], model.logit_bias[...], mesh=mesh)
            return image_emb, text_emb, loss

        image_emb, text_emb, loss = forward(model, batch)
        plain = CLIP(tiny(kind), rngs=nnx.Rngs(0))
        np.testing.assert_allclose(image_emb, plain.encode_image(pixels), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(text_emb, plain.encode_text(ids), rtol=1e-4, atol=1e-5)
        assert np.isfinite(float(loss))


@pytest.mark.slow
def test_clip_and_siglip_models_shard_with_the_default_rules_on_8_devices():
    _run_in_8_device_process("_check_clip_models_shard_with_the_default_rules")


def _check_pretrained_model_is_placed_from_the_host_without_jit_constants():
    import tempfile

    from vlm_jax.models.clip import CLIP, tiny
    from vlm_jax.weights import load_model, save_pretrained

    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(CLIP(tiny(), rngs=nnx.Rngs(3)), directory)
        reference = load_model(directory)
        lowered = []
        real_jit = jax.jit

        def spying_jit(fun, *args, **kwargs):
            lowered.append(getattr(fun, "__name__", ""))
            return real_jit(fun, *args, **kwargs)

        jax.jit = spying_jit
        try:
            model = sharding.create_sharded_model(lambda: load_model(directory), mesh, host_init=True)
        finally:
            jax.jit = real_jit
    assert "init" not in lowered, lowered  # no jitted init: the weights never become program constants
    flat = dict(jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0])
    specs = {sharding.path_to_name(path): leaf.sharding.spec for path, leaf in flat.items()}
    assert specs["vision_model/encoder/layers/0/mlp/fc1/kernel"] == P("fsdp", "tensor"), specs
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(reference, nnx.Param))[0]:
        placed = flat[path]
        assert len(placed.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(placed), np.asarray(leaf))


@pytest.mark.slow
def test_pretrained_model_is_placed_from_the_host_on_8_devices():
    _run_in_8_device_process("_check_pretrained_model_is_placed_from_the_host_without_jit_constants")


def test_trainer_places_from_the_host_exactly_when_the_method_reads_weights():
    from vlm_jax.methods.clip import ClipMethod
    from vlm_jax.methods.reco import RecoMethod

    assert ClipMethod().reads_weights({"clip_dir": "/ckpt/clip"})
    assert not ClipMethod().reads_weights({"clip_dir": ""})
    assert RecoMethod().reads_weights({})
