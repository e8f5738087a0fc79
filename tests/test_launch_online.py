"""Online training through launch/train.py with an online config: kill -9 and resume reaches the uninterrupted
state bit for bit; metrics, evaluations and the agent export; a NaN stops the run and keeps the last checkpoint."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from launch_util import launch, read_csv, subprocess_env
from refdata import REPO

from mtdistill_jax.checkpoint.manager import CheckpointManager
from mtdistill_jax.configs.online import get_smoke_config
from mtdistill_jax.tdmpc2.host_loop import NonFiniteLossError
from mtdistill_jax.tdmpc2.online import OnlineCarry, carry_rest, make_online_loop, train_online

ONLINE = ["--config=mtdistill_jax/configs/online.py", "--config.model_size=1", "--config.train.batch_size=8",
          "--config.planner.iterations=2", "--config.planner.num_samples=16", "--config.planner.num_pi_trajs=4",
          "--config.planner.num_elites=4", "--config.online.episode_length=8", "--config.online.seed_steps=3",
          "--config.online.seed_updates=3", "--config.online.agent_steps_per_dispatch=4", "--config.steps=128",
          "--config.log_every=8", "--save_every=16", "--noprogress"]


def _config(steps=128):
    """The config the ONLINE command line makes (for restore targets)."""
    c = get_smoke_config()
    c.steps, c.log_every = steps, 8
    return c


def _restore(workdir, step, config=None):
    config = config or _config()
    loop = make_online_loop(config)
    target = jax.eval_shape(loop.init, jax.random.key(config.seed))
    with CheckpointManager(workdir, config) as mngr:
        learner, key, rest = mngr.restore(target.learner, carry_rest(target), step=step)
    return OnlineCarry(learner=learner, key=key, **rest)


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_online_kill9_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = launch("train.py", [f"--workdir={full}", *ONLINE, "--eval_every=64", "--eval_policy=prior"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled the online chunk" in r.stderr and "done at env step 128" in r.stderr, r.stderr[-2000:]
    rows = read_csv(full / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(8, 129, 8))
    last = rows[-1]
    for name in ("train/total_loss", "train/episode_return", "train/updates", "perf/env_steps_per_second",
                 "perf/updates_per_second", "eval/cartpole-balance/return", "eval/score"):
        assert np.isfinite(float(last[name])), name
    # 8 env steps of seeding (a whole episode), 3 pretraining updates at step 8, then 1 per env step: 3 + 119
    assert float(last["train/updates"]) == 122
    assert sorted(os.listdir(full / "eval")) == ["step_000000064.json", "step_000000128.json"]
    assert (full / "agent" / "agent.json").is_file()

    # the same command (without evaluation), killed with SIGKILL once its first checkpoint is on disk
    env = subprocess_env()
    cmd = [sys.executable, "launch/train.py", f"--workdir={killed}", *ONLINE]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not (killed / "16").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    assert not (killed / "agent").exists()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resumed from env step (16|32|48|64|80|96|112) ", r.stderr), r.stderr[-2000:]
    assert "done at env step 128" in r.stderr

    # the whole state at the end (learner, key, replay, envs, planner, counters) is the uninterrupted run's
    a, b = _restore(full, 128), _restore(killed, 128)
    assert int(a.agent_steps) == 128 and int(a.updates) == 122
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _poison_params_at(update_fn, at: int):
    """The update, but from learner step ``at`` on it writes a NaN into the first parameter leaf it returns."""

    def update(state, batch, key):
        state, metrics = update_fn(state, batch, key)
        leaves, treedef = jax.tree_util.tree_flatten(state.params)
        bad = jnp.where(state.step >= at, jnp.nan, 0.0).astype(leaves[0].dtype)
        leaves[0] = leaves[0] + bad
        return state.replace(params=jax.tree_util.tree_unflatten(treedef, leaves)), metrics

    return update


@pytest.mark.slow
def test_online_nan_stops_and_keeps_last_checkpoint(tmp_path):
    from mtdistill_jax.nn.world_model import make_world_model
    from mtdistill_jax.tdmpc2.train import make_update_fn

    config = _config(steps=32)
    update = _poison_params_at(make_update_fn(make_world_model(config.model), config), at=10)
    # seeding: agent steps 0..8, 3 updates at step 8 (learner steps 1..3), then one per step: learner step 10 is
    # reached at env step 15, inside the chunk 12..16; the checkpoint at 8 is the last good one
    with pytest.raises(NonFiniteLossError) as e:
        train_online(config, str(tmp_path), save_every=8, update_fn=update, progress=False, async_save=False)
    msg = str(e.value)
    assert "env steps 13..16" in msg and "learner params" in msg, msg
    assert f"the last good checkpoint is step 8 in {tmp_path}" in msg and "step 16 was not saved" in msg, msg
    with CheckpointManager(tmp_path, config) as mngr:
        assert mngr.latest_step() == 8 and 16 not in mngr.all_steps()
    carry = _restore(tmp_path, 8, config)
    assert int(carry.agent_steps) == 8 and int(carry.updates) == 0
    assert all(np.isfinite(x).all() for x in _leaves(carry.learner.params))


def test_resume_with_other_envs_is_refused(tmp_path):
    """A workdir whose checkpoint was made with other tasks / envs per task / episode length (or offline) is
    refused before anything is built, naming the fields."""
    from mtdistill_jax.configs.train import get_smoke_config as offline_smoke
    from mtdistill_jax.errors import UserError

    with CheckpointManager(tmp_path / "on", _config(), async_save=False) as mngr:
        mngr.save(8, {"w": jnp.ones(2)}, force=True)
    other = _config()
    other.tasks, other.online.envs_per_task = "cartpole-swingup", 2
    with pytest.raises(UserError, match=r"other envs \(tasks: checkpoint \['cartpole-balance'\] vs config "
                                        r"\['cartpole-swingup'\]; online.envs_per_task: checkpoint 1 vs config 2\)"):
        train_online(other, str(tmp_path / "on"), progress=False, handle_signals=False, save_every=8)
    with CheckpointManager(tmp_path / "off", offline_smoke(), async_save=False) as mngr:
        mngr.save(8, {"w": jnp.ones(2)}, force=True)
    with pytest.raises(UserError, match="are of an offline run"):
        train_online(_config(), str(tmp_path / "off"), progress=False, handle_signals=False, save_every=8)
