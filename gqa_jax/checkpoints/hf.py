"""Hugging Face T5 checkpoints (`T5ForConditionalGeneration`) under T5X's names.

A model folder holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`); older ones hold `pytorch_model.bin`, a pickle.
torch Linear weights are [out, in] and are transposed to T5X's [in, out]; the
relative position bias lives in block 0 of each stack. Safetensors tensors are
read lazily, one at a time, with shapes and dtypes taken from the file header.
"""

import json
import re
import struct
from pathlib import Path
from typing import Dict, Tuple

import ml_dtypes
import numpy as np

from gqa_jax import network
from gqa_jax.checkpoints import base

_WEIGHTS = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
            'pytorch_model.bin.index.json')
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16}
_ATTN = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_DEC_NORMS = ('pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm',
              'pre_mlp_layer_norm')
# (HF name pattern, T5X name as a function of the match or None to skip, transpose).
_RULES = [
    (r'shared\.weight', lambda m: 'token_embedder/embedding', False),
    # Tied copies of `shared` (transformers ties them at load time).
    (r'(encoder|decoder)\.embed_tokens\.weight', None, False),
    # Old checkpoints carry an unused cross-attention bias; transformers ignores it too.
    (r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight',
     None, False),
    (r'(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight',
     lambda m: f'{m[1]}/relpos_bias/rel_embedding', True),  # [32, N] -> [N, 32]
    (r'encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight',
     lambda m: f'encoder/layers_{m[1]}/attention/{_ATTN[m[2]]}/kernel', True),
    (r'decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight',
     lambda m: f'decoder/layers_{m[1]}/self_attention/{_ATTN[m[2]]}/kernel', True),
    (r'decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.weight',
     lambda m: f'decoder/layers_{m[1]}/encoder_decoder_attention/{_ATTN[m[2]]}/kernel', True),
    (r'encoder\.block\.(\d+)\.layer\.([01])\.layer_norm\.weight', lambda m: (
        f'encoder/layers_{m[1]}/{("pre_attention", "pre_mlp")[int(m[2])]}_layer_norm/scale'),
     False),
    (r'decoder\.block\.(\d+)\.layer\.([012])\.layer_norm\.weight',
     lambda m: f'decoder/layers_{m[1]}/{_DEC_NORMS[int(m[2])]}/scale', False),
    (r'encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wi|wo)\.weight',
     lambda m: f'encoder/layers_{m[1]}/mlp/{m[2]}/kernel', True),
    (r'decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi_0|wi_1|wi|wo)\.weight',
     lambda m: f'decoder/layers_{m[1]}/mlp/{m[2]}/kernel', True),
    (r'encoder\.final_layer_norm\.weight', lambda m: 'encoder/encoder_norm/scale', False),
    (r'decoder\.final_layer_norm\.weight', lambda m: 'decoder/decoder_norm/scale', False),
]
_RULES = [(re.compile(p), fn, t) for p, fn, t in _RULES]
# transformers' T5Config defaults, for config.json files that leave a field out.
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                    num_heads=8, feed_forward_proj='relu', relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
_ACTIVATIONS = {'gated-gelu': ('gelu', 'linear'), 'relu': ('relu',)}


def is_hf_checkpoint(path) -> bool:
  """A folder holding HF T5 weights (single-file, sharded, or pickled), or such a file."""
  path = Path(path)
  if path.is_dir():
    return any((path / name).is_file() for name in _WEIGHTS)
  return path.is_file() and (path.name in _WEIGHTS or path.name.endswith('.safetensors'))


def _transposed(t: base.Tensor) -> base.Tensor:
  return base.Tensor(t.shape[::-1], t.dtype, lambda: np.ascontiguousarray(t.read().T), t.where)


