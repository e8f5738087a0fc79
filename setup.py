"""mtdistill-jax: TD-MPC2 world models, MPPI planning and distillation in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

# Version ranges were tested together (jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8,
# chex 0.1.92, ml-collections 1.1.0, numpy 2.4.6 on CPython 3.11). Upper bounds stop an untested major
# release from changing numerics or APIs under our users.
INSTALL_REQUIRES = [
    "jax>=0.6,<0.11",
    "flax>=0.10.6,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.89,<0.2",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "ml_dtypes>=0.5",  # bfloat16 numpy dtype for the .pt reader (already required by jax)
    # Simulation: one mutually compatible set, pinned exactly because the pieces move in lockstep.
    # - mujoco-mjx X requires mujoco >= X, and a fresh resolve pairs the newest mujoco (4.0) with mjx 3.17;
    # - dm_control 1.0.50 (whose task XMLs we load) is the release built against mujoco 3.17 (its index tables
    #   break on mujoco 4.0, which removed MjModel/MjData fields);
    # - playground 0.2.0 (MjxEnv base class, jnp tolerance) needs mujoco/mjx >= 3.6; its own reacher compares
    #   version strings and breaks on 3.17, which is why our reacher is our own.
    "mujoco==3.17.0",
    "mujoco-mjx==3.17.0",
    "dm_control==1.0.50",
    "playground==0.2.0",
    "mediapy>=1.2,<2",  # mp4 writing of rendered episodes
    "imageio-ffmpeg>=0.5,<1",  # an ffmpeg binary for mediapy when the system has none
    "matplotlib>=3.7,<4",  # per-task bar charts of evaluations
    "tqdm>=4.66,<5",  # evaluation and training progress bars with rate and ETA (tested with 4.70.1)
    "tensorboardX>=2.6,<3",  # TensorBoard event files of training metrics, no TensorFlow needed (tested with 2.6.5)
]

# `python launch/x.py` and these commands run the same mains (mtdistill_jax/launch/).
ENTRY_POINTS = {"console_scripts": [
    "mtdistill-evaluate = mtdistill_jax.launch.evaluate:entry_point",
    "mtdistill-convert = mtdistill_jax.launch.convert:entry_point",
    "mtdistill-train = mtdistill_jax.launch.train:entry_point",
    "mtdistill-distill = mtdistill_jax.launch.distill:entry_point",
    "mtdistill-import-dataset = mtdistill_jax.launch.import_dataset:entry_point",
    "mtdistill-download = mtdistill_jax.launch.download:entry_point",
    "mtdistill-collect = mtdistill_jax.launch.collect:entry_point",
]}

EXTRAS = {
    # Only needed to write official-format .pt files or to cross-check the torch-free reader. Pinned: an
    # unpinned torch pulls the CUDA build (gigabytes); 2.13.0 resolves to the local CPU build.
    "torch": ["torch==2.13.0"],
    # benchmarks/compare_official.py runs the official PyTorch TD-MPC2 (a checkout the user gives) beside ours
    # (gymnasium: the official dm_control wrappers of the evaluation row, gym.Wrapper around a non-gym env with
    # 4-tuple steps, run on 0.29.1, the release the official environment file names)
    "official": ["torch==2.13.0", "tensordict==0.8.3", "pyyaml>=6,<7", "gymnasium==0.29.1"],
    # nbclient/nbformat/ipykernel execute experiments/*.ipynb in the test suite; pytest < 9.2: from 9.2 on,
    # xdist's `--dist loadgroup` (make test) silently stops grouping (pytest-xdist issue 1386)
    "dev": ["pytest>=8,<9.2", "pytest-xdist>=3.5,<4", "ruff>=0.6,<1", "nbclient>=0.10,<1", "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8"],
}

setup(
    name="mtdistill-jax",
    version="0.1.0",
    description="TD-MPC2 world models, MPPI planning and teacher-student distillation in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mtdistill_jax", "mtdistill_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points=ENTRY_POINTS,
    license="MIT",
)
