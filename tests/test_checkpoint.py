"""Checkpoint round trips, retention, sharded restore, and stopping cleanly on SIGTERM."""

import os
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlm_jax.train import checkpoint


def _run_in_8_device_process(check_name: str, *args: str) -> None:
    """Runs `check_name(*args)` of this module in a fresh interpreter that sees 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_checkpoint as m; "
               f"m.{check_name}(*sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", command, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


class TinyModel(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, width: int = 8):
        partitioned = nnx.with_partitioning
        self.dense = nnx.Linear(
            4, width, rngs=rngs,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=partitioned(nnx.initializers.zeros, ("mlp",)),
        )
        self.head = nnx.Linear(
            width, 2, rngs=rngs,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), ("mlp", None)),
            bias_init=partitioned(nnx.initializers.zeros, (None,)),
        )

    def __call__(self, inputs):
        return self.head(jax.nn.gelu(self.dense(inputs)))


def _dataset():
    rows = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return grain.MapDataset.source(rows).shuffle(seed=3).batch(4)


def _initial_state(width: int = 8):
    with nnx.use_eager_sharding(False):
        model = TinyModel(rngs=nnx.Rngs(0), width=width)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32), "rng": jax.random.key(7)}
    return graphdef, tx, state


def _make_train_step(graphdef, tx):
    @jax.jit
    def train_step(state, batch):
        rng, noise_rng = jax.random.split(state["rng"])

        def loss_fn(params):
            noisy = batch + 0.1 * jax.random.normal(noise_rng, batch.shape)
            return jnp.mean(nnx.merge(graphdef, params)(noisy) ** 2)

        grads = jax.grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "rng": rng}

    return train_step


def _assert_trees_bitwise_equal(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _abstract(state):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), state)


def test_round_trip_restores_params_optimizer_rng_and_data_position_bitwise(tmp_path):
    graphdef, tx, state = _initial_state()
    train_step = _make_train_step(graphdef, tx)
    iterator = iter(_dataset())
    for _ in range(3):
        state = train_step(state, next(iterator))
    with checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
        assert checkpointer.save(3, state, iterator)
        checkpointer.wait_until_finished()
        expected_next = next(iterator)
        fresh = iter(_dataset())
        restored = checkpointer.restore(_abstract(state), fresh)
    _assert_trees_bitwise_equal(restored, state)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(next(fresh), expected_next)


def test_keeps_only_the_last_k_checkpoints_and_saves_on_the_interval(tmp_path):
    _, _, state = _initial_state()
    with checkpoint.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as checkpointer:
        saved = [step for step in range(1, 9) if checkpointer.save(step, state)]
        checkpointer.save(9, state, force=True)
        checkpointer.wait_until_finished()
        # The first step is always saved (orbax: no checkpoint yet), then every second one.
        assert saved == [1, 2, 4, 6, 8]
        assert checkpointer.all_steps() == [8, 9]
        assert checkpointer.latest_step() == 9
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.isdigit()) == ["8", "9"]


def test_restore_without_a_checkpoint_or_into_a_mismatched_state_is_a_clear_error(tmp_path):
    _, _, state = _initial_state()
    with checkpoint.Checkpointer(tmp_path / "empty") as checkpointer:
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            checkpointer.restore(_abstract(state))
    with checkpoint.Checkpointer(tmp_path / "full", save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.wait_until_finished()
        _, _, wider = _initial_state(width=16)
        with pytest.raises(ValueError, match="does not match"):
            checkpointer.restore(_abstract(wider))


def _check_restore_into_sharded_target(directory):
    from vlm_jax.train import sharding

    assert jax.device_count() == 8
    _, _, state = _initial_state()
    with checkpoint.Checkpointer(directory, save_interval_steps=1) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.wait_until_finished()
        mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: TinyModel(rngs=nnx.Rngs(0)))
        param_shardings = sharding.state_shardings(nnx.state(abstract_model, nnx.Param), mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        target = {
            "params": sharding.abstract_state(state["params"], param_shardings),
            "opt_state": jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), state["opt_state"]),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct(state["rng"].shape, state["rng"].dtype, sharding=replicated),
        }
        restored = checkpointer.restore(target)
    kernel = restored["params"]["dense"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 4)
    _assert_trees_bitwise_equal(restored, state)


def test_restore_places_arrays_with_the_target_shardings_on_8_devices(tmp_path):
    _run_in_8_device_process("_check_restore_into_sharded_target", str(tmp_path))


def test_sigterm_only_sets_a_flag_and_the_previous_handler_comes_back():
    previous = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionWatcher() as watcher:
        assert not watcher.reached_stop_point(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested
        assert watcher.reached_stop_point(1)
    assert signal.getsignal(signal.SIGTERM) is previous


def _train(workdir, total_steps, *, sigterm_after=None):
    """A miniature loop with resume-by-default, periodic saves and a preemption stop."""
    graphdef, tx, state = _initial_state()
    train_step = _make_train_step(graphdef, tx)
    iterator = iter(_dataset())
    with checkpoint.Checkpointer(workdir, save_interval_steps=4) as checkpointer, \
            checkpoint.PreemptionWatcher() as watcher:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(_abstract(state), iterator)
        for step in range(int(state["step"]), total_steps):
            state = train_step(state, next(iterator))
            if sigterm_after is not None and step + 1 == sigterm_after:
                os.kill(os.getpid(), signal.SIGTERM)
            stopping = watcher.reached_stop_point(step + 1)
            checkpointer.save(step + 1, state, iterator, force=stopping or step + 1 == total_steps)
            if stopping:
                break
    return state


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path):
    uninterrupted = _train(tmp_path / "straight", 10)
    interrupted = _train(tmp_path / "preempted", 10, sigterm_after=6)
    assert int(interrupted["step"]) == 6
    resumed = _train(tmp_path / "preempted", 10)
    assert int(resumed["step"]) == 10
    _assert_trees_bitwise_equal(resumed, uninterrupted)
