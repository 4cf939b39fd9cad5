"""seqio tasks for gqa_jax. Importing this package registers them.

Built-in, offline (gqa_jax.data.builtin): gqa_builtin_span_corruption,
gqa_builtin_docstring, gqa_builtin_mixture — shipped data and vocabulary.
The paper's (gqa_jax.data.paper): gqa_c4_span_corruption, gqa_cnn_dailymail,
gqa_arxiv, gqa_pubmed, gqa_multi_news, gqa_mediasum, gqa_wmt14_en_de,
gqa_trivia_qa, gqa_trivia_qa_nocontext — TFDS / JSONL data you prepare, T5's
vocabulary.

`check_task(name, split)` refuses an unknown task or split (and MediaSum's missing
files) with a one-line ConfigError before any work; `get_dataset(...)` gives resumable NumPy batches in T5X's format
(gqa_jax.data.pipeline).
"""

from gqa_jax.data import quiet_tf

quiet_tf.import_tensorflow()  # before seqio, tfds or the modules below load TensorFlow

from gqa_jax.data import builtin, metrics, paper, pipeline, preprocessors, vocab  # noqa: E402
from gqa_jax.data.pipeline import DataIterator, get_dataset  # noqa: E402
from gqa_jax.data.registry import check_task, check_vocabulary, data_errors  # noqa: E402

builtin.register()
paper.register_paper_tasks()

__all__ = ['DataIterator', 'check_task', 'check_vocabulary', 'data_errors', 'get_dataset',
           'builtin', 'metrics', 'paper', 'pipeline', 'preprocessors', 'vocab']
