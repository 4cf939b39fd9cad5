"""TensorFlow imported without its C++ start-up logs, and kept off the GPUs.

TensorFlow only feeds data here (seqio, tf.data). Its C++ runtime logs before
absl's logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide those lines:
the oneDNN notice, the CUDA stub probe and, on machines without a GPU, an
`E0000 ... failed call to cuInit` line that reads like an error and is not one.
The import and TensorFlow's device set-up run with file descriptor 2 sent to a
temporary file; afterwards every captured line that is not one of those known
start-up notices is written back to stderr, so real problems stay visible.
"""

import contextlib
import os
import re
import sys

from gqa_jax import native_stderr

# absl-format INFO/WARNING lines, CUDA-probe errors, and the two plain-text notices.
_NOISE = re.compile(
    r'^([IW]\d{4} \d\d:\d\d:\d\d'
    r'|E\d{4} \d\d:\d\d:\d\d.*\b(cuInit|cuda\w*|cudart\w*|CUDA)\b'
    r'|WARNING: All log messages before absl::InitializeLog\(\) is called'
    r'|To enable the following instructions:)')


def is_noise(line: str) -> bool:
  return not line.strip() or bool(_NOISE.match(line))


@contextlib.contextmanager
def _filtered_stderr():
  """Captures what C++ code writes to fd 2 and replays all but the known notices."""
  output = None
  try:
    with native_stderr.captured() as output:
      yield
  finally:
    for line in (output.text if output else '').splitlines():
      if not is_noise(line):
        print(line, file=sys.stderr)


def import_tensorflow():
  """`tensorflow`, imported quietly on first use, with no GPU visible to it."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # the logs after absl starts
  with _filtered_stderr():
    import tensorflow as tf
    try:  # leave the GPUs (and their memory) to JAX; this also runs TF's CUDA probe here
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TensorFlow's devices were initialised before this import
      pass
  return tf
