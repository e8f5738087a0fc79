"""Side by side with the official PyTorch TD-MPC2: the same weights and batches, checked equal, then timed.

    python benchmarks/compare_official.py --tdmpc2_repo=PATH [--quick] [--threads=1,2] [--sizes=1,5]
        [--repeats=20] [--out=benchmarks/results/compare_official_cpu.md]

``--tdmpc2_repo`` is a checkout of github.com/nicklashansen/tdmpc2 that you provide (tested at e9f5932). Nothing
of it is part of this project: its files are read at run time, and three literal ``'cuda:0'`` device strings
(``tdmpc2.py``, ``common/scale.py``) are replaced by ``'cpu'`` before they are executed; torch's Adam is told
that CPU tensors may be ``capturable`` (the official optimisers ask for it). It needs torch and tensordict
(``pip install -e '.[official]'``); hydra/omegaconf are not needed (the official config is built from its
``config.yaml`` the way its ``parse_cfg`` does for MT30).

Each thread setting (``--threads``: 1 = one core for both frameworks, by CPU affinity, ``torch.set_num_threads(1)``
and XLA's Eigen pool off; 2 = two cores) runs in its own process:

1. **Equality first** (dropout off, the same weights: our initialisation with N(0, 0.02^2) noise on every leaf and
   the target Qs' own noise, loaded into the official agent through our ``.pt`` exporter's state dict): for
   model size 1, the official ``_td_target`` and one official ``_update`` (its four random draws replayed from
   torch's generator and given to our update as :class:`~mtdistill_jax.tdmpc2.losses.Draws`) against ours:
   TD targets, the losses and grad norms, and every parameter after the step; and the planner's trajectory
   values (official ``_estimate_value`` vs our :func:`~mtdistill_jax.tdmpc2.planner.make_value_estimator`) for
   the same 512 action samples and noise, with the same top-64 elites; and one distillation step per teacher
   size (``--teachers``: ours fused vs the two-pass PyTorch version below). A difference past float32 round-off
   stops the run (exit 1) before anything is timed.
2. **Timing rows**, medians and p10-p90 of ``--repeats`` calls after warm-up, the two sides interleaved twice
   (official half, ours half, official half, ours half); the first call (ours: compile) apart:
   update step (MT30, batch 256, horizon 3, sizes ``--sizes``, dropout 0.01 as official; both sides move their
   parameters every call, ours donating and threading its state as training does); planning for one env
   (official ``act``: 6 MPPI iterations of 512 samples); planning for 30 envs (official: 30 ``act`` calls in a
   loop, each env's warm-start mean swapped in; ours: one batched call); a distillation step, teacher
   ``--teachers`` (5M) + student 1M (ours: one fused program; PyTorch: the teacher's reward prediction under
   ``no_grad``, then the student's reward-MSE term backpropagated before the unchanged official ``_update``, as
   td-mpc-opt adds it); planning for one env in bf16 (``--bf16``, on by default: official under
   ``torch.autocast('cpu', bfloat16)``, ours with ``planner.compute_dtype = 'bfloat16'`` and XLA:CPU's YNNPACK
   single-dot path, the one that reaches AMX-BF16); with ``--torch_compile``, the official update (1M) and act
   (1 env) under ``torch.compile`` (inductor, default mode, its pattern matcher off: with it on, torch 2.13's
   CPU inductor fails on the official update), ours as always; evaluation throughput (``--eval_steps``, default 10, 0
   skips it): every call resets the 30 MT30 tasks' envs (one episode each) and runs that many agent steps,
   official: its evaluation loop in dm_control (the checkout's ``envs``, needs gymnasium), task after task;
   ours: the batched MJX + planner evaluation program, in a process of its own (XLA:CPU's fewer-kernel
   emitters, as ``launch/evaluate.py`` compiles it); its first call is its warm-up (no separate one),
   ``--eval_repeats`` (2) timed calls. Float32 matmul throughput of both
   frameworks is measured in the same process, and each row's share of it is given from the FLOPs XLA counts
   for our program (the same arithmetic on both sides).

``--device=gpu`` runs one setting with both sides on the GPU: the official code unpatched on ``cuda:0`` (its
``torch.compile`` rows in its own ``reduce-overhead`` mode), ours on jax's GPU backend; the equality checks with
float32 matmuls at full precision on both sides, the peaks and timed rows as each side ships on a GPU (TF32: the
official train.py's ``set_float32_matmul_precision('high')``, JAX's default); the checks' random draws taken on the
device as the official code takes them; planning rows for ``--act_envs`` (default 1,30,300); with ``--teacher_bf16``
the distillation rows' teacher forward in bf16 (official: autocast; ours: stored and computed in bf16), their
'% peak' against the bf16 matmul throughput measured in the same process; ``--eval_episodes`` episodes per task in
the evaluation row (e.g. 10: 300 envs). ``benchmarks/gpu/run.sh`` runs it (parts ``compare``, ``compare_eval``).

The markdown table (speed-up = official ms / ours ms, > 1 means ours is faster) goes to ``--out`` with the command,
the CPU model, core count and versions. ``--quick`` (2 threads, repeats 6, 3 for the 30-env rows) finishes in a few
minutes on a 2-core CPU. ``--parts=eval`` runs the evaluation row alone (after the planner-value check), e.g. to add
a thread setting's row to an earlier table; ``--parts=main`` everything but it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTED_COMMIT = "e9f5932"
BATCH = 256  # batch size of the update, planning and distillation rows (the official default)
TORCH_DEVICES = {"cpu": "cpu", "gpu": "cuda"}  # --device -> the official side's torch device
OFFICIAL_MATMUL_PRECISION = "high"  # the official train.py's torch.set_float32_matmul_precision (TF32 on GPUs)
PATCHES = {  # file -> (old, new, expected count): the official code's hard-coded CUDA device
    "common/scale.py": [("torch.device('cuda:0')", "torch.device('cpu')", 2)],
    "tdmpc2.py": [("torch.device('cuda:0')", "torch.device('cpu')", 1), ("device='cuda:0'", "device='cpu'", 1)],
}
NEEDS = ("tdmpc2/tdmpc2.py", "tdmpc2/common/world_model.py", "tdmpc2/common/scale.py", "tdmpc2/config.yaml")
PLAN_SAMPLES_CHECKED = 512
VALUE_ATOL = 1e-5  # planner values: absolute (values near 0 make relative errors meaningless)
TD_ATOL = 1e-5
SCALAR_RTOL = 1e-4  # losses and grad norms after one update (as the update-parity tests)
PARAM_ATOL = 3e-5  # params after one Adam step, where |grad| >= GRAD_FLOOR (as the update-parity tests)
GRAD_FLOOR = 1e-6  # 100 x Adam's eps: below it the first step's size is round-off-sensitive (bounded by 2 lr)


class MismatchError(RuntimeError):
    """The two implementations disagree on the same input: nothing is timed."""


def check_repo(path: str | None) -> Path:
    """The official checkout's root, or SystemExit with what is missing."""
    if not path:
        raise SystemExit("compare_official: --tdmpc2_repo=PATH is required: a checkout of "
                         f"https://github.com/nicklashansen/tdmpc2 (tested at {TESTED_COMMIT}), e.g. "
                         "git clone https://github.com/nicklashansen/tdmpc2 /tmp/tdmpc2 && "
                         "python benchmarks/compare_official.py --tdmpc2_repo=/tmp/tdmpc2")
    root = Path(path).expanduser().resolve()
    missing = [f for f in NEEDS if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"compare_official: {root} is not a TD-MPC2 checkout: missing {', '.join(missing)}")
    return root


# ---------------------------------------------------------------------------------------------------- official


