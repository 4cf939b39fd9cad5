"""What C++ libraries write to file descriptor 2, captured instead of shown.

TensorFlow (gqa_jax.data.quiet_tf) and libtpu (gqa_jax.preflight) log from C++ when they
start, before any Python logging can be configured, so only the file descriptor can be
redirected. Kept apart from both so that neither import pulls in the other.
"""

import contextlib
import os
import sys
import tempfile
import types


@contextlib.contextmanager
def captured():
  """Sends fd 2 to a temporary file while the block runs; the yielded namespace's `text`
  holds what was written there once the block ends (also when it raises)."""
  result = types.SimpleNamespace(text='')
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as file:
    os.dup2(file.fileno(), 2)
    try:
      yield result
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      file.seek(0)
      result.text = file.read().decode(errors='replace')
