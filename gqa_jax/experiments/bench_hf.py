"""The peer in the decoding benchmark: Hugging Face transformers' PyTorch T5 `generate`.

Same shapes as gqa_jax's MHA variant (the model's widths and layer counts, batch B,
input S, exactly T new tokens: greedy, `min_new_tokens = max_new_tokens = T`, KV cache
on), on the same machine, in the same run. Weights are transformers' own random
initialisation: the time does not depend on their values once the length is fixed.
Needs the optional extra `interop` (torch, transformers); `available()` says whether
it is installed and can run where JAX runs (a CPU-only torch cannot race a GPU JAX).
"""

import importlib.util
import os
import statistics
import time
from typing import Callable, Optional

import numpy as np

from gqa_jax import network


def _torch_device(jax_platform: str) -> Optional[str]:
  if importlib.util.find_spec('transformers') is None:
    return None
  try:
    import torch
  except ImportError:
    return None
  if jax_platform == 'cpu':
    return 'cpu'
  if jax_platform == 'gpu' and torch.cuda.is_available():
    return 'cuda'
  return None


def available(jax_platform: str) -> Optional[str]:
  """Why the peer cannot run here, or None when it can."""
  if _torch_device(jax_platform) is None:
    return (f'transformers/torch for {jax_platform} not installed: '
            "pip install -e '.[interop]' (torch with CUDA for GPU runs)")
  return None


def hf_config(config: network.T5Config):
  """transformers.T5Config with the widths, layer counts and activations of `config`."""
  import transformers
  act = [a for a in config.mlp_activations if a != 'linear']
  gated = len(config.mlp_activations) == 2
  proj = ('gated-' if gated else '') + (act[0] if act else 'relu')
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      d_ff=config.mlp_dim, num_heads=config.num_heads, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, feed_forward_proj=proj,
      tie_word_embeddings=config.logits_via_embedding, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _empty_cache(transformers) -> dict:
  """`generate`'s cache argument: an empty encoder-decoder cache that grows to the
  decoder's layers. transformers 5.25 sizes T5's default cache by the encoder's layer count
  and fails (IndexError in cache_utils) when the decoder has more layers, as in cpu-paper."""
  from transformers.cache_utils import DynamicCache, EncoderDecoderCache
  name = 'cache' if int(transformers.__version__.split('.')[0]) >= 5 else 'past_key_values'
  return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}


def time_generate(config: network.T5Config, tokens: np.ndarray, output_length: int,
                  jax_platform: str = 'cpu', repeats: int = 1, seed: int = 0,
                  between: Optional[Callable[[], float]] = None) -> dict:
  """Median seconds of `generate` producing `output_length` tokens for `tokens` [B, S],
  after a short warm-up; the model is in `config.dtype`.

  between: run after each timed `generate` (rounds alternating with the peer, so that both
  see the same phases of the machine); it returns gqa_jax's time per batch for the same
  work, and the result adds 'hf_round_ratios' (the peer's time over it, per round)."""
  import torch
  import transformers
  device = _torch_device(jax_platform)
  torch.manual_seed(seed)
  if device == 'cpu':
    torch.set_num_threads(os.cpu_count() or 1)
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16,
           'float16': torch.float16}[np.dtype(config.dtype).name]
  with torch.device(device):
    model = transformers.T5ForConditionalGeneration(hf_config(config)).to(dtype).eval()
  ids = torch.as_tensor(np.array(tokens), device=device)
  mask = torch.ones_like(ids)

  def run(input_ids, attention_mask, length):
    with torch.no_grad():
      out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                           max_new_tokens=length, min_new_tokens=length, do_sample=False,
                           num_beams=1, use_cache=True, **_empty_cache(transformers))
    if device == 'cuda':
      torch.cuda.synchronize()
    return out

  run(ids[:1, :8], mask[:1, :8], 2)  # warm-up: kernels, allocator, generation config
  times, ratios = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    out = run(ids, mask, output_length)
    times.append(time.perf_counter() - start)
    if between is not None:
      ratios.append(times[-1] / between())
  if out.shape[1] != output_length + 1:  # the decoder start token, then T tokens
    raise RuntimeError(f'transformers generated {out.shape[1] - 1} tokens, expected '
                       f'{output_length}: the comparison would not be like for like.')
  return {'hf_time_per_batch_s': statistics.median(times),
          'hf_time_per_sample_s': statistics.median(times) / tokens.shape[0],
          'hf_version': transformers.__version__, 'torch_version': torch.__version__,
          'hf_device': device, 'hf_repeats': repeats,
          **({'hf_round_ratios': ratios} if between is not None else {})}
