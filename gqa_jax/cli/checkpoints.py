"""`gqa-jax info`, `convert` and `inspect`: model sizes and checkpoints, no training."""

import json
import sys

import numpy as np

from gqa_jax import checkpoints
from gqa_jax import convert as convert_lib
from gqa_jax import info
from gqa_jax import layers
from gqa_jax import network
from gqa_jax.cli import flags


def register(subparsers):
  _add_info(subparsers)
  _add_convert(subparsers)
  _add_inspect(subparsers)


def _add_info(subparsers):
  parser = subparsers.add_parser(
      'info', help='parameter counts and KV-cache sizes of MHA, GQA-G and MQA.',
      description='For MHA, GQA-G (every divisor G of num_heads with 1 < G < N) and MQA: '
                  'exact parameter counts from the parameter tree, K/V-projection parameters '
                  'per attention stack, and the KV cache that decoding keeps. The '
                  f'{info.NO_ENCODER_CACHE[len("the "):]}.')
  flags.add_model_flags(parser)
  parser.add_argument('--input-length', type=flags.positive_int, default=2048, metavar='S',
                      help='encoder input length; sets the cross-attention cache '
                           '(default: %(default)s).')
  parser.add_argument('--output-length', type=flags.positive_int, default=512, metavar='T',
                      help='decoder output length; sets the self-attention cache '
                           '(default: %(default)s).')
  parser.add_argument('--batch-size', type=flags.positive_int, default=32, metavar='B',
                      help='batch size for the per-batch cache total (default: %(default)s).')
  parser.add_argument('--stacks', type=flags.stacks_list, default=network.PAPER_STACKS,
                      metavar='LIST', help='comma-separated attention stacks whose KV heads '
                      f'each variant sets, from {",".join(network.STACKS)} '
                      "(default: the paper's decoder_self,decoder_cross).")
  parser.add_argument('--cache-dtype', metavar='DTYPE',
                      help="dtype of the cache, e.g. bfloat16 or float32 (default: the "
                           "model's activation dtype).")
  parser.add_argument('--json', action='store_true',
                      help='print a JSON list of records, one per variant, instead of tables.')
  parser.set_defaults(run=_run_info)


def _run_info(args) -> int:
  config, model = flags.model_config(args)
  try:
    records = info.report(config, input_length=args.input_length,
                          output_length=args.output_length, batch_size=args.batch_size,
                          stacks=args.stacks, cache_dtype=args.cache_dtype)
  except ValueError as e:
    raise flags.UserError(str(e)) from e
  if args.json:
    print(json.dumps([{'model': model, **r} for r in records], indent=2))
  else:
    print(info.format_report(records, model, config))
  return 0


