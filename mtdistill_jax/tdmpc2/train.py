"""TD-MPC2 update step: ``TrainingState`` and one jitted ``update(state, batch, key) -> (state, metrics)``.

One update does what the official ``TDMPC2._update`` does, in order: TD targets (no gradient), world-model
step (Adam, encoder lr scaled, global-norm clip), policy step on the detached latents with the *updated*
world model, running value-scale update, Polyak update of the target Qs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.nn.world_model import WorldModel, init_params, make_world_model, renorm_rows
from mtdistill_jax.tdmpc2.losses import PI_KEY, WM_KEYS, Losses, make_losses
from mtdistill_jax.types import Batch, Params


@flax.struct.dataclass
class TrainingState:
    """All learner state. Change it with ``.replace``; the PRNG key travels beside it."""

    params: Params  # online world-model params (WorldModel tree)
    target_q_params: Params  # Polyak-averaged copy of params['Qs']
    opt_state: optax.OptState  # world-model optimiser state (all keys but 'pi_head')
    pi_opt_state: optax.OptState  # policy optimiser state (params['pi_head'])
    scale: jax.Array  # running P5-P95 value scale (float32 scalar, starts at 1)
    step: jax.Array  # number of updates applied (int32 scalar)


def split_params(params: Params) -> tuple[dict, dict]:
    """(world-model params, policy params)."""
    return {k: params[k] for k in WM_KEYS}, params[PI_KEY]


def make_optimizers(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """World-model Adam (encoder at ``lr * enc_lr_scale``) and policy Adam (eps 1e-5), each clipped."""
    tc = config.train

    def labels(p):
        return {k: jax.tree_util.tree_map(lambda _, k=k: "encoder" if k == "encoder" else "rest", v)
                for k, v in p.items()}

    wm = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip_norm),
        optax.multi_transform(
            {"encoder": optax.adam(tc.lr * tc.enc_lr_scale, eps=tc.adam_eps),
             "rest": optax.adam(tc.lr, eps=tc.adam_eps)},
            labels,
        ),
    )
    pi = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), optax.adam(tc.lr, eps=tc.pi_adam_eps))
    return wm, pi


def init_training_state(config: ml_collections.ConfigDict, key=None, params: Params | None = None,
                        target_q_params: Params | None = None) -> TrainingState:
    """Fresh training state (official init), or one around given params (e.g. an imported checkpoint)."""
    model = make_world_model(config.model)
    if params is None:
        if key is None:
            raise ValueError("init_training_state needs a PRNG key when no params are given")
        params = init_params(model, key)
    params = jax.tree_util.tree_map(jnp.asarray, dict(params))
    target_q_params = jax.tree_util.tree_map(jnp.array, params["Qs"] if target_q_params is None else target_q_params)
    wm_opt, pi_opt = make_optimizers(config)
    wm_params, pi_params = split_params(params)
    return TrainingState(params=params, target_q_params=target_q_params, opt_state=wm_opt.init(wm_params),
                         pi_opt_state=pi_opt.init(pi_params), scale=jnp.ones((), jnp.float32),
                         step=jnp.zeros((), jnp.int32))


def renorm_used_embeddings(params: Params, task) -> Params:
    """Renormalise (max norm 1) the embedding rows of the tasks in ``task``, as torch does in place on lookup."""
    table = params["task_emb"]["embedding"]
    used = jnp.zeros((table.shape[0],), bool).at[task].set(True)
    table = jnp.where(used[:, None], renorm_rows(table), table)
    return {**params, "task_emb": {**params["task_emb"], "embedding": table}}


def make_update_fn(model: WorldModel, config: ml_collections.ConfigDict,
                   losses: Losses | None = None) -> Callable[[TrainingState, Batch, Any], tuple[TrainingState, dict]]:
    """The un-jitted update ``(state, batch, key) -> (state, metrics)`` (jit it, or scan it)."""
    losses = losses or make_losses(model, config)
    wm_opt, pi_opt = make_optimizers(config)
    tau = config.train.tau

    def update(state: TrainingState, batch: Batch, key) -> tuple[TrainingState, dict]:
        k_wm, k_pi = jax.random.split(key)
        params = renorm_used_embeddings(state.params, batch.task)
        wm_params, _ = split_params(params)
        grad_fn = jax.grad(losses.world_model_loss, has_aux=True)
        wm_grads, (metrics, zs) = grad_fn(wm_params, params, state.target_q_params, batch, k_wm)
        grad_norm = optax.tree_utils.tree_norm(wm_grads)
        updates, opt_state = wm_opt.update(wm_grads, state.opt_state, wm_params)
        wm_params = optax.apply_updates(wm_params, updates)
        params = {**params, **wm_params}

        pi_params = params[PI_KEY]
        pi_grads, (pi_metrics, scale) = jax.grad(losses.policy_loss, has_aux=True)(
            pi_params, params, zs, batch.task, state.scale, k_pi)
        pi_grad_norm = optax.tree_utils.tree_norm(pi_grads)
        pi_updates, pi_opt_state = pi_opt.update(pi_grads, state.pi_opt_state, pi_params)
        params = {**params, PI_KEY: optax.apply_updates(pi_params, pi_updates)}

        target_q = jax.tree_util.tree_map(lambda t, o: t + tau * (o - t), state.target_q_params, params["Qs"])
        new_state = state.replace(params=params, target_q_params=target_q, opt_state=opt_state,
                                  pi_opt_state=pi_opt_state, scale=scale, step=state.step + 1)
        metrics = {**metrics, **pi_metrics, "train/grad_norm": grad_norm, "train/pi_grad_norm": pi_grad_norm}
        return new_state, metrics

    return update


def validate_batch(batch: Batch, config: ml_collections.ConfigDict, check_values: bool = True) -> None:
    """Raise a ``ValueError`` naming the field when a batch does not fit the config (outside jit).

    Shapes are always checked; with ``check_values`` the task ids are checked to be in range (this reads
    them to the host).
    """
    ts = get_task_set(config.model.task_set)
    H = config.train.horizon
    obs, action, reward, task = (np.shape(batch.obs), np.shape(batch.action), np.shape(batch.reward),
                                 np.shape(batch.task))
    if len(task) != 1:
        raise ValueError(f"batch.task must be [B] task ids, got shape {task}")
    B = task[0]
    expected = {"obs": (H + 1, B, ts.obs_pad), "action": (H, B, ts.action_pad), "reward": (H, B, 1)}
    for name, got in (("obs", obs), ("action", action), ("reward", reward)):
        if tuple(got) != expected[name]:
            raise ValueError(f"batch.{name} has shape {tuple(got)}, expected {expected[name]} "
                             f"(horizon {H}, batch {B}, {ts.name} obs_pad {ts.obs_pad} / action_pad {ts.action_pad})")
    task_dtype = getattr(batch.task, "dtype", None) or np.asarray(batch.task).dtype
    if not jnp.issubdtype(task_dtype, jnp.integer):
        raise ValueError(f"batch.task must be an integer array, got dtype {task_dtype}")
    if check_values:
        t = np.asarray(batch.task)
        if t.size and (t.min() < 0 or t.max() >= ts.num_tasks):
            raise ValueError(f"batch.task has ids outside [0, {ts.num_tasks}) for {ts.name}: "
                             f"min {t.min()}, max {t.max()}")


class Learner:
    """Public entry point: validates input outside jit, then runs the compiled update.

    ``learner = Learner(config); state = learner.init(key); state, metrics = learner.update(state, batch, key)``.
    Pass ``mesh`` (see :mod:`mtdistill_jax.parallel`) to shard the batch over devices with replicated params.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, donate: bool = True):
        self.config = config
        self.model = make_world_model(config.model)
        self.losses = make_losses(self.model, config)
        self._update = make_update_fn(self.model, config, self.losses)
        self.mesh = mesh
        if mesh is None:
            self.update_jit = jax.jit(self._update, donate_argnums=(0,) if donate else ())
        else:
            from mtdistill_jax.parallel import batch_sharding, replicated

            rep = replicated(mesh)
            self.update_jit = jax.jit(
                self._update,
                in_shardings=(rep, batch_sharding(mesh), rep),
                out_shardings=(rep, rep),
                donate_argnums=(0,) if donate else (),
            )

    def init(self, key=None, params: Params | None = None, target_q_params: Params | None = None) -> TrainingState:
        state = init_training_state(self.config, key, params, target_q_params)
        if self.mesh is not None:
            from mtdistill_jax.parallel import replicate

            state = replicate(state, self.mesh)
        return state

    def update(self, state: TrainingState, batch: Batch, key, check_values: bool = True):
        validate_batch(batch, self.config, check_values)
        if self.mesh is not None:
            from mtdistill_jax.parallel import shard_batch

            batch = shard_batch(batch, self.mesh)
        return self.update_jit(state, batch, key)