def _safetensors_header(file: Path) -> Dict[str, dict]:
  """The header's tensor entries, after checking that the file holds all their bytes."""
  size = file.stat().st_size
  with open(file, 'rb') as f:
    head = f.read(8)
    n = struct.unpack('<Q', head)[0] if len(head) == 8 else None
    if n is None or n > size - 8:
      raise base.CheckpointError(f'{file}: truncated safetensors file (no complete header); '
                                 'download or copy it again.')
    try:
      header = json.loads(f.read(n))
      header.pop('__metadata__', None)
      end = max([e['data_offsets'][1] for e in header.values()], default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
      raise base.CheckpointError(f'{file}: corrupted safetensors header ({e}).') from e
  if 8 + n + end > size:
    raise base.CheckpointError(f'{file}: truncated safetensors file: the header describes '
                               f'{8 + n + end} bytes, the file has {size}; copy it again.')
  return {name: dict(e, start=8 + n + e['data_offsets'][0]) for name, e in header.items()}


def _safetensors_tensor(file: Path, name: str, entry: dict) -> base.Tensor:
  if entry['dtype'] not in _DTYPES:
    raise base.CheckpointError(f'{file}: tensor {name!r} has dtype {entry["dtype"]}; '
                               f'expected one of {sorted(_DTYPES)}.')
  dtype, shape = np.dtype(_DTYPES[entry['dtype']]), tuple(entry['shape'])

  def read():
    from safetensors import safe_open
    try:
      with safe_open(str(file), framework='numpy') as f:
        return f.get_tensor(name)
    except Exception:  # pylint: disable=broad-except
      # Older safetensors releases cannot give NumPy a bfloat16 array; the bytes are
      # little-endian bfloat16, which is what ml_dtypes stores, so read them directly.
      if entry['dtype'] != 'BF16':
        raise
      count = int(np.prod(shape, dtype=np.int64))
      return np.fromfile(file, dtype, count, offset=entry['start']).reshape(shape)
  return base.Tensor(shape, dtype, read, f'{file}:{name}')


def _open_safetensors(files: Dict[str, Path]) -> Dict[str, base.Tensor]:
  """HF name -> Tensor, for HF names mapped to the file that holds them."""
  headers, out = {}, {}
  for name, file in files.items():
    if file not in headers:
      if not file.is_file():
        raise base.CheckpointError(f'shard {file} listed in the index is missing.')
      headers[file] = _safetensors_header(file)
    if name not in headers[file]:
      raise base.CheckpointError(f'{file} has no tensor {name!r} (the index says it has).')
    out[name] = _safetensors_tensor(file, name, headers[file][name])
  return out


def _open_pickle(files) -> Dict[str, base.Tensor]:
  """HF name -> Tensor of every tensor in these .bin files, read now."""
  try:
    import torch
  except ImportError as e:
    raise base.CheckpointError('reading pytorch_model.bin needs torch: pip install '
                               '"gqa_jax[interop]" (or convert it to safetensors).') from e
  out = {}
  for file in files:
    if not file.is_file():
      raise base.CheckpointError(f'shard {file} listed in the index is missing.')
    try:  # weights_only refuses to unpickle anything but tensors and plain containers
      state = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:
      raise base.CheckpointError(f'cannot load {file}: {e}') from e
    for name, t in state.items():
      t = t.detach()
      # NumPy has no bfloat16: move the bits through int16 into ml_dtypes' bfloat16.
      value = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
               if t.dtype == torch.bfloat16 else t.numpy())
      out[name] = base.Tensor(value.shape, value.dtype, lambda v=value: v, f'{file}:{name}')
  return out


def _read_json(file: Path) -> dict:
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise base.CheckpointError(f'{file} is not valid JSON ({e}).') from e


def _weight_files(path: Path) -> Tuple[Path, str]:
  if path.is_file():
    return path, path.name
  for name in _WEIGHTS:
    if (path / name).is_file():
      return path / name, name
  raise base.CheckpointError(f'{path} holds none of {list(_WEIGHTS)}: not a Hugging Face '
                             'model folder.')


def _root(folder: Path) -> Path:
  """The folder a checkpoint's files must stay in: the model folder, or for a snapshot
  in the Hugging Face hub cache (models--org--name/snapshots/<rev>/, whose files are
  links to ../../blobs/<hash>) the model's cache folder."""
  if folder.parent.name == 'snapshots' and (folder.parent.parent / 'blobs').is_dir():
    return folder.parent.parent
  return folder


