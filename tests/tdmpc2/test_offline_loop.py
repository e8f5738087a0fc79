"""Offline loop: K updates per dispatch in one compiled program whose size does not depend on the dataset;
the same per-step batches and keys as one update per dispatch; chunk boundaries do not change the run; the
mesh path."""

import glob
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.data.offline import OfflineSampler
from mtdistill_jax.data.tdmpc2_format import Episodes, load_chunk
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.offline import chunk_end, compile_train_chunk, make_train_chunk, train_offline
from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"
STEPS = 5
# A scanned update and a standalone jitted one are different XLA programs (fusion, op order), and so are a 2-device
# mesh run and a single-device one: float32 round-off, which Adam amplifies for near-zero gradients (a weight moves
# ~lr * sign(g) per step, lr = 3e-4, so a flipped sign moves it up to 2 lr). Weights after a few steps: all but a
# few in 10,000 within TOL (a third of one Adam step), none further apart than flipped signs at every step could put
# them. Measured: one weight of 88,320 5.7e-5 apart after 5 steps at LLVM -O0 on an Intel Xeon, 2.0e-4 on an AMD
# EPYC (mesh run). Per-step losses: rtol 1e-4 (another batch or key changes them by far more).
TOL = 1e-4
OUTLIER_SHARE = 1e-4


def _assert_weights_close(got, want, lr, steps=STEPS):
    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
             for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True)]
    diff = np.concatenate(diffs)
    far = int(np.sum(diff > TOL))
    assert far <= OUTLIER_SHARE * diff.size, f"{far} of {diff.size} weights more than {TOL} apart"
    assert diff.max() <= 2 * lr * steps, f"a weight {diff.max():.3g} apart, more than {steps} Adam steps"


@pytest.fixture(scope="module")
def episodes():
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return load_chunk(CHUNK)


def _config(k):
    c = get_smoke_config()
    c.steps = STEPS
    c.train.steps_per_dispatch = k
    return c


def _assert_bit_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_chunk_end_schedule():
    # K=4, log 10, save 6, total 13: chunks end at every multiple of any of them and at the total
    ends, s = [], 0
    while s < 13:
        s = chunk_end(s, 13, 4, 10, 6)
        ends.append(s)
    assert ends == [4, 6, 8, 10, 12, 13]


def test_one_program_for_every_chunk_length_and_dataset_size(episodes):
    """The chunk length is a traced argument (one compilation for 1, 2 or 3 updates) and the episodes an
    argument: the lowered train chunk for 10 and 40 episodes has the same size."""
    config = _config(3)
    sampler = OfflineSampler(8, config.train.horizon, 24, 6)
    chunk = make_train_chunk(make_update_fn(make_world_model(config.model), config), sampler)
    tiled = Episodes(*(np.concatenate([getattr(episodes, k)] * 4) for k in ("obs", "action", "reward", "task")))
    key = jax.random.key(0)
    state, ds = init_training_state(config, key), sampler.init(key)
    sizes = [len(jax.jit(chunk).lower(state, sampler.load(e), ds, key, np.int32(1)).as_text())
             for e in (episodes, tiled)]
    assert sizes[0] == sizes[1], sizes
    compiled = compile_train_chunk(chunk)
    data = sampler.load(episodes)
    for n in (1, 2, 3):
        state, ds, key, m = compiled(state, data, ds, key, np.int32(n))
    assert int(state.step) == 6 and int(ds.count) == 6
    assert compiled._cache_size() == 1
    assert set(m.total) == set(m.last) and all(np.isfinite(float(v)) for v in m.total.values())


@pytest.fixture(scope="module")
def per_step(episodes, tmp_path_factory):
    """K=1: one update per dispatch (through the chunk program), metrics of every step."""
    seen = []
    result = train_offline(_config(1), episodes, str(tmp_path_factory.mktemp("k1")), save_every=100,
                           on_step=lambda step, m: seen.append({k: float(v) for k, v in m.items()}))
    return result, seen


def test_chunking_does_not_change_the_run(episodes, per_step, tmp_path):
    """K=1 and K=3 run the same compiled body over the same (key, cursor) stream: bit-identical."""
    k3 = train_offline(_config(3), episodes, str(tmp_path), save_every=100)
    k1, _ = per_step
    assert k3.step == k1.step == STEPS
    _assert_bit_equal(k3.state, k1.state)
    _assert_bit_equal(k3.data_state, k1.data_state)
    np.testing.assert_array_equal(jax.random.key_data(k3.rng), jax.random.key_data(k1.rng))


