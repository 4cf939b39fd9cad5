"""Figures in the shape of the paper's (PNG, matplotlib's non-interactive Agg backend)."""

import textwrap
from typing import List

import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)


def decode_time_vs_kv_heads(records: List[dict], path: str, title: str = '') -> str:
  """Fig. 6: time per sample against the number of KV heads G (log2 axis), measured,
  beside the roofline prediction (encoder + T x the predicted step: max of FLOPs / matmul
  rate and bytes / bandwidth), a line per
  cross-layer sharing (records with `kv_layers`) and, when measured, Hugging Face
  transformers' MHA time."""
  rows = sorted((r for r in records if not r.get('kv_layers')), key=lambda r: r['num_kv_heads'])
  g = [r['num_kv_heads'] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  ax.plot(g, [r['time_per_sample_s'] for r in rows], 'o-', label='gqa_jax, measured')
  ax.plot(g, [r['roofline_time_per_sample_s'] for r in rows], 's--',
          label='roofline prediction (max of FLOPs / matmul rate and bytes / bandwidth)'
          if 'bound' in rows[0] else 'roofline prediction (bytes / measured bandwidth)')
  for spec in dict.fromkeys(r['kv_layers'] for r in records if r.get('kv_layers')):
    shared = sorted((r for r in records if r.get('kv_layers') == spec),
                    key=lambda r: r['num_kv_heads'])
    ax.plot([r['num_kv_heads'] for r in shared], [r['time_per_sample_s'] for r in shared],
            'D:', label=f'{spec.upper()} (K/V shared across layers), measured')
  if rows and 'hf_time_per_sample_s' in rows[-1]:
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


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _panels(tasks: List[str]):
  """One panel per task, side by side."""
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), dpi=120, squeeze=False)
  return fig, list(zip(axes[0], tasks))


LOWER_IS_BETTER = ('nll',)


def _label(ax, xlabel: str, task: str, cells: List[dict], grid: bool = True):
  ax.set_xlabel(xlabel)
  metric = cells[0]['metric'] if cells else ''
  ax.set_ylabel(f'{task} {metric}' + (' (lower is better)' if metric in LOWER_IS_BETTER else ''))
  if grid:
    ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _fig3(cells: List[dict], tasks: List[str]):
  """Quality against time per sample, one line per alpha, points labelled by variant."""
  timed = [c for c in cells if c['time_per_sample_s'] and c['method'] in ('mean', 'none')]
  if not timed:
    return None
  fig, panels = _panels(tasks)
  for ax, task in panels:
    mine = [c for c in timed if c['task'] == task]
    mha_alphas = {c['alpha'] for c in mine if c['variant'] == 'MHA'}
    for alpha in sorted({c['alpha'] for c in mine}):
      # MHA belongs on every alpha's line: uptrained with the same alpha where the grid
      # has that (compute-matched), else the source model (alpha 0).
      ref = alpha if alpha in mha_alphas else 0.0
      sub = sorted((c for c in mine if (c['alpha'] == alpha and c['variant'] != 'MHA')
                    or (c['variant'] == 'MHA' and c['alpha'] == ref)),
                   key=lambda c: c['time_per_sample_s'])
      ax.errorbar([c['time_per_sample_s'] * 1e3 for c in sub], [c['mean'] for c in sub],
                  yerr=[c['std'] for c in sub], fmt='o-', capsize=3, label=f'alpha {alpha:g}')
      for c in sub:
        ax.annotate(c['variant'], (c['time_per_sample_s'] * 1e3, c['mean']), fontsize=7,
                    textcoords='offset points', xytext=(4, 4))
    _label(ax, 'time per sample (ms)', task, mine)
  fig.suptitle('quality vs decoding time (paper Fig. 3)', fontsize=9)
  return fig


def _fig4(cells: List[dict], tasks: List[str]):
  """Bars per conversion method for the (variant, alpha) groups that ran several."""
  methods = [c for c in cells if c['method'] != 'none']
  if len({c['method'] for c in methods}) < 2:
    return None
  fig, panels = _panels(tasks)
  for ax, task in panels:
    sub = [c for c in methods if c['task'] == task]
    count = {}
    for c in sub:
      count[(c['variant'], c['alpha'])] = count.get((c['variant'], c['alpha']), 0) + 1
    groups = sorted((g for g, n in count.items() if n > 1), key=lambda g: (g[1], g[0]))
    sub = [c for c in sub if (c['variant'], c['alpha']) in groups]  # compared variants
    names = sorted({c['method'] for c in sub})
    width = 0.8 / len(names)
    # One colour per method: tab10 repeats its colours past ten.
    colors = plt.get_cmap('tab10' if len(names) <= 10 else 'tab20').colors
    for j, m in enumerate(names):
      vals = [next((c for c in sub if (c['variant'], c['alpha']) == g and c['method'] == m),
                   None) for g in groups]
      xs = [i + j * width for i, v in enumerate(vals) if v]
      ax.bar(xs, [v['mean'] for v in vals if v], width, yerr=[v['std'] for v in vals if v],
             capsize=2, label=m, color=colors[j % len(colors)])
    source = [c for c in cells if c['task'] == task and c['method'] == 'none' and
              c['alpha'] == 0]
    if source:  # the unconverted model, as in Fig. 5
      ax.axhline(source[0]['mean'], color='gray', linestyle='--', linewidth=0.8,
                 label=f"{source[0]['variant']} (alpha 0)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))],
                  [f'{v}\nalpha {a:g}' for v, a in groups], fontsize=7)
    if sub and sub[0]['metric'] in LOWER_IS_BETTER:  # a loss: no natural zero, zoom in
      low = min(c['mean'] - c['std'] for c in sub + source)
      high = max(c['mean'] + c['std'] for c in sub + source)
      ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    _label(ax, 'conversion method', task, sub, grid=False)
  fig.suptitle('conversion method (paper Fig. 4)', fontsize=9)
  return fig


