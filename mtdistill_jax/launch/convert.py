"""Convert agents: official .pt -> agent export, dtype transforms, export -> official .pt, inspection.

``mtdistill-convert`` (console entry point) and ``python launch/convert.py`` run this module:

  python launch/convert.py --from_torch=model.pt --out=exports/student [--dtype=float16]
  python launch/convert.py --from=exports/student --dtype=int8 --out=exports/student_int8
  python launch/convert.py --from=exports/student --to_torch=student.pt [--torch_format=current]
  python launch/convert.py --inspect=exports/student_int8        (or --inspect=model.pt)

Every conversion prints a before/after size table. Loading a .pt never executes code from the file.
A bad flag or a missing, corrupt or unfitting input stops it with one `error: ...` line on stderr (exit 2:
command line, 1: inputs); MTDISTILL_TRACEBACK=1 or --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from mtdistill_jax import cli
from mtdistill_jax.checkpoint import convert, transforms
from mtdistill_jax.checkpoint.export import is_agent_dir
from mtdistill_jax.checkpoint.tdmpc2_torch import TORCH_FORMATS
from mtdistill_jax.configs.model_sizes import MODEL_SIZES
from mtdistill_jax.configs.tasks import TASK_SETS

flags.DEFINE_string("from_torch", None, "official TD-MPC2 / td-mpc-opt .pt to import (either key format)")
flags.DEFINE_string("from", None, "agent export directory to convert")
flags.DEFINE_enum("dtype", None, list(transforms.DTYPES), "storage dtype of the output export")
flags.DEFINE_string("out", None, "output agent export directory")
flags.DEFINE_string("to_torch", None, "write the agent as an official-format .pt at this path")
flags.DEFINE_enum("torch_format", "current", list(TORCH_FORMATS), "key format of --to_torch")
flags.DEFINE_string("inspect", None, "print parameter counts, dtypes and sizes of an export or .pt")
flags.DEFINE_bool("overwrite", False, "replace an existing --out export")
flags.DEFINE_enum("model_size", None, [str(s) for s in MODEL_SIZES], "with --from_torch and --task_set: force "
                  "the model size (default: from shapes)")
flags.DEFINE_enum("task_set", None, list(TASK_SETS), "with --from_torch and --model_size: force the task set "
                  "(default: from shapes)", case_sensitive=False)
FLAGS = flags.FLAGS


def check_flags() -> None:
    """Usage errors that need no file read: missing/conflicting flags, outputs that cannot be written."""
    src_dir, src_pt = FLAGS["from"].value, FLAGS.from_torch
    if FLAGS.inspect:
        if src_dir or src_pt or FLAGS.out or FLAGS.to_torch:
            raise cli.UsageError("--inspect takes no other input/output flag")
        return
    if bool(src_dir) == bool(src_pt):
        raise cli.UsageError("give exactly one of --from_torch=FILE.pt or --from=EXPORT_DIR (or --inspect=PATH)")
    if not FLAGS.out and not FLAGS.to_torch:
        raise cli.UsageError("give --out=DIR (agent export) and/or --to_torch=FILE.pt")
    if src_pt and not FLAGS.out:
        raise cli.UsageError("--from_torch needs --out=DIR")
    if src_dir and FLAGS.out and not FLAGS.dtype:
        raise cli.UsageError("--from with --out needs --dtype={float32,bfloat16,float16,int8}")
    if FLAGS.dtype and not FLAGS.out:
        raise cli.UsageError("--dtype needs --out=DIR to write the converted export")
    if (FLAGS.model_size is None) != (FLAGS.task_set is None):
        raise cli.UsageError("give both --model_size and --task_set, or neither (then they are inferred)")
    if FLAGS.model_size is not None and not src_pt:
        raise cli.UsageError("--model_size/--task_set apply to --from_torch only")
    if FLAGS.out:
        if os.path.exists(FLAGS.out) and not FLAGS.overwrite:
            raise cli.UsageError(f"--out={FLAGS.out} exists; pass --overwrite to replace it")
        if os.path.exists(FLAGS.out) and not is_agent_dir(FLAGS.out):
            raise cli.UsageError(f"--out={FLAGS.out} exists and is not an agent export; refusing to replace it")
        cli.check_output_dir(FLAGS.out, "out")
    if FLAGS.to_torch:
        cli.check_torch_output(FLAGS.to_torch)


def run() -> str:
    check_flags()
    if FLAGS.inspect:
        return convert.inspect(FLAGS.inspect)
    src_dir, src_pt = FLAGS["from"].value, FLAGS.from_torch
    model_size = None if FLAGS.model_size is None else int(FLAGS.model_size)
    reports = []
    source = src_dir
    if src_pt:
        reports.append(convert.import_torch(src_pt, FLAGS.out, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                                            model_size=model_size, task_set=FLAGS.task_set))
        source = FLAGS.out
    elif FLAGS.out:
        reports.append(convert.convert_dtype(src_dir, FLAGS.out, FLAGS.dtype, overwrite=FLAGS.overwrite))
        source = FLAGS.out
    if FLAGS.to_torch:
        reports.append(convert.export_torch(source, FLAGS.to_torch, key_format=FLAGS.torch_format))
    return "\n\n".join(reports)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every read/write at INFO through absl
    print(run())


def entry_point() -> None:
    """Console entry point ``mtdistill-convert`` (and ``python launch/convert.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