def test_chunk_traces_the_update_once(episodes):
    config = _config(1)
    update, calls = make_update_fn(make_world_model(config.model), config), []
    sampler = OfflineSampler(config.train.batch_size, config.train.horizon, 24, 6)
    chunk = make_train_chunk(lambda *a: calls.append(1) or update(*a), sampler)
    state = jax.eval_shape(lambda k: init_training_state(config, k), jax.random.key(0))
    jax.jit(chunk).trace(state, sampler.load(episodes), jax.eval_shape(sampler.init, jax.random.key(1)),
                         jax.random.key(2), np.int32(2))
    assert len(calls) == 1  # the zeros of the metric sums come from the loop body's own trace


def test_same_batches_and_keys_as_a_host_loop(episodes, per_step):
    """The scanned loop draws exactly what the former host loop (one jit(sample) + one jit(update) per step)
    drew: the same per-step losses and, up to round-off, the same weights."""
    config = _config(1)
    update = jax.jit(make_update_fn(make_world_model(config.model), config))
    sampler = OfflineSampler(config.train.batch_size, config.train.horizon, 24, 6)
    data = sampler.load(episodes)
    k_init, k_data, rng = jax.random.split(jax.random.key(config.seed), 3)
    state, ds = init_training_state(config, k_init), sampler.init(k_data)
    sample = jax.jit(sampler.sample)
    losses = []
    for _ in range(STEPS):
        rng, k = jax.random.split(rng)
        batch, ds = sample(data, ds)
        state, m = update(state, batch, k)
        losses.append({k: float(v) for k, v in m.items()})
    result, seen = per_step
    assert len(seen) == STEPS
    for i, (a, b) in enumerate(zip(losses, seen, strict=True)):
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=f"step {i + 1} {name}")
    _assert_bit_equal(result.data_state, ds)
    np.testing.assert_array_equal(jax.random.key_data(result.rng), jax.random.key_data(rng))
    _assert_weights_close(result.state.params, state.params, config.train.lr)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
def test_mesh_run(episodes, per_step, tmp_path):
    from mtdistill_jax.parallel import make_mesh

    seen = []
    result = train_offline(_config(3), episodes, str(tmp_path), save_every=100, mesh=make_mesh(2),
                           on_step=lambda step, m: seen.append((step, float(m["train/total_loss"]))))
    assert [s for s, _ in seen] == [3, 5] and result.step == STEPS
    leaf = jax.tree_util.tree_leaves(result.state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
    _, single = per_step
    for step, loss in seen:
        np.testing.assert_allclose(loss, single[step - 1]["train/total_loss"], rtol=1e-4, err_msg=str(step))
    _assert_weights_close(result.state.params, per_step[0].state.params, _config(3).train.lr)


# ------------------------------------------------------------------------------------------------------------
# What launch/train.py and launch/distill.py share: aux, init_state, NaN guards, evaluation and metrics hooks.
# A cheap stand-in update (step + 1, metrics from the batch and aux) keeps these fast; the loop does not care.


def _fake_update(traces=None, nan_from=None):
    """``update(state, batch, key, draws=None, aux=None)``: counts traces, adds 1 to the step and to
    ``params['distill']['w']`` if present; ``train/total_loss`` turns NaN once ``state.step >= nan_from``."""

    def update(state, batch, key, draws=None, aux=None):
        if traces is not None:  # whether aux came in as a traced argument (not a constant)
            traces.append(aux is not None and isinstance(aux["w"], jax.core.Tracer))
        loss = jnp.mean(batch.reward)
        if nan_from is not None:
            loss = jnp.where(state.step >= nan_from, jnp.nan, loss)
        metrics = {"train/total_loss": loss, "train/step": state.step.astype(jnp.float32)}
        if aux is not None:
            metrics["aux/sum"] = aux["w"].astype(jnp.float32).sum() + aux["h"].astype(jnp.float32).sum()
        params = state.params
        if "distill" in params:
            params = {**params, "distill": {"w": params["distill"]["w"] + 1}}
        return state.replace(step=state.step + 1, params=params), metrics

    return update


def _smoke(steps, k=2, log_every=None):
    c = get_smoke_config()
    c.steps, c.train.steps_per_dispatch = steps, k
    c.log_every = log_every or steps
    return c


AUX = {"w": np.arange(6, dtype=np.int8).reshape(2, 3), "h": np.full((4,), 0.5, np.float16)}  # sum 15 + 2


@pytest.mark.parametrize("devices", [1, 2])
def test_aux_is_an_argument_not_donated_one_compilation(episodes, tmp_path, devices):
    if jax.device_count() < devices:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    from mtdistill_jax.parallel import make_mesh

    aux = jax.tree_util.tree_map(jnp.asarray, AUX)
    traces, seen = [], []
    # steps 5, K=2, log 3: chunks of 2, 1, 1, 1 updates, all through one compiled program
    result = train_offline(_smoke(5, 2, 3), episodes, str(tmp_path), save_every=100, aux=aux,
                           update_fn=_fake_update(traces), progress=False,
                           mesh=make_mesh(2) if devices == 2 else None,
                           on_step=lambda step, m: seen.append((step, float(m["aux/sum"]))))
    assert seen == [(2, 17.0), (3, 17.0), (4, 17.0), (5, 17.0)] and result.metrics["aux/sum"] == 17.0
    assert traces and all(traces)  # every trace saw aux as a traced argument of the update
    # one compilation: as many traces as lowering the chunk program once
    once = []
    config = _smoke(5)
    sampler = OfflineSampler(8, config.train.horizon, 24, 6)
    key = jax.random.key(0)
    jax.jit(make_train_chunk(_fake_update(once), sampler)).lower(
        init_training_state(config, key), sampler.load(episodes), sampler.init(key), key, np.int32(1), aux)
    assert len(traces) == len(once) <= 2, (len(traces), len(once))
    for name, x in aux.items():  # not donated: the caller's arrays are intact
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), AUX[name])