def _add_convert(subparsers):
  parser = subparsers.add_parser(
      'convert', help='convert an MHA checkpoint to GQA-G or MQA (T5X, Orbax or HF in).',
      description='Reads a T5X legacy, T5X Orbax, gqa_jax or Hugging Face T5 checkpoint and '
                  'writes it with NUM_KV_HEADS key/value heads in the chosen stacks, pooling '
                  'contiguous groups of heads. Every other tensor is copied unchanged. The '
                  'output appears at DST only when complete, with a CRC-32 of every tensor in '
                  'its gqa_jax.json (checked by inspect --verify). DST is locked while it is '
                  'written: a second conversion to it is refused; what killed conversions '
                  'left beside DST is cleaned up (or put back) by the next one, which says '
                  'so. The source step is kept, so learning-rate schedules and Adafactor '
                  'continue from it.')
  parser.add_argument('src', metavar='SRC', help='source checkpoint: a checkpoint_<step> '
                      'folder, a folder of them (latest used), or a Hugging Face folder.')
  parser.add_argument('dst', metavar='DST', help='output folder (gets checkpoint_<step>/).')
  parser.add_argument('--num-kv-heads', type=flags.positive_int, metavar='G',
                      help='KV heads per converted stack: 1 is MQA, G is GQA-G, the number '
                           'of query heads is an identity copy. Required unless --fold or '
                           "--kv-layers is given (then the source's are kept).")
  parser.add_argument('--method', choices=convert_lib.METHODS,
                      help="pooling of each group's K/V heads: mean (the paper), first "
                           'head, random re-initialisation, svd (the top principal '
                           "directions of the group's kernels, each head's map folded into "
                           'its query and out kernels: exact when the group has rank <= '
                           'head_dim), procrustes (each head rotated onto the group\'s '
                           'before the mean, the rotations folded likewise), or wgqa: the '
                           'source heads kept with learned weights per head (WGQA; see '
                           '--wgqa-weights) (default: mean). Given, some stack must get '
                           'fewer KV heads.')
  parser.add_argument('--grouping', choices=convert_lib.GROUPINGS, default='contiguous',
                      help='which heads share a KV head: contiguous blocks (the paper), or '
                           'similarity: blocks searched by how alike the heads\' K/V kernels '
                           'are for the method (calibration-weighted with --calibration), '
                           'the query, out and relative-bias rows permuted to match so the '
                           'source function is kept; self-attention layers of a stack share '
                           'one order (one bias table), cross-attention is grouped per '
                           'layer (default: %(default)s). similarity needs a --method '
                           'other than random, and fewer KV heads.')
  parser.add_argument('--calibration', metavar='STATS',
                      help='--method svd/procrustes and --grouping similarity: weight by '
                           'the input second moments of each attention module from '
                           '`gqa-jax calibrate` on this checkpoint (default: the kernels '
                           'alone).')
  parser.add_argument('--wgqa-weights', choices=layers.KV_WEIGHT_SHAPES,
                      help='with --method wgqa only: one weight per source head (scalar), '
                           'per head and input dimension (row) or per head and head '
                           'dimension (col) (default: scalar).')
  parser.add_argument('--wgqa-init', choices=layers.KV_WEIGHT_INITS,
                      help='with --method wgqa only: weights 1/group size (exactly mean '
                           'pooling) or standard normal draws (default: mean).')
  parser.add_argument('--fold', action='store_true',
                      help='fold a WGQA checkpoint\'s learned weights into plain GQA '
                           'kernels (exact: the outputs do not change).')
  parser.add_argument('--kv-layers', metavar='LAYERS',
                      help="CLA/MLKV: the layers that keep K/V in the converted stacks, as "
                           "'cla<s>' (s adjacent layers share), 'mlkv<m>' (m KV layers) or a "
                           'comma-separated list starting at 0; the others reuse the last '
                           'one before them.')
  parser.add_argument('--layer-method', choices=convert_lib.LAYER_METHODS,
                      help="with --kv-layers only (where layers share): a keeping layer's "
                           "K/V kernel from its group's: their mean, its own (first), or "
                           "MLKV's running pairwise average (mlkv) (default: mean).")
  parser.add_argument('--stacks', type=flags.stacks_list, default=network.PAPER_STACKS,
                      metavar='LIST',
                      help='comma-separated stacks to convert, each once, from '
                      f'{",".join(network.STACKS)} (default: decoder_self,decoder_cross).')
  parser.add_argument('--output-format', choices=convert_lib.OUTPUT_FORMATS, default='orbax',
                      help='orbax (what gqa-jax train restores) or t5x (legacy msgpack + '
                           'zarr) (default: %(default)s).')
  parser.add_argument('--opt-state', choices=convert_lib.OPT_STATE,
                      help='for a source with optimizer state: reinit keeps Adafactor '
                           'moments of unchanged tensors and zeroes those of converted K/V '
                           'kernels; drop writes no optimizer state (default: reinit).')
  parser.add_argument('--reset-step', action='store_true',
                      help='start the converted checkpoint at step 0 instead of the source '
                           'step (for a source that records one).')
  parser.add_argument('--dtype', metavar='DTYPE', help='activation dtype recorded in the '
                      "output's model config (default: the source's; bfloat16 for T5X).")
  parser.add_argument('--seed', type=int, default=None,
                      help='seed of --method random and of --method wgqa --wgqa-init normal, '
                           'the conversions that draw weights (default: 0); refused with '
                           'the others.')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace DST if it exists (only once the new output is complete); '
                           'DST must be a folder of checkpoint_<step> folders.')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='allow reading pytorch_model.bin, a pickle that can run code.')
  _add_external_links_flag(parser)
  parser.add_argument('--quiet', action='store_true', help='no progress bar.')
  parser.set_defaults(run=_run_convert)


