"""TD-MPC2 update step: ``TrainingState`` and one jitted ``update(state, batch, key, draws=None) -> (state, metrics)``.

One update does what the official ``TDMPC2._update`` does, in order: TD targets (no gradient), world-model
step (Adam, encoder lr scaled, global-norm clip), policy step on the latents from *before* the world-model
step with the *updated* Q weights and task embedding, running value-scale update, Polyak update of the
target Qs. The random draws (policy noise, Q-head choices) come from :func:`sample_draws` unless the caller
passes :class:`Draws` (e.g. recorded from the official code); the key then drives dropout only.

``config.train.task_emb_policy_grad`` chooses what the policy loss does to the task embedding: ``'release'``
(default) cuts it off; ``'head'`` (official HEAD) lets the policy gradient reach it, and since the official
policy optimiser neither owns nor clears that gradient it is carried in ``TrainingState.task_emb_grad`` and
added to the *next* world-model gradient (its norm, clip and Adam step).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.nn.world_model import WorldModel, init_params, make_world_model, renorm_rows
from mtdistill_jax.tdmpc2.losses import PI_KEY, WM_KEYS, Draws, Losses, make_losses, sample_draws
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
    task_emb_grad: jax.Array  # [num_tasks, task_dim] policy gradient left on the task embedding, added to the
    #                           next world-model gradient (task_emb_policy_grad='head'; stays zero in 'release')


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
                         step=jnp.zeros((), jnp.int32),
                         task_emb_grad=jnp.zeros_like(params["task_emb"]["embedding"]))


def renorm_used_embeddings(params: Params, task) -> Params:
    """Renormalise (max norm 1) the embedding rows of the tasks in ``task``, as torch does in place on lookup."""
    table = params["task_emb"]["embedding"]
    used = jnp.zeros((table.shape[0],), bool).at[task].set(True)
    table = jnp.where(used[:, None], renorm_rows(table), table)
    return {**params, "task_emb": {**params["task_emb"], "embedding": table}}


def make_update_fn(model: WorldModel, config: ml_collections.ConfigDict, losses: Losses | None = None, *,
                   return_intermediates: bool = False) -> Callable[..., tuple]:
    """The un-jitted update ``(state, batch, key, draws=None) -> (state, metrics)`` (jit it, or scan it).

    ``draws`` (:class:`Draws`) fixes the policy noise and Q-head choices; by default they are drawn from
    ``key`` with :func:`sample_draws`. With ``return_intermediates`` the update returns a third value, a dict
    of the step's intermediates (TD targets, latents, policy outputs, pre-clip gradients, ...).
    """
    losses = losses or make_losses(model, config)
    wm_opt, pi_opt = make_optimizers(config)
    tau = config.train.tau
    head = config.train.task_emb_policy_grad == "head"

    def update(state: TrainingState, batch: Batch, key, draws: Draws | None = None):
        k_draws, k_wm, k_pi = jax.random.split(key, 3)
        if draws is None:
            draws = sample_draws(k_draws, config, batch.task.shape[0], batch.obs.dtype)
        params = renorm_used_embeddings(state.params, batch.task)
        wm_params, _ = split_params(params)
        grad_fn = jax.grad(losses.world_model_loss, has_aux=True)
        wm_grads, (metrics, wm_aux) = grad_fn(wm_params, params, state.target_q_params, batch, draws, k_wm)
        if head:  # the policy gradient of the previous step joins this one (official HEAD)
            emb_grad = wm_grads["task_emb"]["embedding"] + state.task_emb_grad
            wm_grads = {**wm_grads, "task_emb": {**wm_grads["task_emb"], "embedding": emb_grad}}
        grad_norm = optax.tree_utils.tree_norm(wm_grads)
        updates, opt_state = wm_opt.update(wm_grads, state.opt_state, wm_params)
        # the policy's first lookup renormalises (in place, as torch does) the used rows the step pushed past norm 1
        params = renorm_used_embeddings({**params, **optax.apply_updates(wm_params, updates)}, batch.task)

        trainable = {PI_KEY: params[PI_KEY]}
        if head:
            trainable["task_emb"] = params["task_emb"]
        grads, (pi_metrics, scale, pi_aux) = jax.grad(losses.policy_loss, has_aux=True)(
            trainable, params, wm_aux["zs"], batch.task, state.scale, draws.pi_eps, draws.pi_heads, k_pi)
        pi_grads = grads[PI_KEY]
        task_emb_grad = grads["task_emb"]["embedding"] if head else state.task_emb_grad
        pi_grad_norm = optax.tree_utils.tree_norm(pi_grads)
        pi_updates, pi_opt_state = pi_opt.update(pi_grads, state.pi_opt_state, params[PI_KEY])
        params = {**params, PI_KEY: optax.apply_updates(params[PI_KEY], pi_updates)}

        target_q = jax.tree_util.tree_map(lambda t, o: t + tau * (o - t), state.target_q_params, params["Qs"])
        new_state = state.replace(params=params, target_q_params=target_q, opt_state=opt_state,
                                  pi_opt_state=pi_opt_state, scale=scale, step=state.step + 1,
                                  task_emb_grad=task_emb_grad)
        metrics = {**metrics, **pi_metrics, "train/grad_norm": grad_norm, "train/pi_grad_norm": pi_grad_norm}
        if not return_intermediates:
            return new_state, metrics
        inter = {**wm_aux, **pi_aux, "task_emb_at_td": renorm_used_embeddings(state.params, batch.task)[
            "task_emb"]["embedding"], "wm_grads": wm_grads, "pi_grads": pi_grads, "task_emb_grad": task_emb_grad}
        return new_state, metrics, inter

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
        donate_argnums = (0,) if donate else ()
        if mesh is None:
            self.update_jit = jax.jit(self._update, donate_argnums=donate_argnums)
            self._update_draws_jit = self.update_jit
        else:
            from mtdistill_jax.parallel import batch_sharding, replicated

            rep, bs = replicated(mesh), batch_sharding(mesh)
            self.update_jit = jax.jit(self._update, in_shardings=(rep, bs, rep), out_shardings=(rep, rep),
                                      donate_argnums=donate_argnums)
            self._update_draws_jit = jax.jit(self._update, in_shardings=(rep, bs, rep, rep),
                                             out_shardings=(rep, rep), donate_argnums=donate_argnums)

    def init(self, key=None, params: Params | None = None, target_q_params: Params | None = None) -> TrainingState:
        state = init_training_state(self.config, key, params, target_q_params)
        if self.mesh is not None:
            from mtdistill_jax.parallel import replicate

            state = replicate(state, self.mesh)
        return state

    def update(self, state: TrainingState, batch: Batch, key, draws: Draws | None = None,
               check_values: bool = True):
        """One update; ``draws`` (optional) fixes the policy noise and Q-head choices (else drawn from ``key``)."""
        validate_batch(batch, self.config, check_values)
        if self.mesh is not None:
            from mtdistill_jax.parallel import shard_batch

            batch = shard_batch(batch, self.mesh)
        if draws is None:
            return self.update_jit(state, batch, key)
        return self._update_draws_jit(state, batch, key, draws)