def open_hf(path, allow_pickle: bool = False,
            allow_external_links: bool = False) -> base.Source:
  """Opens a Hugging Face T5 model folder (or its weights file) without reading tensors.

  Every file read (config.json, the weights, an index's shards) must lie inside the
  model folder: an index naming /elsewhere/shard.safetensors is refused.
  """
  weights, name = _weight_files(Path(path))
  root = _root(weights.parent)
  inside = lambda file, what: base.inside(root, file, what, allow_external_links)
  weights = inside(weights, 'weights file')
  pickled = name.startswith('pytorch_model') or name.endswith('.bin')
  if pickled and not allow_pickle:
    raise base.CheckpointError(
        f'{weights} is a PyTorch pickle: loading a pickle can execute arbitrary code. '
        'Pass --allow-pickle (allow_pickle=True) if you trust its source, or convert it '
        'to safetensors first.')
  config_file = weights.parent / 'config.json'
  config_file = inside(config_file, 'config.json')
  if not config_file.is_file():
    raise base.CheckpointError(f'{config_file} is missing: a Hugging Face checkpoint needs '
                               'its config.json beside the weights.')
  hf_config = {**_HF_DEFAULTS, **_read_json(config_file)}
  _check_supported(hf_config, config_file)
  files = None  # HF name -> file holding it; a single .bin file names none up front
  if name.endswith('.index.json'):
    weight_map = _read_json(weights).get('weight_map')
    if not isinstance(weight_map, dict):
      raise base.CheckpointError(f'{weights} has no weight_map: not a weights index.')
    bad = sorted(k for k, f in weight_map.items() if not isinstance(f, str) or not f)
    if bad:
      raise base.CheckpointError(f'{weights}: weight_map gives no file name for {bad[:5]}: '
                                 'a corrupted index; download it again.')
    files = {k: inside(weights.parent / f, f'shard {f!r} of tensor {k!r} in {weights.name}')
             for k, f in weight_map.items()}
  elif not pickled:
    files = dict.fromkeys(_safetensors_header(weights), weights)
  if pickled:
    hf = _open_pickle(sorted(set(files.values())) if files else [weights])
  else:
    hf = _open_safetensors(files)

  params, unmatched = {}, []
  for key, tensor in hf.items():
    for rx, fn, transpose in _RULES:
      if m := rx.fullmatch(key):
        break
    else:
      if key != 'lm_head.weight':  # the output layer is decided below, from config.json
        unmatched.append(key)
      continue
    if fn is not None:
      params[fn(m)] = _transposed(tensor) if transpose else tensor
  if unmatched:
    raise base.CheckpointError(f'{weights}: tensors that match no T5 parameter: '
                               f'{sorted(unmatched)}')
  if 'token_embedder/embedding' not in params:
    raise base.CheckpointError(f'{weights} has no shared.weight: not a T5 checkpoint.')

  # The output layer has three forms, (a) to (c) below: a checkpoint's config decides
  # which, since a wrong guess gives plausible but wrong logits. transformers 5 records
  # the decoder-output scaling in `scale_decoder_outputs`; before it, the scaling was
  # implied by tying, which is what transformers 5 falls back to for old configs.
  tied = hf_config.get('tie_word_embeddings', True) is not False
  scaled = hf_config.get('scale_decoder_outputs', tied)
  if not tied and not scaled and 'lm_head.weight' in hf:
    # (a) transformers-4 T5.1.1: a separate, unscaled lm_head [V, D].
    params['decoder/logits_dense/kernel'] = _transposed(hf['lm_head.weight'])
  elif tied and scaled:
    # (b) original T5: logits = y @ shared.T / sqrt(d_model), T5X's logits_via_embedding.
    pass  # a saved lm_head.weight, if any, is a copy of shared
  elif tied:
    # (c) transformers 5 T5.1.1: lm_head is always tied to shared and applied without
    # scaling, which is a logits_dense kernel equal to shared.T.
    params['decoder/logits_dense/kernel'] = _transposed(params['token_embedder/embedding'])
  elif scaled:
    raise base.CheckpointError(f'{config_file}: scale_decoder_outputs true with an untied '
                               'lm_head (tie_word_embeddings false) is no T5 variant.')
  else:
    raise base.CheckpointError(f'{config_file}: tie_word_embeddings is false but {weights} '
                               'has no lm_head.weight (an incomplete checkpoint).')

  dtype = 'float32' if all(t.dtype == np.float32 for t in params.values()) else 'bfloat16'
  config = base.infer_config({k: t.shape for k, t in params.items()}, dtype=dtype)
  _check_matches(hf_config, config, config_file)
  base.check_shapes(params, config, str(weights))
  return base.Source('hf-pytorch' if pickled else 'hf-safetensors', str(path), params, config,
                     step=None, opt_state=None, metadata={
                         'transformers_version': hf_config.get('transformers_version'),
                         'logits': ('lm_head' if not tied else 'tied, scaled' if scaled
                                    else 'tied, unscaled')})


def _check_supported(hf: dict, config_file: Path):
  """Raises CheckpointError where config.json describes a T5 that network.py does not
  compute."""
  if hf.get('model_type', 't5') not in ('t5', 'mt5'):
    raise base.CheckpointError(f'{config_file}: model_type {hf["model_type"]!r} is not T5 '
                               "(expected 't5' or 'mt5').")
  fixed = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6)  # what layers.py hard-codes, as T5X does
  for key, want in fixed.items():
    if hf[key] != want:
      raise base.CheckpointError(f'{config_file}: {key}={hf[key]} is not supported; T5 '
                                 f'and T5X use {want}.')
  if hf['feed_forward_proj'] not in _ACTIVATIONS:
    raise base.CheckpointError(
        f'{config_file}: feed_forward_proj={hf["feed_forward_proj"]!r} is not supported; '
        f'expected one of {sorted(_ACTIVATIONS)} (T5.1.1 or original T5).')


def _check_matches(hf: dict, config: network.T5Config, config_file: Path):
  """Raises CheckpointError where config.json disagrees with the weights' shapes."""
  num_decoder_layers = hf.get('num_decoder_layers') or hf['num_layers']
  expected = [('d_model', 'emb_dim', hf['d_model']), ('d_kv', 'head_dim', hf['d_kv']),
              ('d_ff', 'mlp_dim', hf['d_ff']), ('num_heads', 'num_heads', hf['num_heads']),
              ('vocab_size', 'vocab_size', hf['vocab_size']),
              ('num_layers', 'num_encoder_layers', hf['num_layers']),
              ('num_decoder_layers', 'num_decoder_layers', num_decoder_layers),
              ('feed_forward_proj', 'mlp_activations', _ACTIVATIONS[hf['feed_forward_proj']])]
  wrong = [f'{key}={value!r} but the weights have {ours}={getattr(config, ours)!r}'
           for key, ours, value in expected if getattr(config, ours) != value]
  if wrong:
    raise base.CheckpointError(f'{config_file} does not match the weights: {"; ".join(wrong)}.')
