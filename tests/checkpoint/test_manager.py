"""Training checkpoints: bit-exact resume (after a crash and after a preemption signal), keep-N, config checks.

The offline loop runs K = 3 updates per dispatch here, so chunks of the uninterrupted run (ends 3, 6, 8) and
of the interrupted ones (save_every=4: ends 3, 4, 6, 8) are cut differently and must still agree bit for bit.
"""

import os
import signal

import jax
import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.checkpoint.manager import CheckpointManager, ConfigMismatchError
from mtdistill_jax.configs.train import get_config, get_smoke_config
from mtdistill_jax.data.tdmpc2_format import load_chunk
from mtdistill_jax.tdmpc2.offline import train_offline
from mtdistill_jax.tdmpc2.train import init_training_state

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"
STEPS = 8
K = 3  # updates per dispatch


@pytest.fixture(scope="module")
def episodes():
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return load_chunk(CHUNK)


def _config(steps=STEPS):
    c = get_smoke_config()
    c.steps = steps
    c.train.steps_per_dispatch = K
    return c


def _assert_bit_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def uninterrupted(episodes, tmp_path_factory):
    return train_offline(_config(), episodes, str(tmp_path_factory.mktemp("full")), save_every=100)


def test_resume_after_crash_is_bit_exact(episodes, uninterrupted, tmp_path):
    chunk_ends = []

    def crash_after_4(step, metrics):  # called after each chunk
        chunk_ends.append(step)
        if step > 4:
            raise Crash

    with pytest.raises(Crash):  # checkpoint at 4 (and at 3, orbax's first save), then the process "dies" at 6
        train_offline(_config(), episodes, str(tmp_path), save_every=4, on_step=crash_after_4)
    assert chunk_ends == [3, 4, 6]
    assert CheckpointManager(tmp_path, _config()).all_steps() == [3, 4]
    resumed = train_offline(_config(), episodes, str(tmp_path), save_every=4)
    assert resumed.resumed_from == 4 and resumed.step == STEPS and int(resumed.state.step) == STEPS
    _assert_bit_equal(resumed.state, uninterrupted.state)
    _assert_bit_equal(resumed.data_state, uninterrupted.data_state)
    np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(uninterrupted.rng))


def test_sigterm_checkpoints_and_resumes_bit_exact(episodes, uninterrupted, tmp_path):
    def preempt_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    # log_every=2 cuts chunks at 2, 4, 6, 8: the signal arrives in the first, the run saves at its end
    stopped = train_offline(_config(), episodes, str(tmp_path), save_every=100, on_step=preempt_at_2, log_every=2)
    assert stopped.preempted and stopped.step == 2
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert CheckpointManager(tmp_path, _config()).latest_step() == 2
    resumed = train_offline(_config(), episodes, str(tmp_path), save_every=100)
    assert resumed.resumed_from == 2 and not resumed.preempted
    _assert_bit_equal(resumed.state, uninterrupted.state)


def test_keep_n_and_restore_onto_eval_shape(tmp_path):
    config = _config()
    state = init_training_state(config, jax.random.key(0))
    with CheckpointManager(tmp_path, config, keep=2, save_every=1, async_save=True) as mngr:
        for step in range(1, 6):
            mngr.save(step, state.replace(step=state.step + step), rng=jax.random.key(step))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [4, 5]
        target = jax.eval_shape(lambda k: init_training_state(config, k), jax.random.key(0))
        restored, rng, data = mngr.restore(target)
    assert int(restored.step) == 5 and data is None
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(5)))
    _assert_bit_equal(restored.params, state.params)
    _assert_bit_equal(restored.opt_state, state.opt_state)


def test_other_model_size_is_refused_naming_fields(tmp_path):
    config = _config()
    with CheckpointManager(tmp_path, config, save_every=1) as mngr:
        mngr.save(1, init_training_state(config, jax.random.key(0)))
    other = get_config(5, "mt30")
    with CheckpointManager(tmp_path, other) as mngr:
        target = jax.eval_shape(lambda k: init_training_state(other, k), jax.random.key(0))
        with pytest.raises(ConfigMismatchError, match=r"model\.mlp_dim: checkpoint 384 vs config 512") as e:
            mngr.restore(target)
    assert "model.model_size" in str(e.value) and "model.num_q" in str(e.value)
    mt80 = get_config(1, "mt80")
    with CheckpointManager(tmp_path, mt80) as mngr, pytest.raises(ConfigMismatchError, match="model.task_set"):
        mngr.check_config()
    with CheckpointManager(tmp_path / "empty", config) as mngr, pytest.raises(FileNotFoundError):
        mngr.restore(None)


def test_data_with_typed_keys_and_empty_arrays_round_trips(tmp_path):
    """The data item may hold typed PRNG keys (any implementation) and zero-size arrays (an MJX model without
    actuators has empty ``act``): saved as key data / left out, they come back as keys and empty arrays."""
    import jax.numpy as jnp

    config = get_smoke_config()
    data = {"key": jax.random.key(3), "keys": jax.random.split(jax.random.key(4, impl="rbg"), 3),
            "empty": jnp.zeros((2, 0), jnp.float32), "x": (jnp.arange(3), jnp.ones((0,), jnp.int32))}
    state = {"w": jnp.ones(2)}
    with CheckpointManager(tmp_path, config, async_save=False) as mngr:
        mngr.save(1, state, rng=jax.random.key(0), data=data, force=True)
    with CheckpointManager(tmp_path, config) as mngr:
        _, rng, back = mngr.restore(jax.eval_shape(lambda: state), jax.eval_shape(lambda: data))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(data)
    assert back["keys"].dtype == data["keys"].dtype and back["key"].dtype == data["key"].dtype
    np.testing.assert_array_equal(jax.random.key_data(back["keys"]), jax.random.key_data(data["keys"]))
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(data["key"]))
    assert back["empty"].shape == (2, 0) and back["x"][1].shape == (0,) and back["x"][1].dtype == jnp.int32
    np.testing.assert_array_equal(back["x"][0], np.arange(3))


def test_restoring_data_of_another_layout_names_the_arrays(tmp_path):
    """Data saved with other settings (or by another version) is refused before orbax reads it, naming the arrays
    whose shapes differ and those only one side has, instead of orbax's shape error deep in a thread."""
    import jax.numpy as jnp

    from mtdistill_jax.checkpoint.manager import DataMismatchError

    config = get_smoke_config()
    state = {"w": jnp.ones(2)}
    data = {"env": {"obs": jnp.zeros((4, 5)), "key": jax.random.key(1)}, "replay": (jnp.zeros((3, 7)),)}
    with CheckpointManager(tmp_path, config, async_save=False) as mngr:
        mngr.save(1, state, rng=jax.random.key(0), data=data, force=True)
    other = {"env": {"obs": jnp.zeros((4, 24)), "key": jax.random.key(1), "first": jnp.zeros(4, bool)},
             "replay": (jnp.zeros((3, 7)),)}
    with CheckpointManager(tmp_path, config) as mngr:
        with pytest.raises(DataMismatchError) as e:
            mngr.restore(jax.eval_shape(lambda: state), jax.eval_shape(lambda: other))
        _, _, back = mngr.restore(jax.eval_shape(lambda: state), jax.eval_shape(lambda: data))  # the same layout
    msg = str(e.value)
    assert "env/obs: saved (4, 5), this run (4, 24)" in msg and "env/first: not in the checkpoint" in msg
    assert "replay" not in msg and "key" not in msg and isinstance(e.value, ValueError)
    np.testing.assert_array_equal(back["replay"][0], np.zeros((3, 7)))