def _fig5(cells: List[dict], tasks: List[str]):
  """Quality against alpha per converted variant (mean pooling); MHA as a dashed line."""
  if len({c['alpha'] for c in cells}) < 2:
    return None
  fig, panels = _panels(tasks)
  for ax, task in panels:
    sub = [c for c in cells if c['task'] == task and c['method'] in ('mean', 'none')]
    for variant in sorted({c['variant'] for c in sub}):
      line = sorted((c for c in sub if c['variant'] == variant), key=lambda c: c['alpha'])
      if variant == 'MHA' and len(line) == 1:
        ax.axhline(line[0]['mean'], color='gray', linestyle='--', label='MHA (alpha 0)')
        continue
      ax.errorbar([c['alpha'] for c in line], [c['mean'] for c in line],
                  yerr=[c['std'] for c in line], fmt='o-', capsize=3, label=variant)
    _label(ax, 'uptraining proportion alpha', task, sub)
  fig.suptitle('quality vs uptraining proportion (paper Fig. 5)', fontsize=9)
  return fig


def record_for_cell(cell: dict, records: List[dict]):
  """The decoding-benchmark record of a sweep cell's model: the variant with the cell's
  cross-layer sharing (method 'cla2' -> record 'MQA-CLA2') when the benchmark timed one,
  else the plain variant (None when neither was timed)."""
  by_name = {r['name']: r for r in records}
  return by_name.get(f"{cell['variant']}-{cell['method'].upper()}",
                     by_name.get(cell['variant']))


def quality_vs_kv_bytes(cells: List[dict], records: List[dict], path: str,
                        title: str = '') -> str:
  """The KV-cache bytes a model keeps per token (decode benchmark records) against its
  quality: the conversion gap (pretraining objective, lower is better) and the finetuned
  score, one point per cell, a line per (method, alpha); error bars: std over seeds."""
  with_gap = any(c.get('gap_mean') is not None for c in cells)
  panels = [('gap_mean', 'gap_std', 'pretraining nll (conversion gap, lower is better)')] * \
      with_gap + [('mean', 'std', f"finetuned {cells[0]['metric'] if cells else ''}")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=120,
                           squeeze=False)
  placed = [(c, record_for_cell(c, records)) for c in cells]
  placed = [(c, r) for c, r in placed if r is not None]
  for ax, (key, err, ylabel) in zip(axes[0], panels):
    groups = {}
    for c, r in placed:
      if c.get(key) is not None:
        groups.setdefault((c['method'], c['alpha']), []).append((r['kv_bytes_per_token'], c))
    for (method, alpha), points in sorted(groups.items()):
      points.sort(key=lambda p: p[0])
      ax.errorbar([x for x, _ in points], [c[key] for _, c in points],
                  yerr=[c.get(err) or 0 for _, c in points], fmt='o-', capsize=3,
                  label=f'{method}, alpha {alpha:g}')
      for x, c in points:
        ax.annotate(c['variant'], (x, c[key]), fontsize=7, textcoords='offset points',
                    xytext=(4, 4))
    ax.set_xscale('log', base=2)
    ax.set_xlabel('KV cache bytes per token (decode benchmark)')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title or 'quality vs KV-cache bytes per token', fontsize=9)
  return _save(fig, path)


FIGURES = (('fig3_quality_vs_time.png', _fig3), ('fig4_conversion_method.png', _fig4),
           ('fig5_uptraining.png', _fig5))


def sweep_figures(cells: List[dict], directory: str) -> List[str]:
  """The paper's Figs. 3-5 from a sweep's cells (sweep.summarize), one panel per task;
  error bars are the standard deviation over seeds. Returns the paths written."""
  import os
  tasks = sorted({c['task'] for c in cells})
  paths = []
  for name, draw in FIGURES:
    fig = draw(cells, tasks)
    if fig is not None:
      paths.append(_save(fig, os.path.join(directory, name)))
  return paths
