"""The TD-MPC2 implicit world model (official ``common/world_model.py``) as a Flax linen module.

Shapes (B batch, T optional leading time axis, A = padded action dim, D = latent_dim, K = num_bins):
- ``task``: int ``[B]`` task ids; embeddings broadcast over a leading T axis of the other input.
- ``encode(obs [.., B, obs_pad], task) -> z [.., B, D]``
- ``next(z, a [.., B, A], task) -> z'``; ``reward(z, a, task) -> logits [.., B, K]``
- ``Q(z, a, task, deterministic, heads) -> logits [num_q, .., B, K]`` (every head, or only ``heads``; reduce two
  heads with :func:`q_value` / :func:`q_reduce`)
- ``pi(z, task, eps [.., B, A]) -> (action, info)`` with the official masked, squashed Gaussian.

Input concatenation orders are the official ones: encoder ``[obs, emb]``; dynamics, reward and Q
``[z, emb, a]``; policy ``[z, emb]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax import math as tdmath
from mtdistill_jax.configs.model_sizes import check_model_config
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.layers import MLP, EnsembleMLP

MAX_NORM = 1.0  # nn.Embedding(max_norm=1) of the official task embedding


def action_masks(task_set: str) -> np.ndarray:
    """``[num_tasks, action_pad]`` float32 masks: 1 on a task's real action dims, 0 on padding."""
    ts = get_task_set(task_set)
    m = np.zeros((ts.num_tasks, ts.action_pad), np.float32)
    for i, a in enumerate(ts.action_dims):
        m[i, :a] = 1.0
    return m


def renorm_rows(table, max_norm: float = MAX_NORM):
    """Rows with L2 norm above ``max_norm`` scaled by ``max_norm / (norm + 1e-7)`` (torch's embedding_renorm_)."""
    norm = jnp.linalg.norm(table, axis=-1, keepdims=True)
    return jnp.where(norm > max_norm, table * (max_norm / (norm + 1e-7)), table)


