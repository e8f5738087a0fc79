"""DeepMind Control tasks on MJX with TD-MPC2 semantics.

:class:`DMCEnv` subclasses MuJoCo Playground's ``MjxEnv`` (pure ``reset(rng)`` / ``step(state, action)``,
struct ``State``). A task supplies its model XML, its initial-state randomisation, its observation (an
ordered dict in dm_control's key order) and its reward; the base class does the rest the way dm_control +
TD-MPC2 do it:

- actions in [-1, 1] are mapped affinely onto the actuators' ctrl ranges (``action_scale.Wrapper``);
- one agent step = ``action_repeat`` (2) dm_control control steps, each ``n_sub_steps`` physics steps;
  the agent reward is the sum of the task reward evaluated after each control step;
- observations are computed from the state *after* the step (positions, velocities) and flattened to
  float32 in key order; acceleration-stage sensors (``touch``) are the ones MuJoCo computed during the
  last physics substep, exactly like dm_control's legacy stepping;
- no early termination (episode length and resets are handled by :mod:`mtdistill_jax.envs.wrappers`).

``state.info`` carries per-episode task parameters (e.g. a randomised target) and the step counter.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from ml_collections import config_dict
from mujoco import mjx
from mujoco_playground._src import mjx_env

State = mjx_env.State
IMPLS = ("jax", "warp")


def default_config(ctrl_dt: float, sim_dt: float, impl: str = "jax") -> config_dict.ConfigDict:
    """Config shared by every task (one comment per field)."""
    c = config_dict.ConfigDict()
    c.ctrl_dt = ctrl_dt  # dm_control control timestep (s)
    c.sim_dt = sim_dt  # physics timestep of the model XML (s)
    c.action_repeat = 2  # control steps per agent step (TD-MPC2)
    c.episode_length = 500  # agent steps per episode (TD-MPC2 Timeout)
    c.impl = impl  # MJX implementation: 'jax' or 'warp'
    return c


def with_plane_half_length(xml: str, geom_name: str, half_length: float) -> str:
    """A copy of an MJCF string whose plane geom ``geom_name`` has its first size (half-length) changed.

    Used for TD-MPC2's custom tasks, which lengthen the stock floor (cheetah 200, walker 500).
    """
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    geom = root.find(f"./worldbody/geom[@name='{geom_name}']")
    if geom is None:
        raise ValueError(f"the model has no world geom named {geom_name!r}")
    size = geom.get("size").split()
    size[0] = f"{half_length:g}"
    geom.set("size", " ".join(size))
    return ET.tostring(root, encoding="unicode")


def randomize_limited_and_rotational_joints(rng: jax.Array, model: mujoco.MjModel, qpos: jax.Array) -> jax.Array:
    """dm_control's ``randomizers.randomize_limited_and_rotational_joints`` for hinge/slide-only models.

    Limited hinges and slides are drawn uniformly in their range, unlimited hinges uniformly in [-pi, pi];
    unlimited slides keep their value. Ball and free joints are not supported (the planar models have none).
    """
    types = np.asarray(model.jnt_type)
    hinge, slide = int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE)
    if not np.all(np.isin(types, (hinge, slide))):
        raise NotImplementedError("only hinge and slide joints are randomised here")
    limited = model.jnt_limited.astype(bool)
    idx = np.flatnonzero(limited | (types == hinge))
    lo = np.where(limited, model.jnt_range[:, 0], -np.pi)[idx]
    hi = np.where(limited, model.jnt_range[:, 1], np.pi)[idx]
    values = jax.random.uniform(rng, (idx.size,), minval=lo, maxval=hi)
    return qpos.at[model.jnt_qposadr[idx]].set(values.astype(qpos.dtype))


def flatten_obs(obs: Mapping[str, jax.Array]) -> jax.Array:
    """Concatenate an observation dict in its key order into one float32 vector (TD-MPC2's flattening)."""
    return jnp.concatenate([jnp.ravel(jnp.asarray(v, jnp.float32)) for v in obs.values()])


def advance(state: State, ctrl: jax.Array, physics, reward, obs, action_repeat: int) -> State:
    """One agent step of TD-MPC2 on dm_control: ``action_repeat`` control steps (one ``lax.scan``, so the
    physics is traced once), the task reward summed over them, the observation after the last one.

    ``physics(data, ctrl) -> (data_pre, data)`` is a control step, ``reward(data, info)`` and
    ``obs(data, info, data_pre)`` the task's; a single env passes its own methods, a physics structure shared
    by several tasks (``envs.structure``) passes vmapped ones over all its rows.
    """

    def body(carry, _):
        data, _, total = carry
        data_pre, data = physics(data, ctrl)
        return (data, data_pre, total + jnp.asarray(reward(data, state.info), jnp.float32)), None

    zero = jnp.zeros(jnp.shape(state.reward), jnp.float32)
    data = state.data.replace(ctrl=ctrl)  # the control the steps set (also its dtype: float32 under x64 too)
    (data, data_pre, total), _ = jax.lax.scan(body, (data, data, zero), None, length=action_repeat)
    info = {**state.info, "step": state.info["step"] + 1}
    return state.replace(data=data, obs=obs(data, info, data_pre), reward=total, info=info)


def first_state(data: mjx.Data, info: Mapping[str, Any] | None, obs, rows: tuple[int, ...] = ()) -> State:
    """The :class:`State` an episode starts in at forwarded ``data``: ``obs(data, info)`` with the step counter
    at 0 and no reward (``rows``: the leading batch shape, e.g. a physics structure's rows)."""
    info = {**(info or {}), "step": jnp.zeros(rows, jnp.int32)}
    zero = jnp.zeros(rows, jnp.float32)
    return State(data=data, obs=obs(data, info), reward=zero, done=zero, metrics={}, info=info)


class DMCEnv(mjx_env.MjxEnv, abc.ABC):
    """Base class of the MT30 tasks (stock and custom) on MJX."""

    name: str = ""  # TD-MPC2 task name, e.g. 'walker-walk'
    ctrl_dt: float = 0.0  # dm_control control timestep of the task
    touch_sensors: tuple[str, ...] = ()  # sensor names whose values come from the last physics substep

    def __init__(self, config: config_dict.ConfigDict | None = None, config_overrides: dict | None = None):
        xml, assets = self.model_xml()
        model = mujoco.MjModel.from_xml_string(xml, assets or {})
        model.opt.enableflags &= ~int(mujoco.mjtEnableBit.mjENBL_ENERGY)  # bookkeeping only; MJX rejects it
        self.customize_model(model)
        if config is None:
            config = default_config(self.ctrl_dt, float(model.opt.timestep))
        super().__init__(config, config_overrides)
        if self._config.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self._config.impl!r}")
        if not np.isclose(self._config.sim_dt, model.opt.timestep):
            raise ValueError(f"{self.name}: config.sim_dt {self._config.sim_dt} differs from the model's "
                             f"timestep {model.opt.timestep}")
        self._mj_model = model
        self._mjx_model = mjx.put_model(model, impl=self._config.impl)
        n = self._config.ctrl_dt / self._config.sim_dt
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"{self.name}: control timestep {self._config.ctrl_dt} is not a multiple of the "
                             f"physics timestep {self._config.sim_dt}")
        self._n_sub_steps = int(round(n))
        lo, hi = model.actuator_ctrlrange[:, 0], model.actuator_ctrlrange[:, 1]
        limited = model.actuator_ctrllimited.astype(bool)
        self._ctrl_lo = jnp.asarray(np.where(limited, lo, -1.0), jnp.float32)
        self._ctrl_hi = jnp.asarray(np.where(limited, hi, 1.0), jnp.float32)
        self._touch_adr = []
        for s in self.touch_sensors:
            sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SENSOR, s)
            if sid < 0:
                raise ValueError(f"{self.name}: no sensor named {s!r}")
            self._touch_adr.append((int(model.sensor_adr[sid]), int(model.sensor_dim[sid])))
        self._reset_shape = None

    # ----------------------------------------------------------------------------------------------------
    # What a task defines.

    @abc.abstractmethod
    def model_xml(self) -> tuple[str, dict[str, bytes]]:
        """(MJCF string, assets) of the task's model."""

    def customize_model(self, model: mujoco.MjModel) -> None:
        """Hook to change model fields after compilation (default: nothing)."""

    @abc.abstractmethod
    def initial_state(self, rng: jax.Array, data: mjx.Data) -> tuple[mjx.Data, dict[str, Any]]:
        """Randomised initial ``data`` (qpos/qvel/...; not yet forwarded) and per-episode ``info``."""

    @abc.abstractmethod
    def observation(self, data: mjx.Data, info: Mapping[str, Any]) -> collections.OrderedDict:
        """The dm_control observation dict (key order matters) at a forwarded ``data``."""

    @abc.abstractmethod
    def reward(self, data: mjx.Data, info: Mapping[str, Any]) -> jax.Array:
        """The dm_control task reward at a forwarded ``data`` (scalar)."""

    def info_from_model_fields(self, fields: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Per-episode ``info`` from model fields recorded after a dm_control reset.

        ``fields`` maps 'geom_pos', 'geom_size', 'site_pos', 'site_size', 'body_pos', 'body_quat' to arrays
        in model row order. Tasks that randomise model fields at reset (targets) override this; it lets a
        recorded dm_control episode be replayed exactly.
        """
        return {}

    def prepare_render(self, model: mujoco.MjModel, info: Mapping[str, Any]) -> None:
        """Write per-episode task parameters (e.g. a randomised target) into ``model`` before rendering."""

    # ----------------------------------------------------------------------------------------------------
    # Generic machinery.

    def state_from_physics(self, qpos, qvel, act=None, time=0.0, ctrl=None, qacc_warmstart=None,
                           info: Mapping[str, Any] | None = None) -> State:
        """A forwarded :class:`State` at a given physics state (e.g. one recorded from dm_control)."""
        return first_state(self.physics_data(qpos, qvel, act, time, ctrl, qacc_warmstart), info, self.get_obs)

    def physics_data(self, qpos, qvel, act=None, time=0.0, ctrl=None, qacc_warmstart=None,
                     model: mjx.Model | None = None) -> mjx.Data:
        """Forwarded ``mjx.Data`` at a given physics state (``model``: see :meth:`forward`); ``act``, ``ctrl``
        and ``qacc_warmstart`` keep ``make_data``'s zeros when None (``act`` also when empty)."""
        data = self.make_data()
        rep = {"qpos": jnp.asarray(qpos, data.qpos.dtype), "qvel": jnp.asarray(qvel, data.qvel.dtype),
               "time": jnp.asarray(time, data.time.dtype)}
        if act is not None and np.size(act):
            rep["act"] = jnp.asarray(act, data.act.dtype)
        if ctrl is not None:
            rep["ctrl"] = jnp.asarray(ctrl, data.ctrl.dtype)
        if qacc_warmstart is not None:
            rep["qacc_warmstart"] = jnp.asarray(qacc_warmstart, data.qacc_warmstart.dtype)
        return self.forward(data.replace(**rep), model)

    def make_data(self) -> mjx.Data:
        if self._config.impl == "warp":
            return mjx.make_data(self._mj_model, impl="warp")
        return mjx.make_data(self._mjx_model)

    def forward(self, data: mjx.Data, model: mjx.Model | None = None) -> mjx.Data:
        """``mjx.forward`` with the task's model (or ``model``: the same structure with other field values)."""
        return mjx.forward(self._mjx_model if model is None else model, data)

    def scale_action(self, action: jax.Array) -> jax.Array:
        """[-1, 1] -> actuator ctrl range (dm_control action_scale.Wrapper)."""
        action = jnp.asarray(action, jnp.float32)
        return self._ctrl_lo + (self._ctrl_hi - self._ctrl_lo) * (action + 1.0) / 2.0

    def _with_touch(self, obs, data_pre):
        """Replace touch entries by the sensor values computed during the last physics substep."""
        if not self.touch_sensors:
            return obs
        obs = collections.OrderedDict(obs)
        obs["touch"] = jnp.concatenate([data_pre.sensordata[a:a + n] for a, n in self._touch_adr])
        obs["touch"] = jnp.log1p(obs["touch"])
        return obs

    def get_obs(self, data: mjx.Data, info: Mapping[str, Any], data_pre: mjx.Data | None = None) -> jax.Array:
        """Flat float32 observation at a forwarded ``data`` (touch from ``data_pre`` when given)."""
        obs = self.observation(data, info)
        if data_pre is not None:
            obs = self._with_touch(obs, data_pre)
        return flatten_obs(obs)

    def control_step(self, data: mjx.Data, ctrl: jax.Array, model: mjx.Model | None = None
                     ) -> tuple[mjx.Data, mjx.Data]:
        """One dm_control control step: ``n_sub_steps`` physics steps with ``ctrl`` (``model``: see ``forward``).

        Returns ``(data_pre, data)``: the raw data after the last ``mjx.step`` (its sensors belong to the
        state one physics step earlier, as in dm_control) and the same state forwarded.
        """
        model = self._mjx_model if model is None else model
        data = data.replace(ctrl=ctrl)

        def body(d, _):
            return mjx.step(model, d), None

        data_pre, _ = jax.lax.scan(body, data, None, length=self._n_sub_steps)
        return data_pre, self.forward(data_pre, model)

    def finish_reset(self, data: mjx.Data, model: mjx.Model | None = None) -> mjx.Data:
        """The physics that turns :meth:`initial_state`'s data into the episode's first state (default: forward).

        Kept apart from :meth:`initial_state` so that tasks sharing one physics structure run it once for all
        of them (``envs.structure``); ``model`` as in :meth:`forward`.
        """
        return self.forward(data, model)

    def reset(self, rng: jax.Array) -> State:
        data, info = self.initial_state(rng, self.make_data())
        return first_state(self.finish_reset(data), info, self.get_obs)

    def step(self, state: State, action: jax.Array) -> State:
        return advance(state, self.scale_action(action), self.control_step, self.reward, self.get_obs,
                       self._config.action_repeat)

    # ----------------------------------------------------------------------------------------------------
    # MjxEnv interface.

    @property
    def xml_path(self) -> str:
        return f"<{self.name}: built from the installed dm_control package>"

    @property
    def action_size(self) -> int:
        return int(self._mj_model.nu)

    @property
    def observation_size(self) -> int:
        return int(self.reset_shape.obs.shape[-1])

    @property
    def reset_shape(self) -> State:
        """The abstract :class:`State` a reset returns (``jax.eval_shape``; traced once, then remembered).

        Traced without :meth:`finish_reset`: that physics (a forward pass, or a settling rollout) fills the data
        it is given and returns data of the same shapes, and tracing it is most of a reset's trace (building the
        30 MT30 tasks' MJX models took 32-33 s with it on a 2-core CPU, 12 s without).
        ``tests/envs/test_envs.py`` checks the shapes against a full reset's for one task of every physics family."""
        if self._reset_shape is None:
            def unfinished_reset(rng):
                data, info = self.initial_state(rng, self.make_data())
                return first_state(data, info, self.get_obs)

            self._reset_shape = jax.eval_shape(unfinished_reset, jax.random.key(0))
        return self._reset_shape

    @property
    def episode_length(self) -> int:
        """Agent steps per episode (``config.episode_length``; TD-MPC2: 500)."""
        return int(self._config.episode_length)

    @property
    def impl(self) -> str:
        """The MJX implementation this env runs on: 'jax' or 'warp'."""
        return str(self._config.impl)

    @property
    def mj_model(self) -> mujoco.MjModel:
        return self._mj_model

    @property
    def mjx_model(self) -> mjx.Model:
        return self._mjx_model

    @property
    def n_sub_steps(self) -> int:
        return self._n_sub_steps