def test_init_state_makes_fresh_state_and_restore_target(episodes, tmp_path):
    """A learner whose state carries more params (a distillation head) resumes onto its own target."""

    def init_state(key):
        state = init_training_state(_smoke(2), key)
        return state.replace(params={**state.params, "distill": {"w": jnp.zeros((3,), jnp.float32)}})

    first = train_offline(_smoke(2), episodes, str(tmp_path), save_every=2, init_state=init_state,
                          update_fn=_fake_update(), progress=False)
    np.testing.assert_array_equal(first.state.params["distill"]["w"], [2.0] * 3)
    resumed = train_offline(_smoke(4), episodes, str(tmp_path), save_every=2, init_state=init_state,
                            update_fn=_fake_update(), progress=False)
    assert resumed.resumed_from == 2 and resumed.step == 4
    np.testing.assert_array_equal(resumed.state.params["distill"]["w"], [4.0] * 3)


@pytest.mark.parametrize("nan_from,last_good", [(5, 4), (0, None)])
def test_nonfinite_loss_stops_before_saving(episodes, tmp_path, nan_from, last_good):
    """The loss turns NaN in update nan_from+1: the run raises before saving that chunk; the latest checkpoint is
    the last multiple of save_every <= nan_from and restores."""
    from mtdistill_jax.checkpoint.manager import CheckpointManager
    from mtdistill_jax.tdmpc2.offline import NonFiniteLossError

    config = _smoke(10, 3)  # save 2, K 3: chunks end at 2, 3, 4, 6, ...
    with pytest.raises(NonFiniteLossError) as e:
        train_offline(config, episodes, str(tmp_path), save_every=2, update_fn=_fake_update(nan_from=nan_from),
                      progress=False, metrics_dir=str(tmp_path))
    msg = str(e.value)
    assert "train/total_loss=nan" in msg and "train/step" not in msg, msg
    with CheckpointManager(tmp_path, config) as mngr:
        assert mngr.latest_step() == last_good
        if last_good is None:
            assert "updates 1..2 " in msg and "there is no checkpoint" in msg, msg
            return
        assert "updates 5..6 " in msg and f"the last good checkpoint is step {last_good} in {tmp_path}" in msg, msg
        target = jax.eval_shape(lambda k: init_training_state(config, k), jax.random.key(0))
        cursor = jax.eval_shape(OfflineSampler(8, 3).init, jax.random.key(0))
        state, _, data_state = mngr.restore(target, cursor)
    assert int(state.step) == last_good == int(data_state.count)


