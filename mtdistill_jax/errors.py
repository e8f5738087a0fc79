"""Errors a user can act on, kept apart from bugs.

The library raises :class:`UserError` (or a subclass) where it rejects what a user gave it: a flag value, a
path, a task name, a config field, the content of a file (corrupt checkpoint, shapes that fit no model).
Its message is complete on its own: it names the file / field / value and says what was expected (for
names: the valid ones). ``launch/`` mains (through :func:`mtdistill_jax.cli.run`) print such errors as one
line without a traceback; any other exception is treated as a bug and keeps its traceback.

``UserError`` is a ``ValueError`` so callers that catch ``ValueError`` keep working. This module imports
nothing, so every layer (configs, checkpoint, data, envs) can raise these errors.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user asked for or gave is not usable; the message says what and how to fix it."""


class UnknownNameError(UserError, KeyError):
    """An unknown name (task, task set, ...); the message lists the valid ones. Also a ``KeyError``."""

    def __str__(self) -> str:  # KeyError would show the repr of the message, quotes and \n included
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