class Official:
    """The official agent's modules from a checkout, on ``device`` ("cpu": its CUDA device strings patched, see the
    module doc; "cuda": as it ships)."""

    def __init__(self, root: Path, device: str = "cpu"):
        try:
            import tensordict  # noqa: F401
            import torch
            import yaml  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"compare_official: the official code needs {e.name}: pip install -e '.[official]'") from e
        import torch.optim.adam as adam

        self.root, self.torch = root / "tdmpc2", torch
        if device not in TORCH_DEVICES.values():
            raise ValueError(f"device must be one of {sorted(TORCH_DEVICES.values())}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"compare_official: --device=gpu, but torch {torch.__version__} sees no CUDA device")
        self.device = torch.device(device)
        if "common" in sys.modules and not str(getattr(sys.modules["common"], "__file__", "")).startswith(
                str(self.root)):
            raise SystemExit("compare_official: a module named 'common' other than the official one is imported")
        sys.path.insert(0, str(self.root))
        import common  # the official package (MODEL_SIZE, TASK_SET)

        supported = adam._get_capturable_supported_devices
        if device == "cpu" and "cpu" not in supported():
            adam._get_capturable_supported_devices = lambda supports_xla=True: [*supported(supports_xla), "cpu"]
        common.scale = self._exec_patched("common.scale", "common/scale.py")
        self.common = common
        self.TDMPC2 = self._exec_patched("tdmpc2_official", "tdmpc2.py").TDMPC2
        from common import math as off_math
        from common.world_model import WorldModel

        self.math, self.WorldModel = off_math, WorldModel

    def _exec_patched(self, name: str, rel: str) -> types.ModuleType:
        path = self.root / rel
        src = path.read_text()
        for old, new, count in PATCHES[rel] if self.device.type == "cpu" else ():
            if src.count(old) != count:
                raise SystemExit(f"compare_official: expected {count} x {old!r} in {path}, found {src.count(old)}; "
                                 f"this checkout differs from the tested commit {TESTED_COMMIT}")
            src = src.replace(old, new)
        mod = types.ModuleType(name)
        mod.__file__ = str(path)
        sys.modules[name] = mod
        exec(compile(src, str(path), "exec"), mod.__dict__)  # noqa: S102 - the user's checkout, as its train.py runs
        return mod

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA runs asynchronously; on CPU a call has finished when it returns)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def autocast(self, bf16: bool):
        """``torch.autocast`` to bfloat16 on this device, or a context that changes nothing."""
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16) if bf16 else contextlib.nullcontext()

    def cfg(self, size: int, *, batch_size: int = BATCH, horizon: int = 3, dropout: float | None = None):
        """The official config for MT30 at ``size``: ``config.yaml``, the model-size preset and what ``parse_cfg``
        and ``make_env`` derive (task_dim 96 for sizes 1 and 317, else 64; obs padded to 24, actions to 6)."""
        import dataclasses

        import yaml

        from mtdistill_jax.configs.tasks import get_task_set

        d = yaml.safe_load((self.root / "config.yaml").read_text())
        d.pop("defaults", None)
        for k, v in d.items():  # YAML 1.1 reads 3e-4 as a string; OmegaConf (official) as a float
            if isinstance(v, str):
                with contextlib.suppress(ValueError):
                    d[k] = float(v)
        d.update(task="mt30", model_size=size, compile=False, batch_size=batch_size, horizon=horizon,
                 multitask=True, **self.common.MODEL_SIZE[size])
        d["task_dim"] = 96 if size in (1, 317) else 64
        if size == 19:  # the released MT30 19M checkpoints have latent 512, not the preset's 768; ours follows them
            d["latent_dim"] = 512
        d["tasks"] = list(self.common.TASK_SET["mt30"])
        d["bin_size"] = (d["vmax"] - d["vmin"]) / (d["num_bins"] - 1)
        ts = get_task_set("mt30")
        if list(ts.tasks) != d["tasks"]:
            raise SystemExit("compare_official: the checkout's MT30 task order differs from ours")
        d.update(obs_shape={"state": (ts.obs_pad,)}, action_dim=ts.action_pad, action_dims=list(ts.action_dims),
                 episode_lengths=list(ts.episode_lengths), episode_length=max(ts.episode_lengths),
                 obs_shapes=list(ts.obs_dims), task_title="MT30")
        if dropout is not None:
            d["dropout"] = dropout
        cls = dataclasses.make_dataclass("OfficialConfig", [(k, object, dataclasses.field(default=None)) for k in d])
        cls.get = lambda self, k, default=None: getattr(self, k, default)
        return cls(**d)

    def agent(self, size: int, config, params, target_q_params, **cfg_kw):
        """A fresh official agent of model ``size`` with our weights (``params`` and ``target_q_params`` of our
        ``config``, through ``params_to_state_dict`` into the official ``load``); ``cfg_kw`` go to :meth:`cfg`."""
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints the 30 discounts
            agent = self.TDMPC2(self.cfg(size, **cfg_kw))
        agent.load({"model": self.state_dict(config.model, params, target_q_params)})
        return agent

    def state_dict(self, model_config, params, target_q_params) -> dict:
        """Our weights as the official ``WorldModel.state_dict()`` (torch tensors), through our exporter's layout."""
        import numpy as np

        from mtdistill_jax.checkpoint.tdmpc2_torch import params_to_state_dict

        torch = self.torch
        return {k: None if v is None else torch.Size(v) if isinstance(v, tuple) else torch.from_numpy(np.array(v))
                for k, v in params_to_state_dict(model_config, params, target_q_params).items()}


@functools.cache
def load_official(path: str, device: str = "cpu") -> Official:
    """The official modules of the checkout at ``path`` on ``device`` (loaded once per process)."""
    return Official(check_repo(path), device)


# ---------------------------------------------------------------------------------------------------- ours


def our_config(size: int, batch_size: int, dropout: float | None = None, distill: bool = False):
    """Our training config (``distill``: the distillation config, the paper's reward term) for MT30 at ``size``,
    with the official HEAD code's task-embedding gradient."""
    from mtdistill_jax.configs import get_config
    from mtdistill_jax.configs.distill import get_config as get_distill_config

    config = (get_distill_config if distill else get_config)(size, "mt30")
    if distill:
        d = config.distill
        if (d.reward_loss, d.steps, d.q_weight, d.policy_weight, d.latent_weight, d.schedule) != (
                "mse", "first", 0.0, 0.0, 0.0, "constant"):
            raise ValueError("the PyTorch two-pass side implements the paper's term only: reward MSE at step 0")
    config.train.batch_size = batch_size
    config.train.task_emb_policy_grad = "head"  # the official HEAD code's task-embedding gradient
    if dropout is not None:
        config.model.dropout = dropout
    return config


def same_weights(model_config, seed: int = 0):
    """Our initialisation of a model (``model_config``) with N(0, 0.02^2) on every leaf (reward/Q output layers start
    at zero, which would make values and TD targets trivial) and independent noise on the target Qs."""
    import jax

    from mtdistill_jax.nn import init_params, make_world_model

    def perturb(tree, key):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        noisy = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        return treedef.unflatten(noisy)

    params = perturb(init_params(make_world_model(model_config), jax.random.key(seed)), jax.random.key(seed + 1))
    return params, perturb(params["Qs"], jax.random.key(seed + 2))


def random_batch(rng, B: int, H: int):
    from benchmarks.update_step import random_batch as batch_of

    return batch_of(rng, B, H)


def torch_batch(torch, batch, device="cpu"):
    import numpy as np

    return tuple(t.to(device) for t in (
        torch.from_numpy(np.asarray(batch.obs)), torch.from_numpy(np.asarray(batch.action)),
        torch.from_numpy(np.asarray(batch.reward)), torch.zeros(np.asarray(batch.reward).shape),
        torch.from_numpy(np.asarray(batch.task, np.int64))))


# ---------------------------------------------------------------------------------------------------- equality


