"""Convert agents: official .pt -> agent export, dtype transforms, export -> official .pt, inspection.

  python launch/convert.py --from_torch=model.pt --out=exports/student [--dtype=float16]
  python launch/convert.py --from=exports/student --dtype=int8 --out=exports/student_int8
  python launch/convert.py --from=exports/student --to_torch=student.pt [--torch_format=current]
  python launch/convert.py --inspect=exports/student_int8        (or --inspect=model.pt)

Every conversion prints a before/after size table. Loading a .pt never executes code from the file.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtdistill_jax.checkpoint import convert, transforms  # noqa: E402
from mtdistill_jax.checkpoint.export import ExportError  # noqa: E402
from mtdistill_jax.checkpoint.tdmpc2_torch import TORCH_FORMATS, CheckpointMismatchError  # noqa: E402
from mtdistill_jax.checkpoint.torch_pickle import CheckpointFormatError, UnsafePickleError  # noqa: E402

flags.DEFINE_string("from_torch", None, "official TD-MPC2 / td-mpc-opt .pt to import (either key format)")
flags.DEFINE_string("from", None, "agent export directory to convert")
flags.DEFINE_enum("dtype", None, list(transforms.DTYPES), "storage dtype of the output export")
flags.DEFINE_string("out", None, "output agent export directory")
flags.DEFINE_string("to_torch", None, "write the agent as an official-format .pt at this path")
flags.DEFINE_enum("torch_format", "current", list(TORCH_FORMATS), "key format of --to_torch")
flags.DEFINE_string("inspect", None, "print parameter counts, dtypes and sizes of an export or .pt")
flags.DEFINE_bool("overwrite", False, "replace an existing --out export")
flags.DEFINE_integer("model_size", None, "with --from_torch: force the model size (default: from shapes)")
flags.DEFINE_string("task_set", None, "with --from_torch: force the task set (default: from shapes)")
FLAGS = flags.FLAGS

KNOWN_ERRORS = (ExportError, CheckpointMismatchError, CheckpointFormatError, UnsafePickleError, ValueError,
                FileExistsError, FileNotFoundError, ImportError)


def run() -> str:
    src_dir, src_pt = FLAGS["from"].value, FLAGS.from_torch
    if FLAGS.inspect:
        if src_dir or src_pt or FLAGS.out or FLAGS.to_torch:
            raise app.UsageError("--inspect takes no other input/output flag")
        return convert.inspect(FLAGS.inspect)
    if bool(src_dir) == bool(src_pt):
        raise app.UsageError("give exactly one of --from_torch=FILE.pt or --from=EXPORT_DIR (or --inspect=PATH)")
    if not FLAGS.out and not FLAGS.to_torch:
        raise app.UsageError("give --out=DIR (agent export) and/or --to_torch=FILE.pt")
    reports = []
    source = src_dir
    if src_pt:
        if not FLAGS.out:
            raise app.UsageError("--from_torch needs --out=DIR")
        reports.append(convert.import_torch(src_pt, FLAGS.out, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                                            model_size=FLAGS.model_size, task_set=FLAGS.task_set))
        source = FLAGS.out
    elif FLAGS.out:
        if not FLAGS.dtype:
            raise app.UsageError("--from with --out needs --dtype={float32,bfloat16,float16,int8}")
        reports.append(convert.convert_dtype(src_dir, FLAGS.out, FLAGS.dtype, overwrite=FLAGS.overwrite))
        source = FLAGS.out
    elif FLAGS.dtype:
        raise app.UsageError("--dtype needs --out=DIR to write the converted export")
    if FLAGS.to_torch:
        reports.append(convert.export_torch(source, FLAGS.to_torch, key_format=FLAGS.torch_format))
    return "\n\n".join(reports)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every read/write at INFO through absl
    try:
        print(run())
    except KNOWN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