def _add_external_links_flag(parser):
  parser.add_argument(
      '--allow-external-links', action='store_true',
      help='read data through symlinks that lead out of the checkpoint folder (e.g. a '
           'tensor folder linked to another disk). Off by default: every file a checkpoint '
           'names must lie inside its folder, so a crafted checkpoint cannot read (and '
           'convert copy) other files. Absolute paths outside it are refused either way.')


def _kv_layers(text):
  if text is None or text.startswith(('cla', 'mlkv')):
    return text
  try:
    return tuple(int(i) for i in text.split(','))
  except ValueError:
    raise flags.UserError(f"--kv-layers {text!r}: use 'cla<s>', 'mlkv<m>' or a "
                          'comma-separated list of layers such as 0,2,4.') from None


def _run_convert(args) -> int:
  if args.num_kv_heads is None and not (args.fold or args.kv_layers):
    raise flags.UserError('convert needs --num-kv-heads G (1 is MQA, G is GQA-G), unless '
                          'it only folds WGQA weights (--fold) or shares K/V across layers '
                          '(--kv-layers).')
  summary = convert_lib.convert(
      args.src, args.dst, args.num_kv_heads, method=args.method, stacks=args.stacks,
      wgqa_weights=args.wgqa_weights, wgqa_init=args.wgqa_init, fold=args.fold,
      kv_layers=_kv_layers(args.kv_layers), layer_method=args.layer_method,
      grouping=args.grouping, calibration=args.calibration,
      output_format=args.output_format, opt_state=args.opt_state,
      reset_step=args.reset_step, dtype=args.dtype, overwrite=args.overwrite,
      allow_pickle=args.allow_pickle, seed=args.seed, progress=not args.quiet,
      allow_external_links=args.allow_external_links,
      notify=lambda message: print(f'{flags.PROG}: note: {message}', file=sys.stderr))
  cfg = summary['config']
  heads = '/'.join(str(cfg[f'{s}_kv_heads'] or cfg['num_heads']) for s in network.STACKS)
  print(f"converted {summary['source']['format']} {args.src} (step "
        f"{summary['source']['step']}) -> {summary['path']} [{args.output_format}], "
        f"KV heads encoder/self/cross {heads}, {_conversion(summary)}, step {summary['step']}, "
        f"{summary['tensors']} tensors in {summary['seconds']:.1f} s")
  return 0


def _conversion(md) -> str:
  """What a conversion did, from its record: 'mean pooling', 'WGQA (col weights, mean
  init)', 'the WGQA weights folded', plus 'K/V layers cla2 (mlkv)'."""
  if md.get('fold'):
    what = 'the WGQA weights folded'
  elif md['method'] in ('svd', 'procrustes'):
    what = ('SVD (low-rank K/V heads' if md['method'] == 'svd' else
            'Procrustes (heads aligned, then averaged') + ', maps folded into query/out)'
    if md.get('calibration'):
      what += ' with calibration'
  elif md['method'] == 'wgqa':
    what = f"WGQA ({md.get('wgqa_weights')} weights, {md.get('wgqa_init')} init)"
  else:
    heads = lambda cfg: [cfg.get(f'{s}_kv_heads') or cfg.get('num_heads')
                         for s in network.STACKS]
    same = heads(md.get('config', {})) == heads(md.get('source', {}).get('config', {}))
    what = 'no heads pooled (a copy)' if same else f"{md['method']} pooling"
  if md.get('grouping') == 'similarity':
    what += f", similarity grouping ({len(md.get('groups', {}))} modules reordered)"
  if md.get('kv_layers') is not None:
    what += f", K/V layers {md['kv_layers']} ({md.get('layer_method')})"
  return what