def _max_abs(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_update(off: Official, size: int = 1, batch_size: int = 16, seed: int = 7001,
                 teacher_size: int | None = None) -> dict:
    """One update from the same weights and batch, dropout off, the official random draws given to ours: TD
    targets, losses, grad norms and every parameter after the step. With ``teacher_size`` it is a distillation
    step (ours fused; official: the two-pass version of :func:`time_distill`, checked by its reward-MSE term too).
    Returns the measured differences; raises :class:`MismatchError` past the tolerances."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtdistill_jax.checkpoint.tdmpc2_torch import state_dict_to_params
    from mtdistill_jax.nn import make_world_model
    from mtdistill_jax.tdmpc2.losses import PI_KEY, Draws
    from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn

    torch = off.torch
    config = our_config(size, batch_size, dropout=0.0, distill=teacher_size is not None)
    params, target = same_weights(config.model)
    agent = off.agent(size, config, params, target, batch_size=batch_size, dropout=0.0)
    H, B, A, nq = config.train.horizon, batch_size, agent.cfg.action_dim, config.model.num_q
    batch = random_batch(np.random.default_rng(seed), B, H)
    dev = off.device
    obs, action, reward, terminated, task = torch_batch(torch, batch, dev)
    with torch.no_grad():  # TD targets first: the update moves the params
        next_z = agent.model.encode(obs[1:], task)
        torch.manual_seed(seed)
        td_official = agent._td_target(next_z, reward, terminated, task).cpu().numpy()
    torch.manual_seed(seed)  # the update's four draws, in its order, on its device (dropout off: nothing else draws)
    td_eps, td_perm = torch.randn(H, B, A, device=dev), torch.randperm(nq, device=dev)
    pi_eps, pi_perm = torch.randn(H + 1, B, A, device=dev), torch.randperm(nq, device=dev)
    draws = Draws(td_eps=jnp.asarray(td_eps.cpu().numpy()), td_heads=jnp.asarray(td_perm[:2].cpu().numpy(), jnp.int32),
                  pi_eps=jnp.asarray(pi_eps.cpu().numpy()), pi_heads=jnp.asarray(pi_perm[:2].cpu().numpy(), jnp.int32))
    if teacher_size is None:
        torch.manual_seed(seed)
        info = agent._update(obs, action, reward, terminated, task=task)
        update = jax.jit(make_update_fn(make_world_model(config.model), config, return_intermediates=True))
        state = init_training_state(config, params=params, target_q_params=target)
        new_state, metrics, inter = update(state, jax.device_put(batch), jax.random.key(0), draws)
    else:
        from mtdistill_jax.distill.step import init_distill_state, make_distill_update

        teacher, teacher_config, t_params = official_teacher(off, teacher_size, batch_size, dropout=0.0)
        torch.manual_seed(seed)
        info = dict(two_pass_distill_step(off, agent, teacher, config, (obs, action, reward, terminated, task)))
        update = jax.jit(make_distill_update(config, teacher_config, return_intermediates=True))
        state = init_distill_state(config, teacher_config, params=params, target_q_params=target)
        new_state, metrics, inter = update(state, jax.device_put(batch), jax.random.key(0), draws, t_params)
        metrics = {**metrics, "train/distill_loss": metrics["distill/reward_mse"]}
    out = {"td_targets_max_abs": _max_abs(inter["td_targets"], td_official)}
    bad = [f"TD targets differ by {out['td_targets_max_abs']:.2e} (> {TD_ATOL})"] if out[
        "td_targets_max_abs"] > TD_ATOL else []
    names = ["consistency_loss", "reward_loss", "value_loss", "total_loss", "grad_norm", "pi_loss", "pi_grad_norm"]
    for name in names + (["distill_loss"] if teacher_size is not None else []):
        o, m = float(info[name]), float(metrics["train/" + name])
        rel = abs(o - m) / max(abs(o), 1e-12)
        out[name + "_rel"] = rel
        if rel > SCALAR_RTOL:
            bad.append(f"{name}: official {o:.7g}, ours {m:.7g} (rel {rel:.2e} > {SCALAR_RTOL})")
    # params after the step, where the gradient is well above Adam's eps: the first Adam step moves a parameter by
    # lr * g / (|g| + eps), so where |g| is near eps float32 round-off in g moves it by up to lr on either side
    official_sd = {k: v.detach().cpu().numpy() if hasattr(v, "numpy") else v
                   for k, v in agent.model.state_dict().items()}
    official_after = state_dict_to_params(official_sd, config.model)
    grads = dict(jax.tree_util.tree_flatten_with_path({**inter["wm_grads"], PI_KEY: inter["pi_grads"]})[0])
    lr = float(config.train.lr)
    worst = {"steep": (0.0, None), "flat": (0.0, None)}
    pairs = [(p, a, b, grads.get(p)) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(new_state.params)[0],
                                                          jax.tree_util.tree_leaves(official_after.params),
                                                          strict=True)]
    pairs += [(("target",) + p, a, b, None) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(new_state.target_q_params)[0],
        jax.tree_util.tree_leaves(official_after.target_q_params), strict=True)]
    for path, a, b, g in pairs:
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        steep = np.ones(d.shape, bool) if g is None else np.abs(np.asarray(g)) >= GRAD_FLOOR
        for kind, sel in (("steep", steep), ("flat", ~steep)):
            if sel.any() and d[sel].max() > worst[kind][0]:
                worst[kind] = (float(d[sel].max()), jax.tree_util.keystr(path))
    out["params_after_max_abs"], out["params_after_worst"] = worst["steep"]
    out["params_after_flat_grad_max_abs"] = worst["flat"][0]
    if worst["steep"][0] > PARAM_ATOL:
        bad.append(f"params after the step: {worst['steep'][1]} differs by {worst['steep'][0]:.2e} (> {PARAM_ATOL}) "
                   f"where |grad| >= {GRAD_FLOOR}")
    if worst["flat"][0] > 2 * lr:
        bad.append(f"params after the step: {worst['flat'][1]} differs by {worst['flat'][0]:.2e} (> 2 lr = {2 * lr})")
    if bad:
        what = "update step" if teacher_size is None else f"distillation step (teacher {teacher_size}M)"
        raise MismatchError(f"{what}, size {size}: " + "; ".join(bad))
    return out


def check_values(off: Official, size: int = 1, task_id: int = 3, seed: int = 5) -> dict:
    """The planner's trajectory values for the same 512 action samples, policy noise and Q heads (official
    ``_estimate_value`` vs ours), and the top-64 elite sets they select. Raises :class:`MismatchError`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtdistill_jax.configs.tasks import get_task_set, task_discounts
    from mtdistill_jax.nn import make_world_model
    from mtdistill_jax.nn.world_model import WorldModel, action_masks
    from mtdistill_jax.tdmpc2.planner import make_value_estimator

    torch = off.torch
    config = our_config(size, BATCH, dropout=0.0)
    params, target = same_weights(config.model)
    agent = off.agent(size, config, params, target, dropout=0.0)
    ts = get_task_set("mt30")
    H, N, A, nq, E = config.planner.horizon, config.planner.num_samples, ts.action_pad, config.model.num_q, \
        config.planner.num_elites
    if agent.cfg.num_samples != N or agent.cfg.horizon != H or agent.cfg.num_elites != E:
        raise MismatchError(f"planner settings differ: official samples/horizon/elites {agent.cfg.num_samples}/"
                            f"{agent.cfg.horizon}/{agent.cfg.num_elites}, ours {N}/{H}/{E}")
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(ts.obs_pad,)).astype(np.float32)
    obs[ts.obs_dims[task_id]:] = 0
    actions = (np.clip(rng.normal(size=(H, N, A)), -1, 1) * action_masks("mt30")[task_id]).astype(np.float32)
    dev = off.device
    task_t = torch.tensor([task_id], device=dev)
    with torch.no_grad():
        z_off = agent.model.encode(torch.from_numpy(obs)[None].to(dev), task_t).repeat(N, 1)
        torch.manual_seed(seed)
        eps, perm = torch.randn(N, A, device=dev).cpu(), torch.randperm(nq, device=dev).cpu()
        torch.manual_seed(seed)
        v_off = agent._estimate_value(z_off, torch.from_numpy(actions).to(dev), task_t).cpu().numpy()[:, 0]
    model = make_world_model(config.model)
    z = model.apply({"params": params}, jnp.asarray(obs)[None], jnp.asarray([task_id]), method=WorldModel.encode)
    gamma = jnp.full((N, 1), task_discounts(config)[task_id], jnp.float32)
    value = jax.jit(make_value_estimator(model, config))
    v_ours = np.asarray(value(params, jnp.broadcast_to(z, (N, z.shape[-1])), jnp.asarray(actions),
                              jnp.full((N,), task_id, jnp.int32), gamma, jnp.asarray(eps.numpy()),
                              jnp.asarray(perm[:2].numpy(), jnp.int32)))[:, 0]
    out = {"encode_max_abs": _max_abs(z[0], z_off[0].cpu().numpy()), "values_max_abs": _max_abs(v_ours, v_off),
           "values_abs_range": [float(np.abs(v_off).min()), float(np.abs(v_off).max())]}
    out["same_elites"] = set(np.argsort(-v_off)[:E].tolist()) == set(np.argsort(-v_ours)[:E].tolist())
    if out["values_max_abs"] > VALUE_ATOL or not out["same_elites"]:
        raise MismatchError(f"planner values, size {size}: max abs difference {out['values_max_abs']:.2e} "
                            f"(> {VALUE_ATOL}?), same top-{E} elites: {out['same_elites']}")
    return out


# ---------------------------------------------------------------------------------------------------- timing


