"""`python -m gqa_jax.cli ARGS`: the `gqa-jax` command without the installed script."""

import sys

from gqa_jax.cli import main

if __name__ == '__main__':
  sys.exit(main())
