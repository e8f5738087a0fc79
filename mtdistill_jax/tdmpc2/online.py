"""Online TD-MPC2 in one compiled program: env step, planning, replay and updates inside ``lax.scan``.

The official ``online_trainer.py`` runs one env: act (random actions for the first ``seed_steps`` steps) -> step
-> add to the buffer when the episode ends -> one update per env step after the seed steps, and at the step the
seed phase ends as many updates as there were seed steps (pretraining on the seed data). :class:`OnlineLoop`
does the same for ``M`` envs stepping in lockstep (any MT30 subset x N envs per task, one
:class:`~mtdistill_jax.envs.multitask.MultiTaskEnv`): one *agent step* is M env steps, and

- during the seed phase (agent steps ``0 .. S`` with ``S = seed_agent_steps = max(ceil(seed_steps / M), T)``:
  the official trainer acts randomly while ``step <= seed_steps``, and here at least one whole episode is
  collected, the buffer's unit) the actions are uniform in [-1, 1] on each task's used action dims, as the
  official ``torch.rand`` actions;
- afterwards the actor is the planner (:func:`~mtdistill_jax.tdmpc2.planner.make_plan_policy`, official
  ``act`` in training mode: ``mode='sample'``);
- the episodes go to the on-device :class:`~mtdistill_jax.data.replay.ReplayBuffer` step by step (sampleable once
  complete);
- ``utd`` updates per env step after the seed phase (official 1; fractions accumulate, so ``utd=1/16`` with
  M = 16 is one update per agent step), and at agent step ``S`` ``seed_updates`` updates at once (official: as
  many as seed steps, at ``step == seed_steps``), then ``utd * M`` per agent step from ``S + 1`` on. Each
  update is the library's update function (``make_update_fn`` or a distillation update), on a batch from the
  buffer.

:meth:`OnlineLoop.train_chunk` runs ``K`` agent steps (static) as one pure function of the :class:`OnlineCarry`
(learner state, replay state, env state, planner state, key, counters); jit it with the carry donated. Python
only runs between chunks (logging, evaluation, checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mtdistill_jax.acting import Transition
from mtdistill_jax.data.replay import ReplayBuffer, ReplayState
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.planner import init_planner_state, make_plan_policy
from mtdistill_jax.tdmpc2.train import TrainingState, init_training_state, make_update_fn

OFFICIAL_MIN_SEED_STEPS = 1000  # official seed_steps = max(1000, 5 * episode_length)


@flax.struct.dataclass
class OnlineCarry:
    """Everything the online loop carries from one agent step to the next (and what a checkpoint saves)."""

    learner: TrainingState
    replay: ReplayState
    env_state: Any
    policy_state: Any
    key: jax.Array
    agent_steps: jax.Array  # int32: agent steps taken (M env steps each)
    update_credit: jax.Array  # float32: updates owed but not yet run (fractional utd)
    updates: jax.Array  # int32: updates run
    returns: jax.Array  # [M] float32: return of each env's current episode so far


@flax.struct.dataclass
class ChunkStats:
    """Sums over a chunk: ``metrics`` (update metrics summed over its updates), ``num_updates``, and the returns of
    the episodes that ended in it (``episode_return_sum`` [M], ``episodes`` [M] count per env)."""

    metrics: dict
    num_updates: jax.Array
    episode_return_sum: jax.Array
    episodes: jax.Array


def default_seed_steps(episode_length: int) -> int:
    """The official ``seed_steps``: ``max(1000, 5 * episode_length)`` env steps."""
    return max(OFFICIAL_MIN_SEED_STEPS, 5 * int(episode_length))


class OnlineLoop:
    """``loop = OnlineLoop(config, env)``; ``carry = loop.init(key)``; ``carry, stats = jit(loop.train_chunk,
    static_argnums=1, donate_argnums=0)(carry, K)``.

    ``env``: a batched env with a common episode length (e.g. ``MultiTaskEnv(tasks, N)``, ``auto_reset=True``);
    ``config``: the training config (``config.train`` hyperparameters, ``config.planner``, ``config.model``);
    ``update_fn``: ``(state, batch, key) -> (state, metrics)`` (default: the TD-MPC2 update of ``config``);
    ``seed_steps`` (env steps, default official), ``seed_updates`` (default: ``seed_steps``), ``utd`` (updates per
    env step, default 1), ``capacity`` (transitions, default ``min(config.steps * M, 1M)``: the official
    ``min(steps, 1M)``).
    """

    def __init__(self, config: ml_collections.ConfigDict, env, *, update_fn: Callable | None = None,
                 seed_steps: int | None = None, seed_updates: int | None = None, utd: float = 1.0,
                 capacity: int | None = None, init_state: Callable | None = None):
        lengths = {int(x) for x in env.episode_lengths}
        if len(lengths) != 1:
            raise UserError(f"online training needs one episode length for all envs, got {sorted(lengths)}")
        self.T = lengths.pop()
        self.M = int(env.num_envs)
        if utd <= 0:
            raise UserError(f"utd (updates per env step) must be > 0, got {utd}")
        self.config, self.env, self.utd = config, env, float(utd)
        self.seed_steps = default_seed_steps(self.T) if seed_steps is None else int(seed_steps)
        self.seed_updates = self.seed_steps if seed_updates is None else int(seed_updates)
        if self.seed_steps < 0 or self.seed_updates < 0:
            raise UserError(f"seed_steps and seed_updates must be >= 0, got {self.seed_steps}, {self.seed_updates}")
        # random actions for ceil(seed_steps / M) agent steps, and at least one whole episode (the buffer's unit)
        self.seed_agent_steps = max(math.ceil(self.seed_steps / self.M), self.T)
        capacity = min(int(config.steps) * self.M, 1_000_000) if capacity is None else int(capacity)
        ts_obs, ts_act = env.obs_pad, env.action_pad
        self.replay = ReplayBuffer(max(capacity, self.M * self.T), episode_length=self.T, num_envs=self.M,
                                   batch_size=config.train.batch_size, horizon=config.train.horizon,
                                   obs_dim=ts_obs, action_dim=ts_act)
        model = make_world_model(config.model)
        self.update = update_fn or make_update_fn(model, config)
        self.init_state = init_state or (lambda key: init_training_state(config, key))
        self.planner = make_plan_policy(model, config, "sample")

    def init(self, key) -> OnlineCarry:
        k_learn, k_env, k_replay, k_loop = jax.random.split(key, 4)
        return OnlineCarry(learner=self.init_state(k_learn), replay=self.replay.init(k_replay),
                           env_state=self.env.reset(k_env), policy_state=init_planner_state(self.config, self.M),
                           key=k_loop, agent_steps=jnp.zeros((), jnp.int32),
                           update_credit=jnp.zeros((), jnp.float32), updates=jnp.zeros((), jnp.int32),
                           returns=jnp.zeros((self.M,), jnp.float32))

    # --------------------------------------------------------------------------------------------- acting
    def _act(self, carry: OnlineCarry, key):
        es = carry.env_state
        seeding = carry.agent_steps <= self.seed_agent_steps  # official: random while step <= seed_steps

        def random_action(_):
            a = jax.random.uniform(key, (self.M, self.env.action_pad), jnp.float32, -1.0, 1.0)
            return a * self.env.action_masks, carry.policy_state

        def plan(_):
            return self.planner(carry.learner.params, es.obs, es.task, es.first, carry.policy_state, key)

        return jax.lax.cond(seeding, random_action, plan, None)

    # -------------------------------------------------------------------------------------------- updates
    def _num_updates(self, carry: OnlineCarry):
        """(updates to run after this agent step, remaining credit)."""
        step = carry.agent_steps - 1  # the index of this agent step (the counter is already advanced)
        after_seed = step > self.seed_agent_steps
        at_seed_end = step == self.seed_agent_steps  # official: seed_steps updates at step == seed_steps
        credit = carry.update_credit + jnp.where(after_seed, self.utd * self.M, 0.0)
        n = jnp.floor(credit)
        n_total = n.astype(jnp.int32) + jnp.where(at_seed_end, self.seed_updates, 0)
        return n_total, credit - n

    def _updates(self, learner, replay: ReplayState, key, n):
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                       jax.eval_shape(lambda: self._one_update(learner, replay, key)[2]))

        def body(i, c):
            learner, replay, total = c
            learner, replay, metrics = self._one_update(learner, replay, jax.random.fold_in(key, i))
            return learner, replay, jax.tree_util.tree_map(jnp.add, total, metrics)

        return jax.lax.fori_loop(0, n, body, (learner, replay, zeros))

    def _one_update(self, learner, replay, key):
        batch, replay = self.replay.sample(replay)
        learner, metrics = self.update(learner, batch, key)
        return learner, replay, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    # ---------------------------------------------------------------------------------------------- chunk
    def agent_step(self, carry: OnlineCarry) -> tuple[OnlineCarry, tuple[dict, jax.Array, jax.Array, jax.Array]]:
        """One agent step (M env steps) and the updates it owes: ``(carry, (metrics sums, updates, ended-episode
        returns [M], ended [M]))``."""
        key, k_act, k_upd = jax.random.split(carry.key, 3)
        es = carry.env_state
        replay = jax.lax.cond(es.first[0], lambda r: self.replay.start(r, es.obs, es.task), lambda r: r,
                              carry.replay)
        action, policy_state = self._act(carry, k_act)
        nxt = self.env.step(es, action)
        tr = Transition(obs=es.obs, action=action, reward=nxt.reward, next_obs=nxt.final_obs, done=nxt.done,
                        first=es.first, task=es.task)
        replay = self.replay.add(replay, tr.action, tr.reward, tr.next_obs)
        returns = carry.returns + tr.reward
        ended_returns = jnp.where(tr.done, returns, 0.0)
        carry = carry.replace(env_state=nxt, policy_state=policy_state, key=key, replay=replay,
                              agent_steps=carry.agent_steps + 1, returns=jnp.where(tr.done, 0.0, returns))
        n, credit = self._num_updates(carry)
        learner, replay, metrics = self._updates(carry.learner, carry.replay, k_upd, n)
        carry = carry.replace(learner=learner, replay=replay, update_credit=credit, updates=carry.updates + n)
        return carry, (metrics, n, ended_returns, tr.done.astype(jnp.int32))

    def train_chunk(self, carry: OnlineCarry, num_agent_steps: int) -> tuple[OnlineCarry, ChunkStats]:
        """``num_agent_steps`` agent steps (static) inside one ``lax.scan``; sums of what happened in them."""

        def step(c, _):
            c, out = self.agent_step(c)
            return c, out

        carry, (metrics, n, ended, done) = jax.lax.scan(step, carry, None, length=num_agent_steps)
        return carry, ChunkStats(metrics=jax.tree_util.tree_map(lambda x: x.sum(0), metrics),
                                 num_updates=n.sum(), episode_return_sum=ended.sum(0), episodes=done.sum(0))
