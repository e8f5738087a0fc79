"""Rendering MJX episodes with MuJoCo's renderer (CPU: EGL/Mesa software rendering; set ``MUJOCO_GL``).

``render_frames(env, states)`` turns a list of :class:`State` (or a State with a leading time axis) into RGB
frames; ``save_video(frames, path, fps)`` writes an mp4 with mediapy (ffmpeg from imageio-ffmpeg when the
system has none); ``rollout(env, key, policy, steps)`` runs an episode under ``jax.lax.scan``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import mujoco
import numpy as np

from mtdistill_jax.envs.base import DMCEnv, State


def _physics(s) -> dict:
    """``{'qpos', 'qvel', 'act', 'info'}`` of a :class:`State` or of a render state (already that dict)."""
    if isinstance(s, Mapping):
        return s
    return {"qpos": s.data.qpos, "qvel": s.data.qvel, "act": s.data.act, "info": s.info}


def _split_states(states) -> list[dict]:
    if isinstance(states, (list, tuple)):
        return [_physics(s) for s in states]
    states = _physics(states)
    T = states["qpos"].shape[0] if np.ndim(states["qpos"]) == 2 else None
    if T is None:
        return [states]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], states) for i in range(T)]


def render_frames(env: DMCEnv, states, height: int = 240, width: int = 320, camera: int | str = 0) -> list[np.ndarray]:
    """RGB uint8 frames [height, width, 3] of the given states (one environment, not a batch).

    ``states``: a list of :class:`State`, a State with a leading time axis, or render states
    (``{'qpos', 'qvel', 'act', 'info'}``, e.g. ``BatchedEnv.render_state``; a list, or one with a time axis).
    """
    model = env.mj_model
    data = mujoco.MjData(model)
    frames = []
    renderer = mujoco.Renderer(model, height=height, width=width)
    try:
        for s in _split_states(states):
            env.prepare_render(model, s["info"])
            data.qpos[:] = np.asarray(s["qpos"])
            data.qvel[:] = np.asarray(s["qvel"])
            if model.na:
                data.act[:] = np.asarray(s["act"])
            mujoco.mj_forward(model, data)
            renderer.update_scene(data, camera=camera)
            frames.append(renderer.render().copy())
    finally:
        renderer.close()
    return frames


def _ensure_ffmpeg():
    import mediapy

    try:
        mediapy._get_ffmpeg_path()  # noqa: SLF001 - raises when no ffmpeg is found
    except RuntimeError:
        import imageio_ffmpeg

        mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    return mediapy


def save_video(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float) -> str:
    """Write frames to an mp4 (H.264) and return the path."""
    if not frames:
        raise ValueError("no frames to write")
    mediapy = _ensure_ffmpeg()
    mediapy.write_video(os.fspath(path), list(frames), fps=fps)
    return os.fspath(path)


def rollout(env: DMCEnv, key, policy: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
            steps: int | None = None) -> State:
    """One episode (``steps`` agent steps, default the episode length) under ``lax.scan``.

    ``policy(obs, key) -> action in [-1, 1]``; default uniform random actions. Returns the states with a
    leading time axis (reset state first).
    """
    steps = int(steps or env.episode_length)
    k_reset, k_act = jax.random.split(key)

    def policy_fn(obs, k):
        if policy is None:
            return jax.random.uniform(k, (env.action_size,), minval=-1.0, maxval=1.0)
        return policy(obs, k)

    def body(s, k):
        n = env.step(s, policy_fn(s.obs, k))
        return n, n

    @jax.jit
    def run(k_reset, k_act):
        s0 = env.reset(k_reset)
        _, traj = jax.lax.scan(body, s0, jax.random.split(k_act, steps))
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), s0, traj)

    return run(k_reset, k_act)


def frame_is_blank(frame: np.ndarray) -> bool:
    """True when a frame is a single flat colour (nothing rendered)."""
    return float(np.asarray(frame, np.float32).std()) < 1.0


__all__ = ["render_frames", "rollout", "save_video", "frame_is_blank"]
