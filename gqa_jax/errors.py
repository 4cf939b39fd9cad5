"""The errors that mean "the input is wrong", not "gqa_jax is broken".

Library code raises `UserInputError` (or a subclass) when a flag, a gin binding, a
file or a checkpoint is not what it should be; its message names the problem and
the fix, on one line. The command line prints that line and exits with status 2;
anything else is an unexpected error, shown with its traceback only under --debug.
"""


class UserInputError(ValueError):
  """Bad input: the message names the value, the problem and the fix."""


class ConfigError(UserInputError):
  """A gin binding or run setting that cannot work (checked before any work is done)."""


class OutputLocked(UserInputError):
  """Another process is writing the same output folder."""
