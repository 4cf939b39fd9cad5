"""gqa_jax: grouped-query attention on a T5X-compatible T5.1.1 encoder-decoder."""

__version__ = '0.1.0'
