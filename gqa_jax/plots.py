"""Figures in the shape of the paper's (PNG, matplotlib's non-interactive Agg backend)."""

import textwrap
from typing import List

import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)


def decode_time_vs_kv_heads(records: List[dict], path: str, title: str = '') -> str:
  """Fig. 6: time per sample against the number of KV heads G (log2 axis), measured,
  beside the roofline prediction (encoder + T x bytes per step / bandwidth) and, when
  measured, Hugging Face transformers' MHA time."""
  rows = sorted(records, key=lambda r: r['num_kv_heads'])
  g = [r['num_kv_heads'] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  ax.plot(g, [r['time_per_sample_s'] for r in rows], 'o-', label='gqa_jax, measured')
  ax.plot(g, [r['roofline_time_per_sample_s'] for r in rows], 's--',
          label='roofline prediction (bytes / measured bandwidth)')
  if 'hf_time_per_sample_s' in rows[-1]:
    ax.plot([rows[-1]['num_kv_heads']], [rows[-1]['hf_time_per_sample_s']], 'x',
            markersize=10, label='transformers generate (MHA)')
  ax.set_xscale('log', base=2)
  ax.set_xticks(g, [str(k) for k in g])
  ax.set_xlabel('KV heads G (1 = MQA, N = MHA)')
  ax.set_ylabel('time per sample (s)')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  r = rows[0]
  ax.set_title(textwrap.fill(title, 80) if title else f'decode: input {r["input_length"]}, output {r["output_length"]}, '
               f'batch {r["batch_size"]}', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