def _add_inspect(subparsers):
  parser = subparsers.add_parser(
      'inspect', help='format, step, config, KV heads and tensors of a checkpoint.',
      description='Opens any supported checkpoint without loading its tensors and prints '
                  'its format, step, inferred model config, KV heads per attention stack '
                  'and the parameter tree with shapes and dtypes. --verify also reads every '
                  'tensor.')
  parser.add_argument('ckpt', metavar='CKPT', help='checkpoint folder or file.')
  parser.add_argument('--opt-state', action='store_true',
                      help='also list every optimizer-state tensor.')
  parser.add_argument('--json', action='store_true', help='print JSON instead of text.')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='allow reading pytorch_model.bin, a pickle that can run code.')
  parser.add_argument(
      '--verify', action='store_true',
      help='read every tensor (parameters and optimizer state, one at a time) and name each '
           'one that cannot be read, has the wrong shape or dtype, holds NaN or infinity, or '
           'whose CRC-32 differs from the one recorded in gqa_jax.json; exit status 2 if any '
           'is bad. What is detectable: a missing or truncated file, always; changed bytes '
           '(bit flips) in T5X legacy zarr chunks, which are gzip-compressed (gzip checks a '
           'CRC), and in anything `gqa-jax convert` wrote (it records a CRC-32 per tensor). '
           'Orbax/OCDBT data (T5X Orbax and gqa-jax training checkpoints) and safetensors '
           'carry no checksum: there changed bytes go unnoticed unless they make a value '
           'NaN or infinite.')
  _add_external_links_flag(parser)
  parser.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
  source = checkpoints.open_checkpoint(args.ckpt, args.allow_pickle,
                                       args.allow_external_links)
  tensors = lambda d: {k: {'shape': list(t.shape), 'dtype': str(t.dtype)}
                       for k, t in sorted((d or {}).items())}
  kv = {s: source.config.kv_heads(s) for s in network.STACKS}
  n = source.config.num_heads
  report = {'path': args.ckpt, 'format': source.format, 'step': source.step,
            'config': source.config.to_dict(), 'kv_heads': kv,
            'num_params': int(sum(np.prod(t.shape) for t in source.params.values())),
            'params': tensors(source.params),
            'opt_state_tensors': len(source.opt_state or {}), 'metadata': source.metadata}
  if args.opt_state:
    report['opt_state'] = tensors(source.opt_state)
  if args.verify:
    bad, compared = checkpoints.verify(source, progress=not args.json)
    report['verify'] = {'tensors': len(source.params) + len(source.opt_state or {}),
                        'checksums_compared': compared, 'bad': bad}
  if args.json:
    print(json.dumps(report, indent=2, default=str))
    return _verify_status(report)
  print(f"{args.ckpt}: {source.format}, step {source.step}")
  print(f"model: {info.describe(source.config)}")
  print('KV heads: ' + ', '.join(f'{s} {k} ({network.variant_name(k, n)})'
                                for s, k in kv.items()))
  for line in info.options(source.config):
    print(f'options: {line}')
  print(f"parameters: {report['num_params']:,} in {len(source.params)} tensors; optimizer "
        f"state: {report['opt_state_tensors']} tensors")
  if source.metadata.get('method'):
    md = source.metadata
    print(f"converted from {md['source']['format']} {md['source']['path']} with "
          f"{_conversion(md)} ({', '.join(md['stacks'])})")
  rows = report['params'].items() if not args.opt_state else {
      **report['params'], **report['opt_state']}.items()
  width = max(len(k) for k, _ in rows)
  for name, t in rows:
    print(f"  {name.ljust(width)}  {str(tuple(t['shape'])):>16}  {t['dtype']}")
  if args.verify:
    v = report['verify']
    for name, problem in sorted(v['bad'].items()):
      print(f'BAD {name}: {problem}')
    print(f"verified: {v['tensors'] - len(v['bad'])} of {v['tensors']} tensors intact "
          f"({v['checksums_compared']} against recorded CRC-32s)")
  return _verify_status(report)


def _verify_status(report: dict) -> int:
  """0, or a UserError naming the bad tensors of `inspect --verify` (exit status 2)."""
  bad = (report.get('verify') or {}).get('bad')
  if bad:
    names = sorted(bad)
    shown = ', '.join(names[:5]) + (' ...' if len(names) > 5 else '')
    raise flags.UserError(f"{report['path']}: {len(bad)} of {report['verify']['tensors']} "
                          f'tensors are damaged ({shown}; each is listed above): copy the '
                          'checkpoint again from a good source.')
  return 0