def _stats(times: list[float]) -> dict:
    import numpy as np

    t = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "n": len(times)}


def interleaved(official_call, our_call, repeats: int, warmup: bool = True) -> tuple[dict, dict]:
    """Each side's first call timed apart (ours compiles there), one warm-up (unless ``warmup`` is False: for calls
    long enough that the first one warms up), then ``repeats`` calls each, in two rounds: official half, ours half,
    official half, ours half."""
    first = {}
    for name, call in (("official", official_call), ("ours", our_call)):
        t = time.perf_counter()
        call()
        first[name] = time.perf_counter() - t
        if warmup:
            call()
    times = {"official": [], "ours": []}
    halves = (repeats // 2, repeats - repeats // 2)
    for n in halves:
        for name, call in (("official", official_call), ("ours", our_call)):
            for _ in range(n):
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
    return ({**_stats(times["official"]), "first_s": first["official"]},
            {**_stats(times["ours"]), "first_s": first["ours"]})


def _flops(jitted, *args) -> float | None:
    """FLOPs of ``jitted`` on ``args`` as XLA counts them (the lowered program's cost analysis), or None. Where the
    backend's lowering gives none (jax 0.11's GPU backend), the same program lowered for the CPU is counted: the
    FLOPs are the program's, not the backend's."""
    from benchmarks.common import cost_flops

    flops = cost_flops(jitted.lower(*args))
    if flops is None:
        flops = cost_flops(jitted.trace(*args).lower(lowering_platforms=("cpu",)))
    return flops


def torch_matmul_gflops(torch, n: int = 2048, repeats: int = 10, device="cpu", dtype=None) -> float:
    """Measured ``n x n`` matmul throughput of torch on ``device`` in ``dtype`` (default float32), GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)  # random data: zeros/ones run faster on GPUs
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ a
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ a
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def torch_compiled(torch, fn, device="cpu"):
    """``torch.compile(fn)`` as the official ``compile: true`` does it on CUDA (``mode="reduce-overhead"``: CUDA
    graphs), and as it works on CPU: inductor in its default mode (CUDA graphs do not apply) with inductor's pattern
    matcher off. With it on, torch 2.13's CPU inductor fails on the official update (``BackendCompilerFailed``:
    "Not all inputs to pattern found in match.kwargs ... argname=slice_shape"), in both modes."""
    if torch.device(device).type == "cuda":
        return torch.compile(fn, mode="reduce-overhead")
    torch._inductor.config.pattern_matcher = False
    return torch.compile(fn)


def compile_row(row: str, timed) -> dict:
    """A ``--torch_compile`` row: ``timed()``'s result, or the row with the error torch.compile raised (the table
    says it fails and how, instead of stopping the run)."""
    try:
        return timed()
    except Exception as e:  # noqa: BLE001 - whatever torch.compile raises is the row's finding
        first = (str(e).strip().splitlines() or [""])[0]
        return {"row": row, "error": f"{type(e).__name__}: {first}"[:300]}


def time_update(off: Official, size: int, repeats: int, batch_size: int = BATCH, torch_compile: bool = False) -> dict:
    """Update step rows; ``torch_compile``: the official ``_update`` under :func:`torch_compiled` (what its
    ``compile: true`` does, on CPU)."""
    import jax
    import numpy as np

    from mtdistill_jax.nn import make_world_model
    from mtdistill_jax.tdmpc2.train import Learner, make_update_fn

    config = our_config(size, batch_size)
    params, target = same_weights(config.model)
    agent = off.agent(size, config, params, target, batch_size=batch_size)
    batch = random_batch(np.random.default_rng(0), batch_size, config.train.horizon)
    tb = torch_batch(off.torch, batch, off.device)
    learner = Learner(config)  # the state donated and threaded through the calls, as training runs it (and as
    state = learner.init(params=params, target_q_params=target)  # the official update moves its params in place)
    batch_d = jax.device_put(batch)
    flops = _flops(jax.jit(make_update_fn(make_world_model(config.model), config)), state, batch_d,
                   jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(0), 4 * repeats + 8))
    states = [state]

    update = torch_compiled(off.torch, agent._update, off.device) if torch_compile else agent._update
    graphs = torch_compile and off.device.type == "cuda"  # CUDA graphs: a new step, as the official ``update`` marks

    def official():
        if graphs:
            off.torch.compiler.cudagraph_mark_step_begin()
        update(*tb[:4], task=tb[4])
        off.sync()

    def ours():
        states[0], metrics = learner.update_jit(states[0], batch_d, next(keys))
        jax.block_until_ready((states[0], metrics))

    o, m = interleaved(official, ours, repeats)
    return {"row": update_row_name(size, batch_size, config.train.horizon, torch_compile), "official": o, "ours": m,
            "flops": flops}


def update_row_name(size: int, batch_size: int, horizon: int, torch_compile: bool) -> str:
    return f"update MT30 {size}M, B {batch_size}, H {horizon}{', official torch.compile' * torch_compile}"


def act_row_name(size: int, envs: int, config, bf16: bool, torch_compile: bool) -> str:
    precision = ", bf16: official autocast, ours bf16 matmuls" if bf16 else ""
    return (f"act, {envs} env{'s' * (envs > 1)} ({size}M, {config.planner.iterations}x{config.planner.num_samples} "
            f"MPPI{precision}{', official torch.compile' * torch_compile})")


def time_act(off: Official, size: int, envs: int, repeats: int, bf16: bool = False,
             torch_compile: bool = False) -> dict:
    """Planning (official ``act``, training mode) for ``envs`` envs: official one call per env in a loop with each
    env's warm-start mean swapped in, ours one batched call. ``bf16``: official under ``torch.autocast('cpu',
    bfloat16)`` (oneDNN's bf16 kernels), ours with ``planner.compute_dtype = 'bfloat16'`` (bf16 matmuls
    accumulating in float32), which ``Planner`` compiles with XLA:CPU's YNNPACK single-dot path on CPU
    (``xla_cpu.bf16_dot_options``), the one that reaches the CPU's bf16 units."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtdistill_jax.configs.tasks import get_task_set
    from mtdistill_jax.tdmpc2.planner import Planner
    torch = off.torch
    config = our_config(size, BATCH)
    if bf16:
        config.planner.compute_dtype = "bfloat16"
    params, target = same_weights(config.model)
    agent = off.agent(size, config, params, target)
    if torch_compile:  # what the official ``plan`` property does with ``compile: true``
        agent._plan_val = torch_compiled(torch, agent._plan, off.device)
    ts = get_task_set("mt30")
    rng = np.random.default_rng(1)
    task = np.arange(envs) % ts.num_tasks
    obs = rng.normal(size=(envs, ts.obs_pad)).astype(np.float32)
    for b, t in enumerate(task):
        obs[b, ts.obs_dims[t]:] = 0
    obs_t = torch.from_numpy(obs).to(off.device)
    prev = [torch.zeros_like(agent._prev_mean) for _ in range(envs)]

    def official():  # ``act`` returns its action on the CPU: each call has finished when it returns
        with off.autocast(bf16):
            for e in range(envs):
                agent._prev_mean.copy_(prev[e])
                agent.act(obs_t[e], t0=False, eval_mode=False, task=int(task[e]))
                prev[e] = agent._prev_mean.clone()

    planner = Planner(config)
    state = planner.init(envs)
    obs_j, task_j, t0 = jnp.asarray(obs), jnp.asarray(task, jnp.int32), jnp.zeros((envs,), bool)
    keys = iter(jax.random.split(jax.random.key(0), 4 * repeats + 8))
    mean = [state.prev_mean]

    def ours():
        action, mean[0] = planner.plan_jit(params, obs_j, task_j, mean[0], t0, next(keys), mode="sample")
        jax.block_until_ready(action)

    o, m = interleaved(official, ours, repeats)
    from benchmarks.plan import plan_flops

    flops = envs * plan_flops(config)  # XLA's cost analysis counts the MPPI loop's body once, not per iteration
    return {"row": act_row_name(size, envs, config, bf16, torch_compile), "official": o, "ours": m, "flops": flops,
            "peak": "bfloat16" if bf16 else "float32"}


def distill_row_name(teacher_size: int, teacher_bf16: bool, student_size: int, batch_size: int) -> str:
    return f"distill step, teacher {teacher_size}M{' in bf16' * teacher_bf16} + student {student_size}M, B {batch_size}"


