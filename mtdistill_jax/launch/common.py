"""What the offline launch mains share (``launch/train.py``, ``launch/distill.py``): flags, data, one run.

A main defines its ``--config`` flag, calls :func:`define_flags` (``--workdir``, ``--data``, ``--save_every``,
``--keep``, ``--data_in_memory``, ``--eval_every``, ``--eval_tasks``, ``--eval_episodes``, ``--eval_policy``,
``--eval_mode``, ``--eval_episode_length``, ``--to_torch``,
``--progress``) and, in ``main``::

    options = common.options_from_flags(FLAGS.config)      # every flag checked (usage errors), nothing loaded
    ... build update_fn / init_state / aux (e.g. load a teacher) ...
    common.run(FLAGS.config, options, update_fn=..., init_state=..., aux=..., program="mtdistill-distill")

:func:`run` loads the data (NaN/inf rejected), trains with :func:`~mtdistill_jax.tdmpc2.offline.train_offline`
(progress bar, ``metrics.csv`` + ``tb/`` in the workdir, evaluation every ``eval_every`` steps and at the end)
and, when the run finished (not preempted), writes the final agent as an agent export to ``<workdir>/agent``
(world-model params only: keys of the state's params that are not part of the WorldModel tree, e.g. a
``'distill'`` head, are left out) and, with ``to_torch``, as an official-format ``.pt``. The run's config is
in ``<workdir>/config.json``. Whatever metric names the update returns are logged as they are.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from mtdistill_jax import cli
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import world_model_keys, world_model_params

FLAGS = flags.FLAGS
AGENT_DIR = "agent"  # <workdir>/agent: the agent export written at the end of a finished run
DEFAULT_EVAL_TASKS = 3  # --eval_tasks default: this many tasks of the data (that have an MJX environment)

_defined = False


def define_flags(*, save_every: int = 10_000) -> None:
    """Define the shared flags (once per process; ``--config`` is the main's own). ``save_every``: default of
    ``--save_every``."""
    global _defined
    if _defined:
        return
    _defined = True
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.csv, tb/, config.json, agent/",
                        required=True)
    flags.DEFINE_list("data", None, "offline configs: official dataset chunk files (globs allowed; loaded into "
                      "device memory) or one native dataset directory (with manifest.json; memory-mapped, any size, "
                      "see mtdistill-import-dataset); an online config collects its own data")
    flags.DEFINE_bool("data_in_memory", False, "with a native dataset: copy it into device memory and sample it "
                      "inside the compiled loop (the same batches as host sampling; faster for datasets that fit)")
    flags.DEFINE_integer("save_every", save_every, "steps between checkpoints", lower_bound=1)
    flags.DEFINE_integer("keep", 3, "checkpoints kept on disk", lower_bound=1)
    flags.DEFINE_integer("eval_every", 0, "steps between evaluations in MJX (and one at the end); 0: no evaluation",
                         lower_bound=0)
    flags.DEFINE_list("eval_tasks", None, f"tasks to evaluate (default: the first {DEFAULT_EVAL_TASKS} tasks of the "
                      "data that have an MJX environment)")
    flags.DEFINE_integer("eval_episodes", 2, "episodes per evaluated task", lower_bound=1)
    flags.DEFINE_enum("eval_policy", "planner", ["planner", "prior"], "act in evaluations with the planner (MPPI, "
                      "official protocol) or the policy prior alone (one forward per step: far cheaper on CPU)")
    flags.DEFINE_string("eval_mode", None, "action mode of the evaluations: planner sample (default, official) / "
                        "elite / mean; prior sample / mean (default, official eval_mode)")
    flags.DEFINE_integer("eval_episode_length", None, "agent steps per evaluation episode (default: the task "
                         "set's, MT30 500 = official; less only for quick looks)", lower_bound=1)
    flags.DEFINE_string("to_torch", None, "also write the final agent as an official-format .pt at this path "
                        "(needs torch)")
    flags.DEFINE_bool("progress", True, "progress bar with rate and ETA on stderr")


@dataclasses.dataclass
class RunOptions:
    """Everything of an offline run that is not the config (the flags of :func:`define_flags`)."""

    workdir: str  # run directory (checkpoints, metrics, exports)
    data: list[str] | None  # dataset chunk files (globs expanded, see data_paths) or one native dataset dir;
    # None for an online run
    save_every: int = 10_000  # steps between checkpoints
    data_in_memory: bool = False  # a native dataset: load it into device memory (same batches, no host sampling)
    keep: int = 3  # checkpoints kept on disk
    eval_every: int = 0  # steps between evaluations (and one at the end); 0: no evaluation
    eval_tasks: list[str] | None = None  # None: the first DEFAULT_EVAL_TASKS tasks of the data with an env
    eval_episodes: int = 2  # episodes per evaluated task
    eval_episode_length: int | None = None  # None: the task set's (MT30: 500)
    eval_policy: str = "planner"  # evaluations act with the planner or the policy prior ("prior")
    eval_mode: str | None = None  # None: "sample" for the planner (official), "mean" for the prior (eval_mode)
    to_torch: str | None = None  # also write the final agent as an official .pt here
    progress: bool = True  # tqdm bar on stderr


def data_paths(patterns: Sequence[str]) -> list[str]:
    """The files named by ``patterns`` (globs expanded, sorted), or one native dataset directory (a directory
    with ``manifest.json``); a pattern matching nothing and naming no file raises ``FileNotFoundError``, a
    directory that is no dataset or a dataset mixed with other inputs a ``UserError`` (one line from
    :mod:`mtdistill_jax.cli`)."""
    from mtdistill_jax.data.native import MANIFEST, is_dataset_dir

    paths = sorted(p for pattern in patterns for p in (glob.glob(pattern) or [pattern]))
    dirs = [p for p in paths if os.path.isdir(p)]
    if dirs:
        plain = [d for d in dirs if not is_dataset_dir(d)]
        if plain:
            raise UserError(f"--data={plain[0]} is a directory without {MANIFEST}: not a native dataset (convert "
                            "official chunks with mtdistill-import-dataset, or give the chunk files)")
        if len(paths) > 1:
            raise UserError(f"--data: give one native dataset directory alone, got {', '.join(paths)}")
        return paths
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), ", ".join(missing))
    return paths


def is_online(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is an online config (``configs/online.py``: it has an ``online`` section)."""
    return config.get("online") is not None


def options_from_flags(config: ml_collections.ConfigDict, check: Callable = check_config) -> RunOptions:
    """Check the config (with ``check``, e.g. the distillation config's) and the shared flags (a
    :class:`cli.UsageError` naming the flag, or ``FileNotFoundError`` for a missing data file) before anything
    is loaded; returns the run's options. An online config (:func:`is_online`) needs no ``--data`` and takes
    none; an offline one needs it."""
    try:
        check(config)
    except UserError as e:
        raise cli.UsageError(f"--config: {e}") from e
    online = is_online(config)
    if not online and not FLAGS.data:
        raise cli.UsageError("missing required flag --data (an offline config trains on a dataset; launch/train.py "
                             "with --config=mtdistill_jax/configs/online.py trains online instead)")
    if online:
        for name in ("data", "data_in_memory"):
            if FLAGS[name].present:
                raise cli.UsageError(f"--{name} is given but the config is an online one (it collects its own data "
                                     "in its envs); drop it, or give an offline config")
        from mtdistill_jax.configs.online import num_envs

        m = num_envs(config)
        for name in ("save_every", "eval_every"):
            if FLAGS[name].value % m:
                raise cli.UsageError(f"--{name}={FLAGS[name].value} is not a multiple of the {m} envs of the config "
                                     "(online runs count env steps, all envs together)")
    cli.check_output_dir(FLAGS.workdir, "workdir")
    if FLAGS.to_torch:
        cli.check_torch_output(FLAGS.to_torch)
    for name in ("eval_tasks", "eval_mode"):
        if FLAGS[name].value and not FLAGS.eval_every:
            raise cli.UsageError(f"--{name} is given but --eval_every=0 (no evaluation); give --eval_every=N")
    if FLAGS["eval_policy"].present and not FLAGS.eval_every:
        raise cli.UsageError("--eval_policy is given but --eval_every=0 (no evaluation); give --eval_every=N")
    if FLAGS.eval_every:
        from mtdistill_jax.evaluate import check_eval_args

        try:  # names, episodes and length against the task set, before any data is read
            check_eval_args(config.model.task_set, FLAGS.eval_tasks or None, FLAGS.eval_episodes, "sample", 1,
                            FLAGS.eval_episode_length)
        except UserError as e:
            raise cli.UsageError(f"--eval_tasks: {e}") from e
        from mtdistill_jax.tdmpc2.planner import MODES, PRIOR_MODES

        modes = MODES if FLAGS.eval_policy == "planner" else PRIOR_MODES
        if eval_mode_of(FLAGS.eval_policy, FLAGS.eval_mode) not in modes:
            raise cli.UsageError(f"--eval_mode={FLAGS.eval_mode}: the {FLAGS.eval_policy} acts in one of "
                                 f"{', '.join(modes)}")
    return RunOptions(workdir=FLAGS.workdir, data=None if online else data_paths(FLAGS.data),
                      data_in_memory=FLAGS.data_in_memory,
                      save_every=FLAGS.save_every,
                      keep=FLAGS.keep, eval_every=FLAGS.eval_every, eval_tasks=FLAGS.eval_tasks or None,
                      eval_episodes=FLAGS.eval_episodes, eval_episode_length=FLAGS.eval_episode_length,
                      eval_policy=FLAGS.eval_policy, eval_mode=FLAGS.eval_mode,
                      to_torch=FLAGS.to_torch, progress=FLAGS.progress)


# -------------------------------------------------------------------------------------------- evaluation
def eval_mode_of(policy: str, mode: str | None) -> str:
    """The action mode of an evaluation: ``mode``, or the default of ``policy`` (planner: ``'sample'``, the
    official evaluate.py; prior: ``'mean'``, the official ``eval_mode=True``)."""
    return mode or ("sample" if policy == "planner" else "mean")


def default_eval_tasks(task_set: str, task_ids, n: int = DEFAULT_EVAL_TASKS) -> list[str]:
    """The first ``n`` tasks (in task-set order) among ``task_ids`` (e.g. the data's ``task`` [E]) that have an
    MJX environment; a ``UserError`` when there is none."""
    from mtdistill_jax.configs.tasks import get_task_set
    from mtdistill_jax.envs.registry import task_names

    ts = get_task_set(task_set)
    present = [ts.tasks[i] for i in sorted({int(i) for i in np.asarray(task_ids).ravel()})]
    tasks = [t for t in present if t in task_names()][:n]
    if not tasks:
        raise UserError(f"none of the data's tasks ({', '.join(present)}) has an MJX environment to evaluate; give "
                        f"--eval_tasks (one of {', '.join(task_names())}) or --eval_every=0")
    return tasks


EVAL_DIR = "eval"  # <workdir>/eval/step_<step>.json: the full result of each evaluation of a run


def eval_result_name(step: int) -> str:
    """File name of the evaluation result at ``step`` in a run's ``eval/`` directory."""
    return f"step_{int(step):09d}.json"


def eval_metrics(result) -> dict[str, float]:
    """``eval/<task>/return`` (mean episode return) per task and ``eval/score`` (normalized score) of an
    :class:`~mtdistill_jax.evaluate.EvalResult`."""
    out = {f"eval/{t}/return": float(r.mean()) for t, r in zip(result.tasks, result.returns, strict=True)}
    out["eval/score"] = result.normalized_score
    return out


def make_eval_fn(config: ml_collections.ConfigDict, tasks: Sequence[str] | None, episodes: int = 2, *,
                 seed: int | None = None, mode: str = "sample", episode_length: int | None = None,
                 policy: str = "planner", results_dir: str | None = None) -> Callable[[Any, int], dict[str, float]]:
    """``eval_fn(state, step) -> {eval/<task>/return, eval/score}`` for ``train_offline``: the evaluation of
    :func:`mtdistill_jax.evaluate.evaluate` (same program, protocol and numbers for the same seed, ``policy``
    and ``mode``) on the world-model part of ``state.params`` (see :func:`world_model_params`).

    The program is built and compiled at the first call and reused (:func:`~mtdistill_jax.evaluate.program.
    compiled_program`). Every call uses the same seed (default ``config.seed``), so evaluations at different
    steps see the same initial states and differ only through the params. With ``results_dir``, each
    evaluation's full result (every episode's return) is also written there as ``step_<step>.json``
    (:meth:`~mtdistill_jax.evaluate.EvalResult.save`).
    """
    from mtdistill_jax.evaluate import EvalResult, check_eval_args, episode_length_of
    from mtdistill_jax.evaluate.program import compiled_program

    task_set = config.model.task_set
    tasks = check_eval_args(task_set, tasks, episodes, mode, 1, episode_length, policy)
    length = episode_length_of(task_set, tasks, episode_length)
    seed = config.seed if seed is None else int(seed)
    keys = world_model_keys(config.model)

    def eval_fn(state, step: int) -> dict[str, float]:
        params = world_model_params(state.params, config.model, keys)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        env, init, run, _ = compiled_program(config, tasks, episodes, mode, length, length, params=params,
                                             policy=policy)
        t = time.perf_counter()
        carry, _ = run(params, init(jax.random.key(seed)))
        returns = np.asarray(carry.returns, np.float64).reshape(len(tasks), episodes)
        result = EvalResult(tasks=list(tasks), returns=returns, mode=mode if policy == "planner" else
                            f"{policy}/{mode}", seconds=time.perf_counter() - t, compile_seconds=0.0,
                            plan_calls=length * env.num_envs, seeds=(seed,), episode_length=length)
        if results_dir is not None:
            os.makedirs(results_dir, exist_ok=True)
            result.save(os.path.join(results_dir, eval_result_name(step)))
        return eval_metrics(result)

    return eval_fn


def eval_fn_of(config: ml_collections.ConfigDict, options: RunOptions, tasks: Sequence[str], *,
               episode_length: int | None = None, unit: str = "steps") -> Callable[[Any, int], dict[str, float]]:
    """The evaluation of a run's options (:func:`make_eval_fn` on ``tasks`` with ``options.eval_episodes``,
    ``eval_policy``/``eval_mode``, results in ``<workdir>/eval``); ``episode_length`` defaults to
    ``options.eval_episode_length``."""
    mode = eval_mode_of(options.eval_policy, options.eval_mode)
    eval_fn = make_eval_fn(config, tasks, options.eval_episodes,
                           episode_length=episode_length or options.eval_episode_length,
                           policy=options.eval_policy, mode=mode, results_dir=os.path.join(options.workdir, EVAL_DIR))
    logging.info("evaluating %s (%d episodes each, %s/%s) every %d %s and at the end", ", ".join(tasks),
                 options.eval_episodes, options.eval_policy, mode, options.eval_every, unit)
    return eval_fn


# ------------------------------------------------------------------------------------------------ export
def export_agent(state, config: ml_collections.ConfigDict, workdir: str, *, to_torch: str | None = None,
                 source: str = "", how: str = "") -> dict[str, str]:
    """Write the learner's world model (``state.params`` restricted to the WorldModel tree, float32, and
    ``state.target_q_params``) as an agent export ``<workdir>/agent`` (replacing an earlier export there) and,
    with ``to_torch``, as an official-format ``.pt``. ``how`` says how it was trained in the export's notes
    (default: offline, ``state.step`` updates). Returns ``{"agent": dir[, "torch": path]}``."""
    from mtdistill_jax.checkpoint.convert import export_torch
    from mtdistill_jax.checkpoint.export import AgentExport, save_agent
    from mtdistill_jax.tdmpc2.offline import CONFIG_FILE

    step = int(state.step)
    params = jax.device_get(world_model_params(state.params, config.model))
    export = AgentExport(config=config.model, params=params, target_q_params=jax.device_get(state.target_q_params),
                         source=source or f"{os.path.abspath(workdir)} (step {step})",
                         notes=[f"{how or f'trained offline for {step} updates'}; run config in {CONFIG_FILE} beside "
                                "this directory"])
    paths = {"agent": save_agent(os.path.join(workdir, AGENT_DIR), export, overwrite=True)}
    if to_torch:
        try:
            logging.info("%s", export_torch(paths["agent"], to_torch))
        except ImportError as e:
            raise UserError(f"--to_torch={to_torch}: {e}") from e
        paths["torch"] = os.path.abspath(to_torch)
    return paths


# --------------------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, options: RunOptions, *, update_fn: Callable | None = None,
        init_state: Callable | None = None, aux: Any = None, aux_specs: Callable | None = None,
        program: str = "mtdistill-train", compiler_options: dict | None = None):
    """Load ``options.data`` (chunk files: into device memory; a native dataset directory: opened
    memory-mapped and sampled on the host), train (or resume) to ``config.steps`` with
    :func:`~mtdistill_jax.tdmpc2.offline.train_offline` and, unless preempted, export the agent; returns its
    :class:`~mtdistill_jax.tdmpc2.offline.RunResult`.

    ``update_fn`` / ``init_state`` / ``aux`` go to ``train_offline`` unchanged (default: the TD-MPC2 update on
    a fresh TrainingState). With more than one device (all of ``jax.devices()``, every host of a pod) the run
    is data-parallel: the batch is split over a 1-D ``data`` mesh, the learner replicated, and ``aux``
    replicated or laid out by ``aux_specs(mesh)`` (PartitionSpecs, e.g. a sharded teacher). ``program``
    names the run in the export's ``source``. ``compiler_options``: XLA options of the training program (e.g. a
    bf16 teacher's, :func:`mtdistill_jax.distill.step.compiler_options`).
    """
    from mtdistill_jax.configs.tasks import get_task_set
    from mtdistill_jax.data.native import is_dataset_dir, open_dataset
    from mtdistill_jax.data.offline import OfflineSampler
    from mtdistill_jax.data.tdmpc2_format import load_chunks
    from mtdistill_jax.tdmpc2.offline import train_offline

    check_config(config)
    paths = data_paths(options.data)
    ts = get_task_set(config.model.task_set)
    if len(paths) == 1 and is_dataset_dir(paths[0]):
        data = open_dataset(paths[0])  # manifest + memory maps only
        if data.task_set.name != ts.name:
            raise UserError(f"--data={paths[0]} holds task set {data.task_set.name}; the config's model.task_set is "
                            f"{ts.name} (--config.model.task_set={data.task_set.name}, or another dataset)")
        logging.info("devices: %s", jax.devices())
        logging.info("native dataset %s", data)
        if options.data_in_memory:  # the in-memory sampler draws the host sampler's batches: the same run
            data = OfflineSampler(config.train.batch_size, config.train.horizon, ts.obs_pad,
                                  ts.action_pad).load(data.to_episodes())
    else:
        episodes = load_chunks(paths)  # a bad file stops the run before anything is logged
        logging.info("devices: %s", jax.devices())
        logging.info("%d episodes of %d frames from %d file(s)", episodes.num_episodes, episodes.num_frames,
                     len(paths))
        sampler = OfflineSampler(config.train.batch_size, config.train.horizon, ts.obs_pad, ts.action_pad)
        data = sampler.load(episodes)  # checked (shapes, NaN/inf) and copied to the device once
        del episodes
    eval_fn = None
    if options.eval_every:
        eval_fn = eval_fn_of(config, options, options.eval_tasks or default_eval_tasks(ts.name, data.task))
    mesh = specs = None
    if jax.device_count() > 1:
        from mtdistill_jax.parallel import make_mesh

        mesh = make_mesh()
        if config.train.batch_size % mesh.devices.size:
            raise UserError(f"config field train.batch_size {config.train.batch_size} is not divisible by the "
                            f"{mesh.devices.size} devices the run is split over")
        specs = None if aux_specs is None or aux is None else aux_specs(mesh)
        logging.info("data-parallel over %d devices (batch %d, %d per device)", mesh.devices.size,
                     config.train.batch_size, config.train.batch_size // mesh.devices.size)
    result = train_offline(config, data, options.workdir, save_every=options.save_every, keep=options.keep,
                           mesh=mesh, update_fn=update_fn, init_state=init_state, aux=aux, aux_specs=specs,
                           eval_every=options.eval_every,
                           eval_fn=eval_fn, metrics_dir=options.workdir, progress=options.progress,
                           compiler_options=compiler_options)
    start = f"resumed from {result.resumed_from}" if result.resumed_from is not None else "fresh run"
    if result.preempted:
        logging.info("preempted at step %d (%s); run the same command again to resume", result.step, start)
        return result
    written = export_agent(result.state, config, options.workdir, to_torch=options.to_torch,
                           source=f"{program} {os.path.abspath(options.workdir)} (step {result.step})")
    logging.info("done at step %d (%s); wrote %s", result.step, start, ", ".join(written.values()))
    return result


def run_online(config: ml_collections.ConfigDict, options: RunOptions, *, program: str = "mtdistill-train"):
    """Train (or resume) online to ``config.steps`` env steps with
    :func:`~mtdistill_jax.tdmpc2.online.train_online` (progress bar, ``metrics.csv`` + ``tb/`` in the workdir,
    evaluation every ``eval_every`` env steps and at the end, on the config's tasks unless ``eval_tasks`` says
    otherwise, episodes as long as the training ones unless ``eval_episode_length`` says otherwise) and, unless
    preempted, export the agent; returns the :class:`~mtdistill_jax.tdmpc2.online.OnlineResult`."""
    from mtdistill_jax.configs.online import check_config as check_online
    from mtdistill_jax.configs.online import task_list
    from mtdistill_jax.tdmpc2.online import train_online

    check_online(config)
    logging.info("devices: %s", jax.devices())
    if jax.device_count() > 1:
        logging.warning("online training runs on one device (%s); the other %d are idle", jax.devices()[0],
                        jax.device_count() - 1)
    eval_fn = None
    if options.eval_every:
        eval_fn = eval_fn_of(config, options, options.eval_tasks or task_list(config),
                             episode_length=options.eval_episode_length or config.online.episode_length or None,
                             unit="env steps")
    result = train_online(config, options.workdir, save_every=options.save_every, keep=options.keep,
                          eval_every=options.eval_every, eval_fn=eval_fn, metrics_dir=options.workdir,
                          progress=options.progress)
    start = f"resumed from {result.resumed_from}" if result.resumed_from is not None else "fresh run"
    if result.preempted:
        logging.info("preempted at env step %d (%s); run the same command again to resume", result.step, start)
        return result
    updates = int(result.carry.updates)
    written = export_agent(result.state, config, options.workdir, to_torch=options.to_torch,
                           source=f"{program} {os.path.abspath(options.workdir)} (env step {result.step})",
                           how=f"trained online on {', '.join(task_list(config))} for {result.step} env steps "
                               f"({updates} updates)")
    logging.info("done at env step %d, %d updates (%s); wrote %s", result.step, updates, start,
                 ", ".join(written.values()))
    return result
