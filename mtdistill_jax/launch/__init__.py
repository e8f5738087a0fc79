"""The bodies of the ``launch/`` mains, importable and installed as console entry points (setup.py):
``mtdistill-evaluate`` (:mod:`.evaluate`), ``mtdistill-convert`` (:mod:`.convert`), ``mtdistill-train``
(:mod:`.train`), ``mtdistill-distill`` (:mod:`.distill`), ``mtdistill-download`` (:mod:`.download`);
:mod:`.common` holds what the offline mains share (flags, one run, the final export). ``launch/*.py`` are thin
wrappers, so ``python launch/x.py`` keeps working. Each module defines its absl flags on import: import one per
process."""
