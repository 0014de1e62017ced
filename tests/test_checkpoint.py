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
    assert restored.step == 3
    restored = restored.state
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


def test_restore_without_a_checkpoint_is_none_and_into_a_mismatched_state_a_clear_error(tmp_path):
    _, _, state = _initial_state()
    with checkpoint.Checkpointer(tmp_path / "empty") as checkpointer:
        assert checkpointer.restore(_abstract(state)) is None
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
        restored = checkpointer.restore(target).state
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
        restored = checkpointer.restore(_abstract(state), iterator)
        if restored is not None:
            state = restored.state
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


# --------------------------------------------------------------------------------------------------
# Resume walks back over unreadable steps; restore_step; mismatches; half-written steps
# --------------------------------------------------------------------------------------------------


def _save_steps(directory, steps=3):
    """Saves steps 1..`steps` of the miniature loop (with its iterator and counters); returns
    {step: state}."""
    graphdef, tx, state = _initial_state()
    train_step = _make_train_step(graphdef, tx)
    iterator = iter(_dataset())
    states = {}
    with checkpoint.Checkpointer(directory, save_interval_steps=1, max_to_keep=None, async_save=False) as checkpointer:
        for step in range(1, steps + 1):
            state = train_step(state, next(iterator))
            states[step] = state
            checkpointer.save(step, state, iterator, counters={"bad_input": {"corrupt_image": 10 * step}})
    return states


def _largest_data_file(step_dir):
    """The largest data file of a step's merged OCDBT database (`state/d/`), which a restore reads."""
    return max((step_dir / "state" / "d").iterdir(), key=lambda path: path.stat().st_size)


def _warnings(caplog):
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


@pytest.mark.parametrize("damage", ["truncated_chunk", "emptied_metadata", "missing_chunk"])
def test_unreadable_latest_step_resumes_from_the_previous_one_with_a_warning(tmp_path, caplog, damage):
    states = _save_steps(tmp_path)
    if damage == "truncated_chunk":
        chunk = _largest_data_file(tmp_path / "3")
        os.truncate(chunk, chunk.stat().st_size // 2)
    elif damage == "emptied_metadata":
        (tmp_path / "3" / "state" / "_METADATA").write_text("")
    else:
        _largest_data_file(tmp_path / "3").unlink()
    _, _, fresh_state = _initial_state()
    fresh_iterator = iter(_dataset())
    with caplog.at_level("WARNING"), checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
        restored = checkpointer.restore(_abstract(fresh_state), fresh_iterator)
        assert restored.step == 2
        _assert_trees_bitwise_equal(restored.state, states[2])
        assert restored.counters == {"bad_input": {"corrupt_image": 20}}
        # The unreadable step is set aside, so the resumed run can save step 3 again.
        assert checkpointer.all_steps() == [1, 2]
        assert checkpointer.save(3, states[3], force=True)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [1, 2, 3]
    expected_next = list(_dataset())[2]
    np.testing.assert_array_equal(next(fresh_iterator), expected_next)
    skipped = [message for message in _warnings(caplog) if "step 3" in message and "could not be read" in message]
    assert len(skipped) == 1, _warnings(caplog)
    assert "\n" not in skipped[0]
    if damage == "emptied_metadata":
        assert "_METADATA" in skipped[0]
    else:
        assert str(tmp_path / "3" / "state") in skipped[0]
    assert any(path.name.startswith("3.set_aside-") for path in tmp_path.iterdir())


def test_restore_step_restores_exactly_that_step_or_fails_in_one_line(tmp_path):
    states = _save_steps(tmp_path)
    _, _, fresh_state = _initial_state()
    with checkpoint.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(checkpoint.UserError, match=r"restore_step=7 is not in .* steps \[1, 2, 3\]"):
            checkpointer.restore(_abstract(fresh_state), step=7)
    (tmp_path / "2" / "state" / "_METADATA").write_text("")
    with checkpoint.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(checkpoint.UserError, match=r"restore_step=2 .* could not be read: .*_METADATA") as failure:
            checkpointer.restore(_abstract(fresh_state), step=2)
        assert "\n" not in str(failure.value)
        assert checkpointer.all_steps() == [1, 2, 3]  # a refused restore sets nothing aside
        restored = checkpointer.restore(_abstract(fresh_state), step=1)
        assert restored.step == 1
        _assert_trees_bitwise_equal(restored.state, states[1])
        assert checkpointer.all_steps() == [1]  # the later steps belong to a history this run replaces


def test_a_mismatched_model_is_a_mismatch_naming_the_parameters_and_never_walks_back(tmp_path):
    _save_steps(tmp_path, steps=2)
    _, _, wider = _initial_state(width=16)
    with checkpoint.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(checkpoint.CheckpointMismatchError, match="step 2 .* does not match") as failure:
            checkpointer.restore(_abstract(wider))
        assert checkpointer.all_steps() == [1, 2]
    message = str(failure.value)
    assert "params/dense/kernel/value: saved (4, 8), config (4, 16)" in message
    assert "could not be read" not in message and "\n" not in message


def test_no_readable_step_is_one_user_error_and_keeps_the_files(tmp_path):
    _save_steps(tmp_path, steps=2)
    for step in (1, 2):
        (tmp_path / str(step) / "state" / "_METADATA").write_text("")
    _, _, fresh_state = _initial_state()
    with checkpoint.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(checkpoint.UserError, match=r"no checkpoint in .* could be read \(steps \[1, 2\]"):
            checkpointer.restore(_abstract(fresh_state))
        assert checkpointer.all_steps() == [1, 2]


def test_a_half_written_step_of_a_crashed_writer_does_not_block_resuming(tmp_path, caplog):
    import shutil

    states = _save_steps(tmp_path, steps=2)
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "2", partial)
    (partial / "state" / "_METADATA").write_text("{")
    _, _, fresh_state = _initial_state()
    with caplog.at_level("WARNING"), checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
        restored = checkpointer.restore(_abstract(fresh_state))
        assert restored.step == 2
        _assert_trees_bitwise_equal(restored.state, states[2])
        assert checkpointer.save(3, states[2], force=True)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [1, 2, 3]
    assert not partial.exists()
    assert any("half-written" in message for message in _warnings(caplog))