def official_teacher(off: Official, size: int, batch_size: int, dropout: float | None = None):
    """(the frozen official ``WorldModel`` of ``size`` with our teacher weights, our teacher model config, those
    weights): our initialisation with noise, seed 10 (the student's is 0)."""
    from mtdistill_jax.configs.model_sizes import get_model_config

    teacher_config = get_model_config(size, "mt30")
    t_params, t_target = same_weights(teacher_config, seed=10)
    teacher = off.WorldModel(off.cfg(size, batch_size=batch_size, dropout=dropout))
    teacher.load_state_dict(off.state_dict(teacher_config, t_params, t_target))
    teacher.to(off.device).eval().requires_grad_(False)
    return teacher, teacher_config, t_params


def two_pass_distill_step(off: Official, agent, teacher, config, batch, teacher_bf16: bool = False) -> dict:
    """The PyTorch two-pass distillation step (td-mpc-opt's term on the official update): the teacher's decoded
    reward at step 0 under ``no_grad`` (``teacher_bf16``: its forward under bf16 autocast), the student's reward
    MSE to it times ``d_coef`` backpropagated, then the official ``_update``, which adds its own loss's gradients
    to these before clipping and its Adam step. Returns the official update's info plus ``distill_loss``."""
    import torch.nn.functional as F

    torch, m = off.torch, off.math
    obs, action, reward, terminated, task = batch
    with torch.no_grad():
        with off.autocast(teacher_bf16):
            t_logits = teacher.reward(teacher.encode(obs[0], task), action[0], task)
        t_r = m.two_hot_inv(t_logits.float(), agent.cfg)
    s_r = m.two_hot_inv(agent.model.reward(agent.model.encode(obs[0], task), action[0], task), agent.cfg)
    dl = F.mse_loss(s_r, t_r)
    (float(config.distill.d_coef) * float(config.distill.reward_weight) * dl).backward()
    return {**agent._update(obs, action, reward, terminated, task=task), "distill_loss": dl.detach()}


def time_distill(off: Official, teacher_size: int, repeats: int, student_size: int = 1,
                 batch_size: int = BATCH, teacher_bf16: bool = False) -> dict:
    """One distillation step: ours fused (teacher forward + student update + the paper's reward term in one
    program) vs a faithful two-pass PyTorch version as td-mpc-opt does it: the frozen teacher's reward prediction
    under ``no_grad``, then the student's reward-MSE term backpropagated into the gradients that the unchanged
    official ``_update`` accumulates into before its clip and Adam step (it zeroes them only after stepping)."""
    import jax
    import numpy as np

    from mtdistill_jax.distill.step import init_distill_state, make_distill_step, make_distill_update

    torch = off.torch
    config = our_config(student_size, batch_size, distill=True)
    params, target = same_weights(config.model)
    agent = off.agent(student_size, config, params, target, batch_size=batch_size)
    teacher, teacher_config, t_params = official_teacher(off, teacher_size, batch_size)
    if teacher_bf16:  # ours: the teacher stored and computed in bf16 (as a bf16 checkpoint transform leaves it)
        config.distill.teacher_compute_dtype = "bfloat16"
        t_params = jax.tree_util.tree_map(lambda x: x.astype(jax.numpy.bfloat16), t_params)
    batch = random_batch(np.random.default_rng(2), batch_size, config.train.horizon)
    tb = torch_batch(torch, batch, off.device)

    def official():
        two_pass_distill_step(off, agent, teacher, config, tb, teacher_bf16)
        off.sync()

    state = init_distill_state(config, teacher_config, params=params, target_q_params=target)
    step = make_distill_step(config, teacher_config)  # the student state donated and threaded, as in training
    teacher_d, batch_d = jax.device_put(t_params), jax.device_put(batch)
    flops = _flops(jax.jit(make_distill_update(config, teacher_config)), state, batch_d, jax.random.key(0), None,
                   teacher_d)
    keys = iter(jax.random.split(jax.random.key(0), 4 * repeats + 8))
    states = [state]

    def ours():
        states[0], metrics = step(states[0], teacher_d, batch_d, next(keys))
        jax.block_until_ready((states[0], metrics))

    o, m = interleaved(official, ours, repeats)
    return {"row": distill_row_name(teacher_size, teacher_bf16, student_size, batch_size), "official": o, "ours": m,
            "flops": flops, "peak": "bfloat16" if teacher_bf16 else "float32"}


def official_mt30_env(off: Official, tasks: list[str], seed: int = 1):
    """The official multi-task env (``envs.make_env`` for MT30: dm_control with the checkout's custom tasks, action
    repeat 2, the ``MultitaskWrapper``'s padding) over ``tasks``. Needs gymnasium (the ``[official]`` extra)."""
    import io

    if "envs" in sys.modules and not str(getattr(sys.modules["envs"], "__file__", "")).startswith(str(off.root)):
        raise SystemExit("compare_official: a module named 'envs' other than the official one is imported")
    try:
        import gymnasium  # noqa: F401
    except ImportError as e:
        raise SystemExit("compare_official: the official envs need gymnasium: pip install -e '.[official]'") from e
    from envs import make_env

    cfg = off.cfg(1)
    cfg.tasks, cfg.obs, cfg.seed = list(tasks), "state", seed
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the task list
        return make_env(cfg)


def time_eval(off: Official, steps: int, repeats: int, tasks: list[str] | None = None, size: int = 1,
              episodes: int = 1, official_episodes: int | None = None) -> dict:
    """Evaluation throughput, ``episodes`` episodes per task (``len(tasks) x episodes`` envs; the official loop
    ``official_episodes`` per task, default the same: it runs one env after another, so its agent steps per second
    do not depend on how many episodes follow, and fewer keep a 300-env row's official side short): every call resets
    each env and runs ``steps`` agent steps of the planner (mean action, as evaluations use). Official: its
    evaluation loop (``offline_trainer.eval``: task by task, episode by episode, ``env.reset(task_idx)``, then
    ``act(eval_mode=True)`` and ``env.step`` in dm_control); ours: the batched evaluation program
    (``evaluate.program``: all envs in MJX and the planner, the ``steps`` agent steps in one compiled ``lax.scan``).
    Same weights; the envs' initial states differ (dm_control's and MJX's random draws), the work per agent step is
    the same. The speed-up is the ratio of agent steps per second; each side's '% peak' counts its own steps."""
    import jax

    from mtdistill_jax.configs import MT30
    from mtdistill_jax.evaluate.program import compile_eval_program, make_eval_program

    torch = off.torch
    tasks = list(MT30.tasks) if tasks is None else list(tasks)
    official_episodes = episodes if official_episodes is None else official_episodes
    config = our_config(size, BATCH)
    params, target = same_weights(config.model)
    agent = off.agent(size, config, params, target)
    t = time.perf_counter()
    env = official_mt30_env(off, tasks)
    print(f"evaluation row: the official envs built in {time.perf_counter() - t:.1f} s", flush=True)
    task_ids = [MT30.tasks.index(t) for t in tasks]

    def padded(obs):  # the wrapper pads to the largest of the tasks given; the MT30 model reads MT30.obs_pad
        return torch.nn.functional.pad(obs, (0, MT30.obs_pad - obs.shape[0]))

    def official():
        for idx, task_id in [(i, t) for i, t in enumerate(task_ids) for _ in range(official_episodes)]:
            obs = padded(env.reset(idx))
            for t in range(steps):
                obs, _, _, _ = env.step(agent.act(obs, t0=t == 0, eval_mode=True, task=task_id))
                obs = padded(obs)

    t = time.perf_counter()
    _, init, run_chunk = make_eval_program(config, tasks, episodes, mode="mean", chunk=steps)
    print(f"evaluation row: our program's MJX envs built in {time.perf_counter() - t:.1f} s; its first call compiles "
          "it", flush=True)
    keys = iter(jax.random.split(jax.random.key(0), 2 * repeats + 4))
    programs = []  # (init, run), compiled at the first call as the evaluator compiles them

    def ours():
        if not programs:
            programs.extend(compile_eval_program(init, run_chunk, params, donate=False)[:2])
        init_c, run_c = programs
        carry, _ = run_c(params, init_c(next(keys)))
        jax.block_until_ready(carry)

    o, m = interleaved(official, ours, repeats, warmup=False)
    from benchmarks.plan import plan_flops

    for side, n in ((o, official_episodes), (m, episodes)):
        side["agent_steps"] = steps * len(tasks) * n
        side["agent_steps_per_s"] = side["agent_steps"] / (side["median_ms"] / 1e3)
        side["flops"] = side["agent_steps"] * plan_flops(config)
    official_part = "" if official_episodes == episodes else (
        f"; official x {official_episodes} episode{'s' * (official_episodes > 1)}, one env after another")
    return {"row": f"evaluation, {len(tasks)} tasks x {episodes} episode{'s' * (episodes > 1)}{official_part}, {steps} "
                   f"agent steps ({size}M planner)",
            "official": o, "ours": m, "flops": m["flops"], "agent_steps": m["agent_steps"]}