def test_nonfinite_data_is_rejected_before_anything_is_written(episodes, tmp_path, monkeypatch):
    from mtdistill_jax.data import offline as data_offline
    from mtdistill_jax.data.offline import NonFiniteDataError, check_finite

    obs, action, reward = episodes.obs.copy(), episodes.action.copy(), episodes.reward.copy()
    assert np.isnan(action[:, 0]).all() and np.isnan(reward[:, 0]).all()  # filler: never read, not checked
    check_finite(Episodes(obs, action, reward, episodes.task))
    reward[7, 1], reward[8, 2], reward[9, 500] = np.inf, np.nan, -np.inf
    bad = Episodes(obs, action, reward, episodes.task)
    with pytest.raises(NonFiniteDataError, match=r"episodes: reward has 3 non-finite values \(NaN/inf\) in frames "
                       r"the sampler reads \(frame 0 of action/reward is filler and not checked\); the first in "
                       r"episode 7, frame 1 \(of 10 episodes x 501 frames\)"):
        check_finite(bad)
    monkeypatch.setattr(data_offline, "_BLOCK_ELEMENTS", 501)  # one episode per block: same answer
    with pytest.raises(NonFiniteDataError, match=r"reward has 3 non-finite values .* episode 7, frame 1 "):
        check_finite(bad)
    obs[3, 10, 5] = np.nan
    with pytest.raises(NonFiniteDataError, match=r"obs has 1 non-finite value \(NaN/inf\) .*; the first in "
                       r"episode 3, frame 10 "):
        train_offline(_smoke(2), Episodes(obs, action, reward, episodes.task), str(tmp_path / "a"), progress=False)
    # data already on device: reduced there, located on the host
    sampler = OfflineSampler(8, 3, 24, 6)
    data = sampler.load(episodes)
    data = data.replace(action=data.action.at[2, 4, 1].set(jnp.nan))
    with pytest.raises(NonFiniteDataError, match=r"data: action has 1 non-finite value .* episode 2, frame 4 "):
        train_offline(_smoke(2), data, str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _Rows:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        self.rows.append((step, dict(metrics)))


def test_eval_hook_and_metrics_rows(episodes, tmp_path):
    """eval_fn at every multiple of eval_every (chunks cut there) and at the end, in the same row as that step's
    training means; perf/steps_per_second with each log."""
    calls = []

    def eval_fn(state, step):
        calls.append((step, int(state.step)))
        return {"eval/score": step / 10}

    rows = _Rows()
    result = train_offline(_smoke(7, 5, 3), episodes, str(tmp_path), save_every=100, update_fn=_fake_update(),
                           eval_every=2, eval_fn=eval_fn, writer=rows, progress=False)
    assert calls == [(2, 2), (4, 4), (6, 6), (7, 7)]  # K=5 alone would end chunks at 5 and 7
    assert [s for s, _ in rows.rows] == [2, 3, 4, 6, 7]
    by_step = dict(rows.rows)
    assert set(by_step[2]) == {"eval/score", "perf/eval_seconds"}
    assert {"train/total_loss", "train/step", "perf/steps_per_second"} <= set(by_step[3])
    assert by_step[3]["train/step"] == 1.0  # mean of the step counters 0, 1, 2 over the window
    assert by_step[6]["train/step"] == 4.0 and by_step[6]["eval/score"] == 0.6  # one row per step
    assert result.eval_metrics["eval/score"] == 0.7 and result.metrics["train/step"] == 6.0
    with pytest.raises(ValueError, match="eval_every=2 needs an eval_fn"):
        train_offline(_smoke(2), episodes, str(tmp_path), eval_every=2, progress=False)


def test_metrics_dir_resumes_without_duplicate_rows(episodes, tmp_path):
    """The process dies at step 4 after logging 1..3 with checkpoints at 1 and 2: the resumed run rewrites 3."""
    from mtdistill_jax.metrics import read_metrics

    class Crash(RuntimeError):
        pass

    def crash_at_4(step, m):
        if step == 4:
            raise Crash

    config = _smoke(5, 1, 1)
    with pytest.raises(Crash):
        train_offline(config, episodes, str(tmp_path), save_every=2, update_fn=_fake_update(), progress=False,
                      metrics_dir=str(tmp_path), on_step=crash_at_4)
    np.testing.assert_array_equal(read_metrics(tmp_path)["step"], [1, 2, 3])
    resumed = train_offline(config, episodes, str(tmp_path), save_every=2, update_fn=_fake_update(),
                            progress=True, metrics_dir=str(tmp_path))
    assert resumed.resumed_from == 2
    cols = read_metrics(tmp_path)
    np.testing.assert_array_equal(cols["step"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(cols["train/step"], [0, 1, 2, 3, 4])
    assert np.all(cols["perf/steps_per_second"] > 0)
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 5


def test_preemption_saves_without_evaluating(episodes, tmp_path):
    import os
    import signal

    calls = []
    result = train_offline(_smoke(6, 2), episodes, str(tmp_path), save_every=100, update_fn=_fake_update(),
                           eval_every=2, eval_fn=lambda state, step: calls.append(step) or {"eval/score": 1.0},
                           on_step=lambda step, m: step == 4 and os.kill(os.getpid(), signal.SIGTERM),
                           progress=False)
    assert result.preempted and result.step == 4 and calls == [2]  # step 4: checkpoint at once, no evaluation
    assert result.eval_metrics["eval/score"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# The native (memory-mapped, host-sampled) dataset path: batches gathered on the host, K stacked per dispatch.


@pytest.fixture(scope="module")
def native_tiny(tmp_path_factory):
    from mtdistill_jax.data.native import import_chunks

    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return import_chunks([CHUNK], tmp_path_factory.mktemp("native"), shard_episodes=4, progress=False)


def test_native_dataset_gives_the_in_memory_run(native_tiny, per_step, tmp_path):
    """The same key draws the same batches from the imported chunk as from memory: bit-identical states (K=3 on
    the native path against K=1 in memory, so the stacked chunk is also independent of the chunking)."""
    result = train_offline(_config(3), native_tiny, str(tmp_path), save_every=100, progress=False)
    k1, _ = per_step
    assert result.step == STEPS and int(result.data_state.count) == STEPS
    _assert_bit_equal(result.state, k1.state)
    _assert_bit_equal(result.data_state, k1.data_state)
    np.testing.assert_array_equal(jax.random.key_data(result.rng), jax.random.key_data(k1.rng))


def test_native_resume_is_bit_exact(native_tiny, per_step, tmp_path):
    """Killed after step 3 (checkpoint at 2), resumed with another K: the uninterrupted run, bit for bit."""

    class Crash(RuntimeError):
        pass

    def crash_at_3(step, m):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_offline(_config(3), native_tiny, str(tmp_path), save_every=2, progress=False, on_step=crash_at_3)
    resumed = train_offline(_config(2), native_tiny, str(tmp_path), save_every=2, progress=False)
    assert resumed.resumed_from == 2 and resumed.step == STEPS
    k1, _ = per_step
    _assert_bit_equal(resumed.state, k1.state)
    _assert_bit_equal(resumed.data_state, k1.data_state)


def test_native_refusals(native_tiny, tmp_path, episodes):
    c = _smoke(2)
    c.model.task_set = "mt80"
    with pytest.raises(ValueError, match=r"the dataset .* holds task set mt30; the config's model.task_set is mt80"):
        train_offline(c, native_tiny, str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="data_mode='balanced' needs a native dataset"):
        train_offline(_smoke(2), episodes, str(tmp_path), progress=False, data_mode="balanced")
    result = train_offline(_smoke(3, 2), native_tiny, str(tmp_path / "b"), progress=False, data_mode="balanced",
                           update_fn=_fake_update(), save_every=100)
    assert result.step == 3


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
def test_native_mesh_run(native_tiny, tmp_path, episodes):
    """Host batches placed split over the mesh's data axis: the run of the in-memory mesh path."""
    from mtdistill_jax.parallel import make_mesh

    config = _smoke(5, 2, 5)
    kw = dict(save_every=100, progress=False, update_fn=_fake_update(), mesh=make_mesh(2))
    seen = {}
    for name, data in (("native", native_tiny), ("memory", episodes)):
        seen[name] = []
        train_offline(config, data, str(tmp_path / name), **kw,
                      on_step=lambda step, m, name=name: seen[name].append(float(m["train/total_loss"])))
    assert seen["native"] == seen["memory"] and len(seen["native"]) == 3