def _uniform_init(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


class TaskEmbedding(nn.Module):
    """Learnable task embedding; lookups return rows renormalised to max norm 1.

    Torch renormalises the looked-up rows *in place* and then uses them as the weights; here the lookup
    returns the renormalised value with a straight-through gradient (d out / d weight = identity), and
    :func:`mtdistill_jax.tdmpc2.train.update` keeps the stored table renormalised, which together reproduce
    the official behaviour.
    """

    num_tasks: int
    features: int

    @nn.compact
    def __call__(self, task):
        table = self.param("embedding", _uniform_init(-0.02, 0.02), (self.num_tasks, self.features))
        rows = jnp.take(table, task, axis=0)
        return rows + jax.lax.stop_gradient(renorm_rows(rows) - rows)


class WorldModel(nn.Module):
    """TD-MPC2 world model: encoder, latent dynamics, reward, policy prior, Q-ensemble, task embedding."""

    config: ml_collections.ConfigDict

    def setup(self):
        c = self.config
        check_model_config(c)
        ts = get_task_set(c.task_set)
        self.obs_dim = ts.obs_pad
        self.action_dim = ts.action_pad
        self.masks = jnp.asarray(action_masks(c.task_set))
        mlp2 = (c.mlp_dim, c.mlp_dim)
        self.task_emb = TaskEmbedding(ts.num_tasks, c.task_dim)
        self.encoder = MLP((c.enc_dim,) * max(c.num_enc_layers - 1, 1), c.latent_dim, out_act="simnorm",
                           simnorm_dim=c.simnorm_dim)
        self.dynamics = MLP(mlp2, c.latent_dim, out_act="simnorm", simnorm_dim=c.simnorm_dim)
        self.reward_head = MLP(mlp2, c.num_bins, zero_init_out=True)
        self.pi_head = MLP(mlp2, 2 * self.action_dim)
        self.Qs = EnsembleMLP(c.num_q, mlp2, c.num_bins, dropout=c.dropout, zero_init_out=True)

    def _with_emb(self, x, task):
        emb = self.task_emb(task)
        if x.ndim == emb.ndim + 1:  # leading time axis: broadcast the per-sample embedding over T
            emb = jnp.broadcast_to(emb, x.shape[:1] + emb.shape)
        return jnp.concatenate([x, emb.astype(x.dtype)], axis=-1)

    def embedding(self, task):
        """Task-embedding rows as the model sees them (renormalised), ``[B, task_dim]``."""
        return self.task_emb(task)

    def encode(self, obs, task):
        """Latent state of an observation, ``[.., B, latent_dim]``."""
        return self.encoder(self._with_emb(obs, task))

    def next(self, z, a, task):
        """Predicted next latent state."""
        return self.dynamics(jnp.concatenate([self._with_emb(z, task), a], axis=-1))

    def reward(self, z, a, task):
        """Reward logits over the two-hot bins."""
        return self.reward_head(jnp.concatenate([self._with_emb(z, task), a], axis=-1))

    def Q(self, z, a, task, deterministic: bool = True, heads=None):
        """Logits of every Q head, ``[num_q, .., B, num_bins]``, or of the heads ``heads`` only (``[len(heads),
        ..]``: the same values as those rows of the full output, without computing the others); dropout on the
        first layer when training."""
        return self.Qs(jnp.concatenate([self._with_emb(z, task), a], axis=-1), deterministic, heads)

    def pi(self, z, task, eps):
        """Official policy prior with given standard-normal noise ``eps`` (same shape as the action).

        Returns ``(action, info)``; ``info`` holds ``mean`` (tanh of the masked mean), ``mean_presquash`` (the
        masked mean before tanh), ``log_std`` (masked), ``log_prob`` (squashed, unscaled), ``log_prob_presquash``,
        ``entropy`` (= -log_prob),
        ``scaled_entropy`` (official: -log_prob * (action_dims * log_prob_presquash / (log_prob + 1e-8)), whose
        value is ~ -action_dims * log_prob_presquash; the gradient flows through this exact expression) and
        ``action_dims``.
        """
        c = self.config
        out = self.pi_head(self._with_emb(z, task))
        mean, raw_log_std = jnp.split(out, 2, axis=-1)
        log_std = tdmath.log_std(raw_log_std, c.log_std_min, c.log_std_max)
        mask = self.masks[task]
        if mean.ndim == mask.ndim + 1:
            mask = jnp.broadcast_to(mask, mean.shape[:1] + mask.shape)
        mean, log_std, eps = mean * mask, log_std * mask, eps * mask
        action_dims = jnp.sum(mask, axis=-1, keepdims=True)
        log_prob = tdmath.gaussian_logprob(eps, log_std)
        action = mean + eps * jnp.exp(log_std)
        mean_sq, action, log_prob_sq = tdmath.squash(mean, action, log_prob)
        info = {
            "mean": mean_sq,
            "mean_presquash": mean,
            "log_std": log_std,
            "log_prob_presquash": log_prob,
            "log_prob": log_prob_sq,
            "entropy": -log_prob_sq,
            "scaled_entropy": -log_prob_sq * (log_prob * action_dims / (log_prob_sq + 1e-8)),
            "action_dims": action_dims,
        }
        return action, info

    def __call__(self, obs, action, task, deterministic: bool = True):
        """Touch every sub-network once (used by ``init``): returns (z, next_z, reward, Q, pi action)."""
        z = self.encode(obs, task)
        nz = self.next(z, action, task)
        r = self.reward(z, action, task)
        q = self.Q(z, action, task, deterministic)
        a, _ = self.pi(z, task, jnp.zeros_like(action))
        return z, nz, r, q, a


def make_world_model(config: ml_collections.ConfigDict) -> WorldModel:
    """Build the world model for a model config (see :func:`mtdistill_jax.configs.get_model_config`)."""
    check_model_config(config)
    return WorldModel(config)


def init_params(model: WorldModel, key) -> dict:
    """Initial parameters (plain nested dict) with the official initialisation.

    Linear weights ~ N(0, 0.02^2), biases 0, LayerNorm 1/0, embedding ~ U(-0.02, 0.02), last layers of the
    reward and Q heads zero.
    """
    ts = get_task_set(model.config.task_set)
    obs = jnp.zeros((1, ts.obs_pad), jnp.float32)
    act = jnp.zeros((1, ts.action_pad), jnp.float32)
    task = jnp.zeros((1,), jnp.int32)
    return model.init({"params": key}, obs, act, task)["params"]


def abstract_params(model: WorldModel) -> dict:
    """Parameter shapes/dtypes via ``jax.eval_shape`` (no allocation, fine for the 317M model)."""
    return jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def two_heads(key, num_q: int) -> jax.Array:
    """Two distinct Q heads ``[2]`` (int32), uniform over the ``num_q * (num_q - 1)`` ordered pairs: the
    distribution of the official ``randperm(num_q)[:2]``, from one ``randint`` instead of
    ``jax.random.permutation``'s shuffle (a threefry draw, a split and a sort per round: 15 more XLA:CPU kernels
    in the 5M update, whose two head draws share this one's)."""
    if num_q < 2:
        raise ValueError(f"two_heads: needs at least 2 Q heads, got num_q={num_q}")
    pair = jax.random.randint(key, (), 0, num_q * (num_q - 1))
    first, other = pair // (num_q - 1), pair % (num_q - 1)
    return jnp.stack([first, other + (other >= first)]).astype(jnp.int32)


def q_value(logits, key, config, reduce: str = "min", heads=None):
    """Scalar Q from ensemble logits ``[num_q, .., K]``: min or mean of 2 heads (official ``Q(return_type=...)``).

    The official code draws the 2 heads with ``randperm(num_q)[:2]``; pass ``heads`` to fix them.
    """
    if heads is None:
        heads = two_heads(key, logits.shape[0])
    return q_reduce(logits[heads], config, reduce)


def heads_to_evaluate(heads, num_q: int):
    """What to pass as ``Q(..., heads=...)`` when :func:`q_reduce` then takes the min or mean of those 2 heads:
    ``heads``, or ``None`` (every head, in stored order) when ``num_q == 2``.

    With 2 heads the draw ``randperm(2)[:2]`` only orders both members, and the min and the mean of two values
    do not depend on the order (bit for bit), so the stored order gives the same values without gathering the
    members' parameters: fewer kernels to compile (the 1M update's 491 to 464 on XLA:CPU); its step time did not
    measurably change.
    In train mode each dropout mask then falls on the member in its slot rather than on the drawn one.
    """
    return None if num_q == 2 else heads


def q_reduce(logits, config, reduce: str = "min"):
    """Min or mean of the 2 Q heads whose logits ``[2, .., K]`` are given (e.g. ``Q(..., heads=heads)``)."""
    if logits.shape[0] != 2:
        raise ValueError(f"q_reduce takes the logits of 2 heads, got {logits.shape[0]}")
    q = tdmath.two_hot_inv(logits, config.num_bins, config.vmin, config.vmax)
    if reduce == "min":
        return jnp.min(q, axis=0)
    if reduce == "avg":
        return jnp.sum(q, axis=0) / 2
    raise ValueError(f"reduce must be 'min' or 'avg', got {reduce!r}")


def world_model_keys(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level keys of the WorldModel params tree of ``model_config`` (encoder, dynamics, ..., task_emb)."""
    return tuple(abstract_params(make_world_model(model_config)))


def world_model_params(params: dict, model_config: ml_collections.ConfigDict,
                       keys: Sequence[str] | None = None) -> dict:
    """The WorldModel part of a learner's params: every key of the WorldModel tree, nothing else (e.g. a
    distillation state's ``params['distill']`` is left out). A missing key raises a ``UserError``."""
    keys = world_model_keys(model_config) if keys is None else keys
    missing = [k for k in keys if k not in params]
    if missing:
        raise UserError(f"the learner's params lack the world-model modules {missing} (have {sorted(params)})")
    return {k: params[k] for k in keys}