def float32_peaks(res: dict) -> dict:
    """Each framework's float32 matmul throughput in one setting: the higher of its measurements at the start and,
    where taken, at the end."""
    end = res.get("matmul_gflops_end") or {}
    return {k: max(v, end.get(k, 0.0)) for k, v in res["matmul_gflops"].items()}


def malloc_text(res: dict) -> str:
    """How the glibc allocator ran in one thread setting, for the table's heading."""
    if not res.get("malloc_tuned"):
        return "as is"
    arenas = res.get("malloc_arena_max")
    arenas = "one arena" if arenas == 1 else f"arena limit {arenas}" if arenas else "arenas as is"
    return f"tuned (mtdistill_jax.xla_cpu.tune_malloc, both sides; {arenas})"


def setting_name(args) -> str:
    """How the progress lines and the table name a setting: its threads on CPU, the device's kind on GPU."""
    return "GPU" if args.device == "gpu" else f"{args.threads} thread(s)"


def measure(args) -> dict:
    """One thread setting (this process): versions, matmul throughput, equality checks, timing rows (those not
    started within ``--time_budget_s`` of this process's start: skipped, and said so)."""
    deadline = time.monotonic() + args.time_budget_s if args.time_budget_s else None
    import jax
    import torch

    from mtdistill_jax import xla_cpu  # importing the package adds its XLA:CPU flags before jax starts its backend

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message="To copy construct")  # official planner, every iteration
    gpu = args.device == "gpu"
    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"compare_official: --device=gpu, but jax's backend is {jax.default_backend()!r} (a CUDA "
                         "jaxlib and a visible GPU are needed)")
    def precision(check: bool) -> None:
        """GPU float32 matmuls: full precision on both sides for the equality checks; for the peaks and the timing,
        as each side ships on a GPU (TF32: the official train.py's set_float32_matmul_precision('high'); JAX's
        default precision). On CPU both are full float32 either way."""
        if gpu:
            jax.config.update("jax_default_matmul_precision", "highest" if check else None)
            torch.set_float32_matmul_precision("highest" if check else OFFICIAL_MATMUL_PRECISION)

    def checked(checks: dict) -> dict:
        print(f"[{setting_name(args)}] equal on the same input: {json.dumps(checks)}", flush=True)
        precision(check=False)
        return checks

    mismatches = []

    def check(fn, *a, **kw) -> dict | None:
        """One equality check; with ``--on_mismatch=report`` a difference is recorded (the table says so first)
        and the rows are timed anyway, for machines lent for minutes; by default it stops the run."""
        try:
            return fn(*a, **kw)
        except MismatchError as e:
            if args.on_mismatch == "stop":
                raise
            print(f"[{setting_name(args)}] EQUALITY CHECK FAILED (timing anyway, --on_mismatch=report): {e}",
                  flush=True)
            mismatches.append(str(e))
            return None

    precision(check=False)
    off = load_official(args.tdmpc2_repo, TORCH_DEVICES[args.device])
    from benchmarks.common import matmul_peak_gflops

    n = 8192 if gpu else 2048
    result = {"threads": args.threads, "device": args.device, "jax": jax.__version__, "torch": torch.__version__,
              "matmul_n": n, "loadavg_start": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "malloc_tuned": xla_cpu.malloc_tuned, "malloc_arena_max": xla_cpu.malloc_arena_max,
              "matmul_gflops": {"jax": matmul_peak_gflops(n),
                                "torch": torch_matmul_gflops(torch, n, device=off.device)}}
    if gpu:
        result["device_name"] = torch.cuda.get_device_name()
        result["timing_precision"] = OFFICIAL_MATMUL_PRECISION
        result["matmul_gflops_bf16"] = {"jax": matmul_peak_gflops(n, dtype="bfloat16"),
                                        "torch": torch_matmul_gflops(torch, n, device=off.device,
                                                                     dtype=torch.bfloat16)}
    print(f"[{setting_name(args)}] float32 matmul GFLOP/s: jax {result['matmul_gflops']['jax']:.0f}, torch "
          f"{result['matmul_gflops']['torch']:.0f}", flush=True)
    precision(check=True)
    if args.child_part == "eval":
        if "main" not in args.parts:  # the planner the evaluation row runs, checked on the same input first
            result["checks"] = checked({"values": check(check_values, off)})
            result["mismatches"] = mismatches
        precision(check=False)
        r = time_eval(off, args.eval_steps, args.eval_repeats, args.eval_tasks, episodes=args.eval_episodes,
                      official_episodes=args.eval_official_episodes)
        print(f"[{setting_name(args)}] {r['row']}: official {r['official']['agent_steps_per_s']:.2f}, ours "
              f"{r['ours']['agent_steps_per_s']:.2f} agent steps/s", flush=True)
        print(table_row(r, result), flush=True)
        return {**result, "rows": [r], "loadavg_end": os.getloadavg()}
    checks = {}
    if args.checks:
        checks = {"update": check(check_update, off), "values": check(check_values, off)}
        for t in args.teachers:
            checks[f"distill_{t}"] = check(check_update, off, teacher_size=t)
    result["checks"] = checked(checks)
    result["mismatches"] = mismatches
    c1 = our_config(1, BATCH)  # the rows' names, for a row skipped or failing before it names itself
    H = c1.train.horizon
    rows = [(update_row_name(s, BATCH, H, False), lambda s=s: time_update(off, s, args.repeats)) for s in args.sizes]
    rows += [(act_row_name(1, e, c1, False, False),
              lambda e=e: time_act(off, 1, e, args.repeats if e == 1 else args.act30_repeats)) for e in args.act_envs]
    rows += [(distill_row_name(t, args.teacher_bf16, 1, BATCH),
              lambda t=t: time_distill(off, t, args.repeats, teacher_bf16=args.teacher_bf16)) for t in args.teachers]
    if args.bf16:
        rows += [(act_row_name(1, 1, c1, True, False), lambda: time_act(off, 1, 1, args.repeats, bf16=True))]
    if args.torch_compile:
        compiled = [(update_row_name(1, BATCH, H, True), lambda: time_update(off, 1, args.repeats, torch_compile=True)),
                    (act_row_name(1, 1, c1, False, True),
                     lambda: time_act(off, 1, 1, args.repeats, torch_compile=True))]
        rows += [(name, lambda name=name, timed=timed: compile_row(name, timed)) for name, timed in compiled]
    result["rows"] = []
    for name, row in rows:
        if deadline is not None and time.monotonic() > deadline:
            r = {"row": name, "skipped": f"not started: the run's time budget ({args.time_budget_s:.0f} s) was spent"}
        else:
            r = row()
        result["rows"].append(r)
        if "error" in r or "skipped" in r:
            print(f"[{setting_name(args)}] {r['row']}: {r.get('error') or r['skipped']}", flush=True)
            continue
        print(f"[{setting_name(args)}] {r['row']}: official {r['official']['median_ms']:.1f} ms, ours "
              f"{r['ours']['median_ms']:.1f} ms", flush=True)
        print(table_row(r, result), flush=True)  # the table's row now: a run stopped later keeps it in its log
    # measured again at the end: a dip in one measurement (another tenant of the host) would skew '% peak'
    result["matmul_gflops_end"] = {"jax": matmul_peak_gflops(n),
                                   "torch": torch_matmul_gflops(torch, n, device=off.device)}
    result["loadavg_end"] = os.getloadavg()
    return result


# ---------------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def eval_steps_text(r: dict) -> str:
    """The evaluation row's agent steps per call: one count, or each side's where they differ."""
    official = r["official"].get("agent_steps", r["agent_steps"])
    if official == r["agent_steps"]:
        return f"{official}"
    return f"{official} / {r['agent_steps']} (official / ours; speed-up: the ratio of agent steps per second)"


