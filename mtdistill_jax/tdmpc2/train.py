"""TD-MPC2 update step: ``TrainingState`` and ``update(state, batch, key, draws=None, aux=None) -> (state, metrics)``.

``make_update_fn(model, config, *, extra_wm_loss=None, extra_pi_loss=None)`` builds the pure update (jit it
with :func:`mtdistill_jax.parallel.compile_step`, or scan it); each objective runs the student forward once
(:class:`~mtdistill_jax.tdmpc2.losses.Rollout`, :class:`~mtdistill_jax.tdmpc2.losses.PolicyOutputs`) and
extra terms read those outputs, ``aux`` (e.g. frozen teacher params), ``state.step`` and a key.
:func:`gradient_update_fn` (loss + optimiser) serves the world-model and the policy step.

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
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.nn.layers import squared_norm
from mtdistill_jax.nn.world_model import WorldModel, init_params, make_world_model, renorm_rows
from mtdistill_jax.tdmpc2.losses import (
    PI_KEY,
    WM_KEYS,  # noqa: F401  (re-exported: the world-model networks)
    Draws,
    Losses,
    make_losses,
    running_scale_update,
    sample_draws,
)
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
    """(world-model optimiser's params, policy params): every top-level key but ``'pi_head'`` goes to the
    world-model optimiser: the :data:`WM_KEYS` networks plus any extra trainable sub-tree an extension keeps
    beside them (e.g. the distillation projection under ``params['distill']``)."""
    return {k: v for k, v in params.items() if k != PI_KEY}, params[PI_KEY]


def encoder_labels(params: Params) -> dict:
    """``'encoder'`` for every leaf under ``params['encoder']``, ``'rest'`` for the others: which leaves the
    world-model optimiser steps at ``lr * enc_lr_scale`` (``optax.multi_transform`` labels)."""
    return {k: jax.tree_util.tree_map(lambda _, k=k: "encoder" if k == "encoder" else "rest", v)
            for k, v in params.items()}


CLIP_EPS = 1e-6  # added to the norm in torch.nn.utils.clip_grad_norm_'s scale


def global_norm(tree) -> jax.Array:
    """The L2 norm over every leaf of ``tree`` (``optax.tree_utils.tree_norm``), each leaf's squared norm by
    :func:`mtdistill_jax.nn.layers.squared_norm` (on CPU a matrix product, no kernel per leaf shape)."""
    return jnp.sqrt(sum(squared_norm(x) for x in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Gradients scaled by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` their :func:`global_norm`: what the
    official code's ``torch.nn.utils.clip_grad_norm_`` does (``optax.clip_by_global_norm`` divides by the norm
    only above ``max_norm`` and has no 1e-6). A product with one scalar, which XLA fuses into Adam's moment
    updates; optax's division was its own kernel and pass over every gradient. Its state is optax's
    ``EmptyState``, as ``optax.clip_by_global_norm``'s: checkpoints are unchanged."""
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        factor = jnp.minimum(max_norm / (global_norm(updates) + CLIP_EPS), 1.0)
        return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizers(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """World-model Adam (encoder at ``lr * enc_lr_scale``) and policy Adam (eps 1e-5), each clipped."""
    tc = config.train

    wm = optax.chain(
        clip_by_global_norm(tc.grad_clip_norm),
        optax.multi_transform(
            {"encoder": optax.adam(tc.lr * tc.enc_lr_scale, eps=tc.adam_eps),
             "rest": optax.adam(tc.lr, eps=tc.adam_eps)},
            encoder_labels,
        ),
    )
    pi = optax.chain(clip_by_global_norm(tc.grad_clip_norm), optax.adam(tc.lr, eps=tc.pi_adam_eps))
    return wm, pi


def init_training_state(config: ml_collections.ConfigDict, key=None, params: Params | None = None,
                        target_q_params: Params | None = None) -> TrainingState:
    """Fresh training state (official init), or one around given params (e.g. an imported checkpoint)."""
    model = make_world_model(config.model)
    if params is None:
        if key is None:
            raise ValueError("init_training_state needs a PRNG key when no params are given")
        params = init_params(model, key)
    params = jax.tree_util.tree_map(jnp.array, dict(params))  # a copy: the update donates the state
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


@flax.struct.dataclass
class GradientStep:
    """What :func:`gradient_update_fn`'s step returns."""

    loss: jax.Array  # the objective's value
    aux: Any  # the objective's auxiliary output
    params: Params  # params after the optimiser step
    opt_state: optax.OptState  # optimiser state after the step
    grads: Params  # gradient the optimiser saw (after ``adjust_grads``, before clipping)
    grad_norm: jax.Array  # its global norm
    side_grads: Any  # gradient w.r.t. ``side`` (None without one)


def gradient_update_fn(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable[..., GradientStep]:
    """Loss + optimiser in one step, in the spirit of brax's ``gradient_update_fn``.

    ``loss_fn(params, side, *args) -> (loss, aux)``. The returned
    ``step(params, opt_state, *args, side=None, adjust_grads=None) -> GradientStep`` differentiates it with
    respect to ``params`` (optimised) and ``side`` (differentiated but not optimised: the gradient is handed
    back, e.g. the policy gradient on the task embedding in the official HEAD variant); ``adjust_grads(grads)``
    may change the gradient before the optimiser sees it (e.g. add a gradient carried from the last step).
    """
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def step(params, opt_state, *args, side=None, adjust_grads=None) -> GradientStep:
        (loss, aux), (grads, side_grads) = grad_fn(params, side, *args)
        if adjust_grads is not None:
            grads = adjust_grads(grads)
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return GradientStep(loss=loss, aux=aux, params=optax.apply_updates(params, updates), opt_state=opt_state,
                            grads=grads, grad_norm=grad_norm, side_grads=side_grads)

    return step


AuxForward = Callable[..., Any]  # (aux, batch) -> aux seen by the extra terms (e.g. a frozen teacher's outputs)
ExtraWMLoss = Callable[..., tuple]  # (rollout, batch, aux, step, key, params) -> (loss, metrics)
ExtraPiLoss = Callable[..., tuple]  # (rollout, pi_out, batch, aux, step, key) -> (loss, metrics)


def make_update_fn(model: WorldModel, config: ml_collections.ConfigDict, losses: Losses | None = None, *,
                   extra_wm_loss: ExtraWMLoss | None = None, extra_pi_loss: ExtraPiLoss | None = None,
                   aux_forward: AuxForward | None = None, return_intermediates: bool = False) -> Callable[..., tuple]:
    """The pure, un-jitted update ``(state, batch, key, draws=None, aux=None) -> (state, metrics)`` (jit or scan it).

    ``draws`` (:class:`Draws`) fixes the policy noise and Q-head choices; by default they are drawn from
    ``key`` with :func:`sample_draws`. ``aux`` is any pytree handed to the extra terms as a traced argument
    (e.g. frozen teacher params); it is never captured as a constant.

    Extension points (each optional, each inside the gradient of its objective, so it is clipped and stepped
    by the same optimiser):

    - ``extra_wm_loss(rollout, batch, aux, step, key, params) -> (loss, metrics)`` is added to the world-model
      objective; ``rollout`` is the student's :class:`Rollout` of this step (differentiable),
      ``step = state.step`` (int32, for schedules), ``key`` its own PRNG key and ``params`` the params the
      world-model optimiser differentiates (e.g. an extension's own sub-tree, ``params['distill']``).
    - ``extra_pi_loss(rollout, pi_out, batch, aux, step, key) -> (loss, metrics)`` is added to the policy
      objective; ``pi_out`` (:class:`PolicyOutputs`) is differentiable, ``rollout`` the world-model rollout
      of this step (before the world-model step, frozen).

    - ``aux_forward(aux, batch) -> aux`` runs once per update, before both objectives and outside their
      gradients (e.g. a frozen teacher's forward pass on the batch); the extra terms see its result.

    Their metrics are merged into the update's (name them, e.g. ``distill/...``), plus ``train/wm_objective``
    (and ``train/pi_objective`` with a policy term): the objective each optimiser saw, extra terms included.
    Without extra terms the keys are split as before (``draws``, world model, policy) and the update is the
    official one. Extra trainable params (beside the world model in ``state.params``, e.g. ``'distill'``) are
    stepped by the world-model optimiser.

    With ``return_intermediates`` the update returns a third value, a dict of the step's intermediates (TD
    targets, latents, policy outputs, pre-clip gradients, ...).
    """
    losses = losses or make_losses(model, config)
    wm_opt, pi_opt = make_optimizers(config)
    tau = config.train.tau
    head = config.train.task_emb_policy_grad == "head"

    def wm_objective(wm_params, _side, params, target_q, batch, draws, key, aux, step, k_extra):
        full = {**params, **wm_params}
        ro = losses.rollout(full, batch, key)
        td, td_aux = losses.td_target(full, target_q, ro.next_z, batch.reward, batch.task, draws.td_eps,
                                      draws.td_heads)
        loss, metrics = losses.world_model_loss(ro, batch, td)
        if extra_wm_loss is not None:
            extra, extra_metrics = extra_wm_loss(ro, batch, aux, step, k_extra, full)
            loss = loss + extra
            metrics = {**metrics, **extra_metrics, "train/wm_objective": loss}
        return loss, (metrics, ro, {"td_targets": td, **td_aux})

    def pi_objective(pi_params, side, params, ro, batch, draws, scale, key, aux, step, k_extra):
        trainable = {PI_KEY: pi_params, **(side or {})}
        pi = losses.policy_rollout(trainable, params, ro.zs, batch.task, draws.pi_eps, draws.pi_heads, key)
        new_scale = running_scale_update(scale, jax.lax.stop_gradient(pi.q[0]), tau)  # official: before use
        loss, metrics = losses.policy_loss(pi, new_scale)
        if extra_pi_loss is not None:
            extra, extra_metrics = extra_pi_loss(ro, pi, batch, aux, step, k_extra)
            loss = loss + extra
            metrics = {**metrics, **extra_metrics, "train/pi_objective": loss}
        return loss, (metrics, new_scale, pi)

    wm_step = gradient_update_fn(wm_objective, wm_opt)
    pi_step = gradient_update_fn(pi_objective, pi_opt)

    def add_leaked_task_emb_grad(grads, leaked):
        """The policy gradient of the previous step joins this one (official HEAD)."""
        emb = grads["task_emb"]["embedding"] + leaked
        return {**grads, "task_emb": {**grads["task_emb"], "embedding": emb}}

    def update(state: TrainingState, batch: Batch, key, draws: Draws | None = None, aux=None):
        k_draws, k_wm, k_pi = jax.random.split(key, 3)
        k_wm_extra = k_pi_extra = None
        if extra_wm_loss is not None or extra_pi_loss is not None:
            k_wm_extra, k_pi_extra = jax.random.split(jax.random.fold_in(key, 3))
        if draws is None:
            draws = sample_draws(k_draws, config, batch.task.shape[0], batch.obs.dtype)
        if aux_forward is not None:
            aux = jax.lax.stop_gradient(aux_forward(aux, batch))
        params = renorm_used_embeddings(state.params, batch.task)
        wm_params, _ = split_params(params)
        adjust = (lambda g: add_leaked_task_emb_grad(g, state.task_emb_grad)) if head else None
        wm = wm_step(wm_params, state.opt_state, params, state.target_q_params, batch, draws, k_wm, aux,
                     state.step, k_wm_extra, adjust_grads=adjust)
        metrics, ro, td_aux = wm.aux
        # the policy's first lookup renormalises (in place, as torch does) the used rows the step pushed past norm 1
        params = renorm_used_embeddings({**params, **wm.params}, batch.task)

        side = {"task_emb": params["task_emb"]} if head else None
        pi = pi_step(params[PI_KEY], state.pi_opt_state, params, ro, batch, draws, state.scale, k_pi, aux,
                     state.step, k_pi_extra, side=side)
        pi_metrics, scale, pi_out = pi.aux
        task_emb_grad = pi.side_grads["task_emb"]["embedding"] if head else state.task_emb_grad
        params = {**params, PI_KEY: pi.params}

        target_q = jax.tree_util.tree_map(lambda t, o: t + tau * (o - t), state.target_q_params, params["Qs"])
        new_state = state.replace(params=params, target_q_params=target_q, opt_state=wm.opt_state,
                                  pi_opt_state=pi.opt_state, scale=scale, step=state.step + 1,
                                  task_emb_grad=task_emb_grad)
        metrics = {**metrics, **pi_metrics, "train/grad_norm": wm.grad_norm, "train/pi_grad_norm": pi.grad_norm}
        if not return_intermediates:
            return new_state, metrics
        inter = {"zs": ro.zs, "next_z": ro.next_z, **td_aux, "pi_action": pi_out.action, "pi_mean": pi_out.mean,
                 "pi_log_std": pi_out.log_std, "pi_scaled_entropy_all": pi_out.scaled_entropy, "pi_q": pi_out.q,
                 "task_emb_at_td": renorm_used_embeddings(state.params, batch.task)["task_emb"]["embedding"],
                 "wm_grads": wm.grads, "pi_grads": pi.grads, "task_emb_grad": task_emb_grad,
                 "rollout": ro, "pi_out": pi_out, "aux": aux}
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
    ``update_fn`` replaces the default step (``make_update_fn(model, config)``) by any step with the signature
    ``(state, batch, key, draws=None, aux=None, ...) -> (state, metrics)``, e.g. one with extra loss terms;
    the Learner only validates the batch and compiles it (:func:`mtdistill_jax.parallel.compile_step`).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh=None, donate: bool = True, *,
                 update_fn: Callable | None = None):
        from mtdistill_jax.parallel import batch_specs, compile_step

        self.config = config
        self.model = make_world_model(config.model)
        self.losses = make_losses(self.model, config)
        self._update = update_fn or make_update_fn(self.model, config, self.losses)
        self.mesh = mesh
        # state, batch, key replicated / sharded over the batch / replicated; later arguments replicated
        self.update_jit = compile_step(self._update, mesh, in_specs=(None, batch_specs()),
                                       donate_argnums=(0,) if donate else ())

    def init(self, key=None, params: Params | None = None, target_q_params: Params | None = None) -> TrainingState:
        state = init_training_state(self.config, key, params, target_q_params)
        if self.mesh is not None:
            from mtdistill_jax.parallel import replicate

            state = replicate(state, self.mesh)
        return state

    def update(self, state: TrainingState, batch: Batch, key, draws: Draws | None = None, aux=None, *,
               check_values: bool = True):
        """One update after :func:`validate_batch`: ``draws`` (optional) fixes the policy noise and Q-head
        choices (else drawn from ``key``), ``aux`` (optional) reaches the step's extra loss terms."""
        validate_batch(batch, self.config, check_values)
        if self.mesh is not None:
            from mtdistill_jax.parallel import shard_batch

            batch = shard_batch(batch, self.mesh)
        args = (draws, aux)
        while args and args[-1] is None:  # the call update_jit(state, batch, key) compiles for the default
            args = args[:-1]
        return self.update_jit(state, batch, key, *args)