def table_row(r: dict, res: dict) -> str:
    """One row of the table (``r``: a timing row of the setting ``res``, whose matmul peaks give '% peak')."""
    if "error" in r or "skipped" in r:
        return f"| {r['row']} | {'fails: ' + r['error'] if 'error' in r else r['skipped']} | | | | |"
    o, m = r["official"], r["ours"]
    peak = ""
    if r.get("flops"):  # a side's own count where the sides did different work (the evaluation row)
        g = float32_peaks(res)
        pk = res["matmul_gflops_bf16"] if r.get("peak") == "bfloat16" and "matmul_gflops_bf16" in res else g
        po = o.get("flops", r["flops"]) / (o["median_ms"] / 1e3) / 1e9 / pk["torch"] * 100
        pm = m.get("flops", r["flops"]) / (m["median_ms"] / 1e3) / 1e9 / pk["jax"] * 100
        peak = f"{po:.0f} / {pm:.0f}"
    speedup = (m["agent_steps_per_s"] / o["agent_steps_per_s"] if "agent_steps_per_s" in o
               else o["median_ms"] / m["median_ms"])
    return (f"| {r['row']} | {o['median_ms']:,.1f} ({o['p10_ms']:,.0f}-{o['p90_ms']:,.0f}) | "
            f"{m['median_ms']:,.1f} ({m['p10_ms']:,.0f}-{m['p90_ms']:,.0f}) | "
            f"{speedup:.2f} | {o['first_s']:.1f} / {m['first_s']:.1f} "
            f"({m['first_s'] - m['median_ms'] / 1e3:.1f}) | {peak} |")


def table(results: list[dict], command: str) -> str:
    gpu = results[0].get("device") == "gpu"
    machine = f"CPU: {cpu_model()}, {os.cpu_count()} logical cores"
    if gpu:
        machine = f"GPU: {results[0]['device_name']}; {machine}"
    lines = [f"# Ours vs the official PyTorch TD-MPC2, same run, {'GPU' if gpu else 'CPU'}", "", "```bash", command,
             "```", "", f"{machine}; jax {results[0]['jax']}, torch "
             f"{results[0]['torch']} (eager, compile=False, except the rows marked torch.compile); official code: the "
             "checkout given (tested at "
             f"{TESTED_COMMIT}).",
             "", "Speed-up = official ms / ours ms (> 1: ours is faster). Times: median (p10-p90) after warm-up; "
             "'first' is the first call (ours: XLA compile, persistent cache as found, then one call; in "
             "parentheses the first call less the median call, i.e. ours' compile). '% peak': the row's FLOPs "
             "over its time, against each framework's float32 matmul throughput measured in the same process (bf16 "
             "rows: against the bf16 matmul throughput where it was measured, on GPU); "
             "update and distillation FLOPs as XLA's cost analysis counts our program, planning FLOPs as "
             "`benchmarks/plan.py` counts the planner's matmuls (XLA counts the MPPI loop's body once).", ""]
    for res in results:
        g, n, end = float32_peaks(res), res.get("matmul_n", 2048), res.get("matmul_gflops_end")
        heading = "GPU" if res.get("device") == "gpu" else f"{res['threads']} thread(s)"
        if end:
            start = res["matmul_gflops"]
            matmul = (f"float32 matmul ({n}^2, at start / at end; '% peak' against the higher): jax "
                      f"{start['jax']:.0f} / {end['jax']:.0f} GFLOP/s, torch {start['torch']:.0f} / {end['torch']:.0f}")
        else:
            matmul = f"float32 matmul ({n}^2): jax {g['jax']:.0f} GFLOP/s, torch {g['torch']:.0f} GFLOP/s"
        if "matmul_gflops_bf16" in res:
            b = res["matmul_gflops_bf16"]
            matmul += f"; bf16: jax {b['jax']:.0f}, torch {b['torch']:.0f}"
        if res.get("device") == "gpu":
            matmul += (" (equality checks: float32 matmuls at full precision on both sides; peaks and timing: as "
                       "each side ships on a GPU, TF32: the official train.py's set_float32_matmul_precision("
                       f"'{res.get('timing_precision', OFFICIAL_MATMUL_PRECISION)}'), JAX's default precision)")
        lines += [f"## {heading}", "",
                  f"{matmul}; load "
                  f"average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end; our "
                  f"XLA_FLAGS: `{res.get('xla_flags') or '(none)'}`; glibc allocator "
                  f"{malloc_text(res)}.",
                  "",
                  "| row | official ms | ours ms | speed-up | first call: official / ours s (ours' compile) | "
                  "% peak: official / ours |",
                  "|---|---|---|---|---|---|"]
        lines += [table_row(r, res) for r in res["rows"]]
        for r in res["rows"]:
            if "agent_steps" in r:
                lines += ["", f"Evaluation row: official {r['official']['agent_steps_per_s']:.2f} agent steps/s "
                          f"(dm_control + its act loop, one task after another), ours "
                          f"{r['ours']['agent_steps_per_s']:.2f} (one MJX + planner program, all tasks batched); "
                          f"every call resets the envs and runs {eval_steps_text(r)} agent steps; first call: ours "
                          f"compiles the program. That process's XLA_FLAGS: `{res.get('eval_xla_flags', '')}`."]
        c = {k: v for k, v in res["checks"].items() if v is not None}  # None: that check failed (mismatches)
        checked = []
        if "update" in c:
            checked.append(f"TD targets within {c['update']['td_targets_max_abs']:.1e}, losses and grad norms within "
                           f"{max(v for k, v in c['update'].items() if k.endswith('_rel')):.1e} relative, parameters "
                           f"after one update within {c['update']['params_after_max_abs']:.1e}")
        if "values" in c:
            checked.append(f"planner values of 512 samples within {c['values']['values_max_abs']:.1e} (|value| "
                           f"{c['values']['values_abs_range'][0]:.2g}-{c['values']['values_abs_range'][1]:.2g}), "
                           f"same top-64 elites: {c['values']['same_elites']}")
        lines += ["", "Equality before timing (size 1, dropout 0, same weights and draws): " + "; ".join(checked)
                  + "." if checked else "No equality checks in this run (`--no-checks`)."]
        if res.get("mismatches"):
            lines += ["", "**Equality checks FAILED** (the rows above were timed anyway, `--on_mismatch=report`): "
                      + "; ".join(res["mismatches"]) + "."]
        for name, d in c.items():
            if name.startswith("distill_"):
                lines[-1] += (f" Distillation step (teacher {name.split('_')[1]}M, the two-pass PyTorch version): "
                              f"reward-MSE term within {d['distill_loss_rel']:.1e} relative, losses and grad norms "
                              f"within {max(v for k, v in d.items() if k.endswith('_rel')):.1e}, parameters within "
                              f"{d['params_after_max_abs']:.1e}.")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tdmpc2_repo", default=None, help="a checkout of github.com/nicklashansen/tdmpc2")
    p.add_argument("--device", default="cpu", choices=tuple(TORCH_DEVICES),
                   help="where both sides run: cpu (per --threads) or gpu (one setting: the official code on "
                        "cuda:0 as it ships, ours on jax's GPU backend)")
    p.add_argument("--act_envs", default=None,
                   help="env counts of the planning rows, comma-separated (default 1,30; --device=gpu: 1,30,300)")
    p.add_argument("--teacher_bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="distillation rows with the teacher's forward in bf16 (official: autocast; ours: the "
                        "teacher stored and computed in bf16); '%% peak' then against the bf16 matmul throughput")
    p.add_argument("--eval_episodes", type=int, default=1,
                   help="episodes per task of the evaluation row (envs = tasks x episodes; official: one after "
                        "another)")
    p.add_argument("--quick", action="store_true", help="2 threads, repeats 6 (3 for 30 envs)")
    p.add_argument("--threads", default=None, help="comma-separated thread settings, of 1 and 2 (default 1,2)")
    p.add_argument("--sizes", default="1,5", help="model sizes of the update rows")
    p.add_argument("--teachers", default="5", help="teacher sizes of the distillation rows (student 1M)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 20)")
    p.add_argument("--act30_repeats", type=int, default=None, help="timed calls per side, 30 envs (default 20)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="a bf16 planning row (1 env): official under torch.autocast, ours planner.compute_dtype bf16")
    p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=False,
                   help="rows with the official update and act (1M, 1 env) under torch.compile (inductor; its first "
                        "call compiles for minutes on CPU)")
    p.add_argument("--eval_steps", type=int, default=None,
                   help="agent steps per task of the evaluation-throughput row (default 10; --quick: 0, no row)")
    p.add_argument("--eval_tasks", default="all", help="MT30 tasks of the evaluation row (comma-separated, or all)")
    p.add_argument("--eval_official_episodes", type=int, default=None,
                   help="episodes per task of the official side of the evaluation row (default --eval_episodes): "
                        "its loop runs one env after another, so its agent steps/s do not depend on the count")
    p.add_argument("--eval_repeats", type=int, default=2, help="timed calls per side of the evaluation row")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="the equality checks before timing (--no-checks: none, e.g. a second run of rows on a "
                        "machine where they passed; the table says so)")
    p.add_argument("--on_mismatch", default="stop", choices=("stop", "report"),
                   help="an equality check that fails: stop before timing (default), or report it in the table "
                        "and time the rows anyway (for machines lent for minutes)")
    p.add_argument("--time_budget_s", type=float, default=0.0,
                   help="seconds after a thread setting's process starts past which no further row is started "
                        "(those are listed as skipped; 0: no budget), for machines that cap a command's time")
    p.add_argument("--parts", default="main,eval",
                   help="what to run, comma-separated: main (the equality checks, then the update, act and "
                        "distillation rows), eval (the evaluation row; alone, after the planner-value check)")
    p.add_argument("--out", default=None, help="the table (default benchmarks/results/compare_official_DEVICE.md)")
    p.add_argument("--child_json", default=None, help=argparse.SUPPRESS)  # one thread setting, in a subprocess
    p.add_argument("--child_part", default="main", choices=("main", "eval"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / f"benchmarks/results/compare_official_{args.device}.md")
    if args.device == "gpu":  # one setting, all cores for the host side
        if args.threads is not None and args.child_json is None:
            p.error("--threads applies to --device=cpu only")
        args.threads = str(os.cpu_count() or 1)
    args.threads = args.threads or ("2" if args.quick else "1,2")
    if args.act_envs is None:
        args.act_envs = "1,30,300" if args.device == "gpu" else "1,30"
    if args.eval_official_episodes is None:
        args.eval_official_episodes = args.eval_episodes
    if args.eval_episodes < 1 or args.eval_official_episodes < 1:
        p.error(f"--eval_episodes and --eval_official_episodes must be >= 1, got {args.eval_episodes}, "
                f"{args.eval_official_episodes}")
    if args.time_budget_s < 0:
        p.error(f"--time_budget_s must be >= 0 (0: no budget), got {args.time_budget_s}")
    args.repeats = args.repeats or (6 if args.quick else 20)
    args.act30_repeats = args.act30_repeats or (3 if args.quick else 20)
    if args.eval_steps is None:
        args.eval_steps = 0 if args.quick else 10
    if args.eval_steps < 0 or (args.eval_steps and 500 % args.eval_steps):
        p.error(f"--eval_steps must divide MT30's episode length 500 (one compiled chunk), or be 0 (no evaluation "
                f"row); got {args.eval_steps}")
    args.parts = [x for x in args.parts.split(",") if x]
    if not args.parts or set(args.parts) - {"main", "eval"}:
        p.error(f"--parts: comma-separated of main, eval; got {','.join(args.parts) or 'none'}")
    if args.parts == ["eval"] and not args.eval_steps:
        p.error("--parts=eval needs --eval_steps > 0 (--quick sets 0)")
    from mtdistill_jax.configs.tasks import get_task_set

    mt30 = get_task_set("mt30")
    args.eval_tasks = list(mt30.tasks) if args.eval_tasks == "all" else [t for t in args.eval_tasks.split(",") if t]
    unknown = [t for t in args.eval_tasks if t not in mt30.tasks]
    if unknown or not args.eval_tasks:
        p.error(f"--eval_tasks: {unknown or 'none given'}; MT30 tasks are {', '.join(mt30.tasks)}")
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
        args.teachers = [int(s) for s in str(args.teachers).split(",") if s]
        args.act_envs = [int(s) for s in str(args.act_envs).split(",") if s]
        threads = [int(t) for t in str(args.threads).split(",") if t]
    except ValueError:
        p.error(f"--sizes, --act_envs and --threads are comma-separated integers, got {args.sizes!r}, "
                f"{args.act_envs!r}, {args.threads!r}")
    if not args.act_envs or min(args.act_envs) < 1:
        p.error(f"--act_envs: env counts >= 1, got {args.act_envs}")
    for name in ("sizes", "teachers"):
        bad = [s for s in getattr(args, name) if s not in (1, 5, 19, 48, 317)]
        if bad:
            p.error(f"--{name}: {bad} not among 1, 5, 19, 48, 317")
    if args.child_json is None:
        if not threads or any(t < 1 or t > (os.cpu_count() or 1) for t in threads):
            p.error(f"--threads: each between 1 and this machine's {os.cpu_count()} cores, got {args.threads}")
        args.threads = threads
    else:
        args.threads = threads[0]
    if args.repeats < 2 or args.act30_repeats < 2 or args.eval_repeats < 2:
        p.error("--repeats, --act30_repeats and --eval_repeats must be >= 2 (two interleaved halves)")
    return args


def run_child(args, threads: int, part: str) -> dict:
    """One thread setting's rows in a fresh process (``part`` "main": checks and rows 1-3; "eval": the evaluation
    row, in a process of its own because its 30-task program needs XLA:CPU's fewer-kernel emitters, as
    ``launch/evaluate.py`` sets them, which must not change the other rows)."""
    from mtdistill_jax.xla_cpu import add_flags, use_fewer_kernels

    out = Path(args.out).with_suffix(f".threads{threads}.{part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads == 1 and args.device == "cpu":  # XLA's Eigen thread pool off; affinity keeps both frameworks on one core
        add_flags(("--xla_cpu_multi_thread_eigen=false",), env)
    if part == "eval" and args.device == "cpu":
        use_fewer_kernels(env)
    if args.device == "gpu":  # JAX takes GPU memory as it needs it: torch shares the device in this process
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--tdmpc2_repo={args.tdmpc2_repo}",
           f"--device={args.device}", f"--act_envs={','.join(map(str, args.act_envs))}",
           "--teacher_bf16" if args.teacher_bf16 else "--no-teacher_bf16", f"--eval_episodes={args.eval_episodes}",
           f"--eval_official_episodes={args.eval_official_episodes}", f"--time_budget_s={args.time_budget_s}",
           f"--on_mismatch={args.on_mismatch}", "--checks" if args.checks else "--no-checks",
           f"--threads={threads}", f"--sizes={','.join(map(str, args.sizes))}",
           f"--teachers={','.join(map(str, args.teachers))}", f"--repeats={args.repeats}",
           f"--act30_repeats={args.act30_repeats}", f"--eval_steps={args.eval_steps}",
           "--bf16" if args.bf16 else "--no-bf16", "--torch_compile" if args.torch_compile else "--no-torch_compile",
           f"--eval_tasks={','.join(args.eval_tasks)}", f"--eval_repeats={args.eval_repeats}",
           f"--parts={','.join(args.parts)}",
           f"--child_json={out}", f"--child_part={part}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    check_repo(args.tdmpc2_repo)  # a clear message before anything starts
    if args.child_json is not None:  # one thread setting: this process, pinned to its cores
        if hasattr(os, "sched_setaffinity") and args.device == "cpu":
            os.sched_setaffinity(0, set(range(args.threads)))
            from mtdistill_jax import xla_cpu

            xla_cpu.tune_malloc()  # its arena limit follows the affinity (one arena on one core)
        Path(args.child_json).write_text(json.dumps(measure(args)))
        return
    results = []
    for t in args.threads:
        result = run_child(args, t, "main") if "main" in args.parts else None
        if args.eval_steps and "eval" in args.parts:
            ev = run_child(args, t, "eval")
            if result is None:
                result = {**ev, "rows": []}
            result["rows"] += ev["rows"]
            result["eval_xla_flags"] = ev["xla_flags"]
            result["loadavg_end"] = ev["loadavg_end"]
        results.append(result)
    # the checkout's path is the user's: the command shows it as PATH
    command = "python benchmarks/compare_official.py " + " ".join(
        "--tdmpc2_repo=PATH" if a.startswith("--tdmpc2_repo=") else a for a in (argv or sys.argv[1:]))
    text = table(results, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    try:
        main()
    except MismatchError as e:
        raise SystemExit(f"compare_official: the two implementations differ on the same input, nothing was timed: "
                         f"{e}") from None
