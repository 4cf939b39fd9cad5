"""MHA -> GQA-G / MQA checkpoint conversion: a rule table over the whole tree.

Every leaf of the source (parameters, Adafactor states, step) must match exactly
one rule, or the conversion fails listing the leaves that matched none. K/V
kernels of the converted stacks are pooled over contiguous groups of heads
(with R = K_src // K_tgt source heads per group, KV head k pools source heads
[k*R, (k+1)*R), as query head n reads KV head n // R); everything else is copied bit for bit. Shapes are checked on
every tensor going in and coming out.

Optimizer state: the step is kept by default, so rsqrt schedules and Adafactor's
step-dependent decay continue where pretraining stopped (the paper uptrains with
the original setup). Moments of tensors whose shape changes are re-initialised
to zeros (`opt_state='reinit'`); all other moments are copied. `opt_state='drop'`
writes parameters and step only. A pooled kernel [D, K*H] gets the slots that
Adafactor keeps for its own shape (`optimizers.t5x_slot_shapes`), not the
source's: with both dims >= 128 it is factored the other way round, and below
128 it has a full v. The factoring threshold is the source's, read off its slots,
so that the output is what one optimizer would have written.
"""

import dataclasses
import glob
import os
import re
import shutil
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gqa_jax import calibration as calibration_lib
from gqa_jax import checkpoints, info, layers, locks, lowrank, network, optimizers, outputs
from gqa_jax.checkpoints import base, orbax, t5x

# svd: each group's K/V heads replaced by the top principal directions of their stacked
# kernels, the per-head maps folded into the query and out kernels (`lowrank`; Yu et al.
# 2024): exact whenever a group's kernels have rank <= head_dim. procrustes: each head
# rotated onto the group's before the mean, the rotations folded likewise (Jin et al.
# 2024). Both take calibration statistics (`gqa-jax calibrate`) or the kernels alone.
METHODS = ('mean', 'first', 'random', 'wgqa', 'svd', 'procrustes')
FACTORED = ('svd', 'procrustes')  # methods whose per-head maps fold into query and out
# Which source KV heads share a target head: contiguous blocks (the paper), or blocks
# found by similarity (`lowrank.search_groups`), realised by permuting the heads of the
# attention module (query columns, K/V columns, out rows and, for self-attention, the
# stack's relative-bias rows) before pooling, which leaves the source's function as it is.
GROUPINGS = ('contiguous', 'similarity')
# The affinity that similarity grouping maximises within groups, by method: what each
# method's error depends on (`lowrank.affinity`). 'random' draws new K/V kernels, which
# no grouping changes: it has none.
GROUPING_AFFINITY = {'mean': 'inner', 'first': 'inner', 'svd': 'subspace',
                     'procrustes': 'aligned'}
# How a CLA/MLKV producer layer's K/V kernel is made from its group's (after pooling
# heads): its own ('first'), the group's mean, or MLKV's running pairwise average in
# ascending layer order, W <- (W + W_i) / 2 (Zuhri et al. 2024).
LAYER_METHODS = ('mean', 'first', 'mlkv')
SKIP = object()  # a rule's result for a source tensor the target does not have
OUTPUT_FORMATS = ('orbax', 't5x')
OPT_STATE = ('reinit', 'drop')
# What an option means when it is not given (None). One given that the conversion would
# not use is refused (`_check_unused`): no option is silently ignored.
DEFAULTS = {'method': 'mean', 'opt_state': 'reinit', 'wgqa_weights': 'scalar',
            'wgqa_init': 'mean', 'layer_method': 'mean'}
# The hidden names written beside DST, by what they hold (`_sibling`): the output being
# written, the previous DST moved aside by --overwrite (complete: it is renamed in one
# step and deleted only under the third name), and that previous DST being deleted.
PARTIAL, ASIDE, DELETING = 'partial', 'old', 'deleting'
_TAG_HEX = 8  # the hex digits that tie a swap's names together
_LONGEST_SIBLING = f'.{DELETING}-{"0" * _TAG_HEX}'  # '.NAME' + this: the longest hidden name
_KV = (r'^(?P<module>encoder/layers_\d+/attention|decoder/layers_\d+/self_attention|'
       r'decoder/layers_\d+/encoder_decoder_attention)/(key|value)/kernel$')


class ConversionError(base.CheckpointError):
  """The conversion cannot be done as asked; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Plan:
  source: network.T5Config
  target: network.T5Config
  method: str
  seed: int
  # Adafactor's min_dim_size_to_factor that wrote the source's slots, and the target's
  # parameter shapes: together they give a converted tensor's slots.
  min_dim_size_to_factor: Optional[int] = None
  shapes: Optional[Dict[str, Tuple[int, ...]]] = None
  # Every source tensor by name: a K/V kernel may be made from several (a WGQA fold
  # reads its weights, a CLA producer its group's kernels).
  tensors: Optional[Dict[str, base.Tensor]] = None
  layer_method: str = 'mean'
  # The input second moment of an attention module by its name ('decoder/layers_0/
  # self_attention'), from `gqa-jax calibrate`; None: weights only (C = I).
  moments: Optional[Callable[[str], np.ndarray]] = None
  # Similarity grouping: the order of the source KV heads by attention module (position
  # p holds source head perms[module][p]); modules left contiguous are absent.
  perms: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # A factored method's (shared heads, per-head maps) by K/V kernel name: the K/V rule
  # writes the former, the query/out rule folds the latter, from one decomposition
  # (dropped after its second use, so that memory stays near the largest tensor).
  factor_cache: Dict[str, list] = dataclasses.field(default_factory=dict, repr=False,
                                                    compare=False)

  def kv_change(self, name: str) -> Optional[Tuple[int, int]]:
    """(source K, target K) if `name` is a K/V kernel whose head count changes."""
    stack = network.kv_kernel_stack(name) if re.match(_KV, name) else None
    if stack is None or self.target.kv_weights(stack):
      return None  # WGQA keeps the source heads' kernels as they are
    k_src, k_tgt = self.source.kv_heads(stack), self.target.kv_heads(stack)
    return None if k_src == k_tgt else (k_src, k_tgt)

  def group(self, name: str) -> Optional[List[int]]:
    """For a K/V kernel: the layers whose kernels make it ([its own layer] unless CLA/MLKV
    layers are added); [] if the target has no such kernel (a CLA consumer layer)."""
    match = re.match(_KV, name)
    if not match:
      return None
    stack = network.kv_kernel_stack(name)
    layer = int(re.search(r'layers_(\d+)', name).group(1))
    if self.target.kv_producer(stack, layer) != layer:
      return []
    if self.source.kv_producer(stack, layer) != layer:
      raise ConversionError(f'{name}: layer {layer} has no K/V of its own in the source '
                            '(CLA/MLKV); a producer layer cannot be made from it.')
    nxt = [i for i in self.target.producer_layers(stack) if i > layer]
    end = nxt[0] if nxt else self.target.num_layers(stack)
    return [i for i in self.source.producer_layers(stack) if layer <= i < end]

  def folded_into(self, name: str) -> Optional[str]:
    """For a query/out kernel that a factored method rewrites: the key/value kernel whose
    per-head maps fold into it; else None."""
    if self.method not in FACTORED or not name.endswith(('/query/kernel', '/out/kernel')):
      return None
    module, kind = name.rsplit('/', 2)[:2]
    kv_name = f'{module}/{"key" if kind == "query" else "value"}/kernel'
    return kv_name if self.kv_change(kv_name) is not None else None

  def moment(self, module: str) -> Optional[np.ndarray]:
    return None if self.moments is None else self.moments(module)

  def permuted(self, name: str) -> Optional[np.ndarray]:
    """For a query/key/value/out kernel or a relative-bias table whose heads similarity
    grouping reorders: the source head at each position, per head of that tensor (query
    heads for query/out/bias, KV heads for key/value); else None."""
    if name.endswith('/relpos_bias/rel_embedding'):
      stack = 'encoder' if name.startswith('encoder/') else 'decoder_self'
      module = next((m for m in self.perms if _module_stack(m) == stack), None)
    else:
      module = name.rsplit('/', 2)[0]
    perm = self.perms.get(module)
    if perm is None or name.endswith(('/key/kernel', '/value/kernel')):
      return perm
    stack = _module_stack(module)
    per_kv = self.source.query_heads(stack) // self.source.kv_heads(stack)
    return (perm[:, None] * per_kv + np.arange(per_kv)).reshape(-1)

  def source_kv(self, kv_name: str, value: Optional[np.ndarray] = None) -> np.ndarray:
    """A source K/V kernel [D, K*H], its heads in the grouping's order."""
    value = self.tensors[kv_name].read() if value is None else value
    return permute_heads(value, self.permuted(kv_name), self.source.head_dim, axis=1)

  def factor(self, kv_name: str) -> Tuple[np.ndarray, np.ndarray]:
    """`factor_pool` of the source K/V kernel `kv_name`, computed once for its two users
    (the K/V rule and the query/out rule)."""
    if kv_name not in self.factor_cache:
      k_src, k_tgt = self.kv_change(kv_name)
      self.factor_cache[kv_name] = [factor_pool(
          self.source_kv(kv_name), k_src, k_tgt, self.source.head_dim, self.method,
          self.moment(kv_name.rsplit('/', 2)[0])), 0]
    entry = self.factor_cache[kv_name]
    entry[1] += 1
    if entry[1] == 2:
      del self.factor_cache[kv_name]
    return entry[0]

  def changed(self, name: str) -> bool:
    """Whether a parameter's value is not the source's (its Adafactor slots restart)."""
    if (name.endswith(('/key_weights', '/value_weights')) or self.folded_into(name)
        or self.permuted(name) is not None):
      return True
    group = self.group(name)
    if group is None:
      return False
    stack = network.kv_kernel_stack(name)
    folds = bool(self.source.kv_weights(stack)) and not self.target.kv_weights(stack)
    return (self.kv_change(name) is not None or folds
            or (len(group) > 1 and self.layer_method != 'first'))


# ------------------------------------------------------------------- rules ----

def uses_seed(method: Optional[str], wgqa_init: Optional[str] = None) -> bool:
  """Whether a conversion draws random weights (`--seed` matters): --method random, and
  --method wgqa with --wgqa-init normal. None: the default."""
  return method == 'random' or (method == 'wgqa' and wgqa_init == 'normal')


def pool_kv(kernel: np.ndarray, k_src: int, k_tgt: int, head_dim: int, method: str,
            rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """[D, K_src*H] -> [D, K_tgt*H], pooling contiguous groups of K_src // K_tgt heads.

  mean: the paper's mean-pooling; first: the first head of each group; random: a
  fresh init with T5's fan-in scaling (the paper's ablations).
  """
  d = kernel.shape[0]
  r = k_src // k_tgt
  heads = kernel.reshape(d, k_tgt, r, head_dim)  # [D, K, R, H]
  if method == 'mean':
    out = heads.astype(np.float32).mean(axis=2)  # [D, K, H]
  elif method == 'first':
    out = heads[:, :, 0, :]
  elif method == 'random':
    out = rng.standard_normal((d, k_tgt, head_dim), np.float32) / np.sqrt(d)
  else:
    raise ConversionError(f'unknown method {method!r}; use one of {METHODS}.')
  return out.reshape(d, k_tgt * head_dim).astype(kernel.dtype)  # [D, K*H]


def pool_params(params, source: network.T5Config, target: network.T5Config,
                method: str = 'mean'):
  """In memory: the parameters of `target` from those of `source` (a tree as
  `network.init_params` makes), K/V kernels whose head count differs pooled by `method`
  ('mean' or 'first'), every other leaf the same object."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    stack = network.kv_kernel_stack(path)
    if stack is not None and source.kv_heads(stack) != target.kv_heads(stack):
      pooled = pool_kv(np.asarray(leaf, np.float32), source.kv_heads(stack),
                       target.kv_heads(stack), target.head_dim, method)
      leaf = jnp.asarray(pooled, leaf.dtype)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


def fold_kv_weights(params, config: network.T5Config):
  """WGQA -> plain GQA, exactly: each stack's learned weights are folded into its K/V
  kernels (`layers.pool_kv_kernel`, linear in the kernel), giving kernels [D, K*H] and
  no `key_weights`/`value_weights`. Returns (parameters, the plain config)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    if path[-1] in ('key_weights', 'value_weights'):
      continue
    stack = network.kv_kernel_stack(path)
    kind = config.kv_weights(stack) if stack else None
    if kind is not None:
      weights = flat[path[:-2] + (f'{path[-2]}_weights',)]
      leaf = layers.pool_kv_kernel(jnp.asarray(leaf, jnp.float32), jnp.asarray(weights),
                                   kind, config.kv_heads(stack)).astype(leaf.dtype)
    out[path] = leaf
  plain = dataclasses.replace(config, **{f'{s}_kv_weights': None for s in network.STACKS})
  return traverse_util.unflatten_dict(out), plain


def _module_stack(module: str) -> str:
  return network.MODULE_STACK[module.rsplit('/', 1)[1]]


def permute_heads(value: np.ndarray, perm: Optional[np.ndarray], head_dim: int,
                  axis: int) -> np.ndarray:
  """value with its heads (blocks of head_dim along `axis`; rows of a relative-bias
  table when head_dim is 1) in the order `perm` (position p gets head perm[p])."""
  if perm is None:
    return value
  shape = value.shape
  blocks = np.moveaxis(value, axis, 0).reshape(len(perm), head_dim, -1)
  out = blocks[perm].reshape((shape[axis],) + tuple(np.delete(shape, axis)))
  return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def search_grouping(plan: 'Plan', stacks: Sequence[str]) -> Dict[str, np.ndarray]:
  """Similarity grouping: the order of the source KV heads for each attention module of
  `stacks` whose heads are pooled, by `lowrank.search_groups` on the method's affinity
  (K and V summed, calibration-weighted when given). Self-attention layers of a stack
  share one relative-bias table, so they share one order (their affinities summed);
  cross-attention has no bias and is grouped per layer. Identity orders are left out."""
  perms = {}
  kind = GROUPING_AFFINITY[plan.method]
  for stack in stacks:
    modules = [m for m in calibration_lib.module_names(plan.source, stack)
               if plan.kv_change(f'{m}/key/kernel') is not None]
    if not modules:
      continue
    k_src, k_tgt = plan.kv_change(f'{modules[0]}/key/kernel')
    h = plan.source.head_dim

    def module_affinity(module):
      total = 0
      for kind_of in ('key', 'value'):
        kernel = np.asarray(plan.tensors[f'{module}/{kind_of}/kernel'].read(), np.float64)
        heads = kernel.reshape(kernel.shape[0], k_src, h).transpose(1, 0, 2)
        total = total + lowrank.affinity(heads, plan.moment(module), kind)
      return total

    if stack == 'decoder_cross':
      found = {m: lowrank.search_groups(module_affinity(m), k_tgt) for m in modules}
    else:
      shared = lowrank.search_groups(sum(module_affinity(m) for m in modules), k_tgt)
      found = {m: shared for m in modules}
    perms.update({m: p for m, p in found.items() if not np.array_equal(p, np.arange(k_src))})
  return perms


def factor_pool(kernel: np.ndarray, k_src: int, k_tgt: int, head_dim: int,
                method: str = 'svd', calibration: Optional[np.ndarray] = None):
  """[D, K_src*H] -> ([D, K_tgt*H] float32: each contiguous group's shared head, [K_src, H,
  H] float64: source head s's map A_s, with W_s ~ U_g A_s), by `lowrank.svd_group`
  (method 'svd') or `lowrank.procrustes_group` ('procrustes'), weighted by the module's
  input second moment `calibration` when given."""
  d, r = kernel.shape[0], k_src // k_tgt
  group_fn = {'svd': lowrank.svd_group, 'procrustes': lowrank.procrustes_group}[method]
  heads = np.asarray(kernel, np.float64).reshape(d, k_tgt, r, head_dim)  # [D, K, R, H]
  lower = lowrank.calibration_factor(calibration, d)  # once for every group
  shared, maps = zip(*(group_fn(heads[:, g].transpose(1, 0, 2), lower=lower)
                       for g in range(k_tgt)))
  return (np.stack(shared, 1).reshape(d, k_tgt * head_dim).astype(np.float32),
          np.concatenate(maps, 0))


def _copy(plan, name, tensor):
  return tensor.read()


def _query_out(plan, name, tensor):
  """Query and out kernels: the source's, their heads in the grouping's order, and with a
  factored method the K (V) maps folded in: query head n's columns Q_n <- Q_n A_s^T (out
  rows O_n <- B_s O_n), s its source KV head."""
  value = permute_heads(tensor.read(), plan.permuted(name), plan.source.head_dim,
                        axis=0 if name.endswith('/out/kernel') else 1)
  kv_name = plan.folded_into(name)
  if kv_name is None:
    return value
  stack = network.kv_kernel_stack(kv_name)
  k_src = plan.kv_change(kv_name)[0]
  h, n = plan.source.head_dim, plan.source.query_heads(stack)
  maps = plan.factor(kv_name)[1]  # [K_src, H, H]
  per_query = maps[np.arange(n) // (n // k_src)]  # [N, H, H]
  if name.endswith('/query/kernel'):
    heads = np.asarray(value, np.float64).reshape(-1, n, h)  # [D, N, H]
    folded = np.matmul(heads.transpose(1, 0, 2), per_query.transpose(0, 2, 1)).transpose(
        1, 0, 2).reshape(value.shape)
  else:
    heads = np.asarray(value, np.float64).reshape(n, h, -1)  # [N, H, D]
    folded = np.matmul(per_query, heads).reshape(value.shape)
  return folded.astype(value.dtype)


def _kv(plan, name, tensor):
  group = plan.group(name)
  if not group:
    return SKIP  # a CLA/MLKV layer that reads an earlier layer's K/V
  stack = network.kv_kernel_stack(name)
  change = plan.kv_change(name)
  kernels = []
  for layer in group:
    layer_name = re.sub(r'layers_\d+', f'layers_{layer}', name, count=1)
    value = tensor.read() if layer_name == name else plan.tensors[layer_name].read()
    kind = plan.source.kv_weights(stack)
    if kind and not plan.target.kv_weights(stack):  # fold WGQA into plain GQA
      weights = plan.tensors[f'{layer_name.rsplit("/", 2)[0]}/'
                             f'{layer_name.split("/")[-2]}_weights'].read()
      value = np.asarray(layers.pool_kv_kernel(
          jnp.asarray(value, jnp.float32), jnp.asarray(weights, jnp.float32), kind,
          plan.source.kv_heads(stack)), np.float32).astype(value.dtype)
    if change is not None and plan.method in FACTORED:  # (no CLA with these: one layer)
      value = plan.factor(layer_name)[0].astype(value.dtype)
    elif change is not None:
      rng = np.random.default_rng([plan.seed, zlib.crc32(layer_name.encode())])
      value = pool_kv(plan.source_kv(layer_name, value), *change, plan.source.head_dim,
                      plan.method, rng)
    kernels.append(value)
  if plan.layer_method == 'first' or len(kernels) == 1:
    return kernels[0]
  if plan.layer_method == 'mean':
    return np.mean(np.stack(kernels).astype(np.float32), 0).astype(kernels[0].dtype)
  merged = kernels[0].astype(np.float32)
  for value in kernels[1:]:  # MLKV: ascending, pairwise
    merged = (merged + value.astype(np.float32)) / 2
  return merged.astype(kernels[0].dtype)


def _relpos(plan, name, tensor):
  """A stack's relative-bias table [N, buckets]: its rows follow the query heads of the
  stack's self-attention when similarity grouping reorders them."""
  return permute_heads(tensor.read(), plan.permuted(name), 1, axis=0)


def _kv_weights(plan, name, tensor):
  """WGQA's weights: new ones (an inline value), or, folding, none."""
  stack = network.kv_kernel_stack(name.rsplit('/', 1)[0] + '/key/kernel')
  return tensor.read() if plan.target.kv_weights(stack) else SKIP


def _slot(plan, name, tensor):
  """An Adafactor slot of parameter <p>: param_states/<p>/<v_row|v_col|v|m>."""
  param, slot = name[len('param_states/'):].rsplit('/', 1)
  if param not in plan.shapes:
    return SKIP  # a parameter the target does not have
  if not plan.changed(param):
    return tensor.read()
  if slot == 'm':  # full with momentum, a (1,) placeholder without: keep which
    shape = (1,) if tensor.shape == (1,) else plan.shapes[param]
  else:  # factored by the pooled kernel's own shape, with the source's threshold
    shape = optimizers.t5x_slot_shapes(
        plan.shapes[param], min_dim_size_to_factor=plan.min_dim_size_to_factor)[slot]
  return np.zeros(shape, tensor.dtype)


def _step(plan, name, tensor):
  return tensor.read()


RULES: List[Tuple[str, Callable]] = [
    (r'^token_embedder/embedding$', _copy),
    (r'^(encoder|decoder)/relpos_bias/rel_embedding$', _relpos),
    (r'^encoder/encoder_norm/scale$|^decoder/decoder_norm/scale$', _copy),
    (r'^(encoder|decoder)/layers_\d+/pre_(self_|cross_)?(attention|mlp)_layer_norm/scale$',
     _copy),
    (r'^(encoder|decoder)/layers_\d+/mlp/(wi|wi_0|wi_1|wo)/kernel$', _copy),
    (r'^(encoder/layers_\d+/attention|decoder/layers_\d+/(self_attention|'
     r'encoder_decoder_attention))/(query|out)/kernel$', _query_out),
    (_KV, _kv),
    (_KV.replace(r'/(key|value)/kernel$', r'/(key|value)_weights$'), _kv_weights),
    (r'^decoder/logits_dense/kernel$', _copy),
    (r'^param_states/.+/(v_row|v_col|v|m)$', _slot),
    (r'^step$', _step),
]


def match_rules(names: Sequence[str]) -> Dict[str, Callable]:
  """name -> rule function; raises ConversionError listing names no rule matches."""
  matched, unmatched = {}, []
  for name in names:
    fns = [fn for pattern, fn in RULES if re.match(pattern, name)]
    if len(fns) != 1:
      unmatched.append(name)
    else:
      matched[name] = fns[0]
  if unmatched:
    raise ConversionError(f'{len(unmatched)} checkpoint keys match no conversion rule: '
                          f'{unmatched[:10]}{" ..." if len(unmatched) > 10 else ""}')
  return matched


# ------------------------------------------------------------------ driver ----

def _leaves(source: base.Source, keep_opt_state: bool) -> Dict[str, base.Tensor]:
  """Every leaf to convert, under the rule table's names."""
  leaves = dict(source.params)
  if keep_opt_state and source.opt_state:
    leaves.update(source.opt_state)
  if source.step is not None:
    leaves['step'] = base.constant(np.int32(source.step))
  return leaves


def _output_name(name: str) -> str:
  """Rule-table name -> the writers' name in T5X's tree."""
  if name == 'step' or name.startswith('param_states/'):
    return f'state/{name}'
  return f'target/{name}'


DTYPES = ('bfloat16', 'float32', 'float16')
_LOCK_FIX = 'wait for that conversion to finish, or choose another DST'


def convert(src, dst, num_kv_heads: Optional[int], *, method: Optional[str] = None,
            stacks: Sequence[str] = network.PAPER_STACKS, output_format: str = 'orbax',
            opt_state: Optional[str] = None, reset_step: bool = False,
            dtype: Optional[str] = None,
            overwrite: bool = False, allow_pickle: bool = False, seed: Optional[int] = None,
            min_dim_size_to_factor: Optional[int] = None, progress: bool = True,
            allow_external_links: bool = False,
            notify: Optional[Callable[[str], None]] = None,
            wgqa_weights: Optional[str] = None, wgqa_init: Optional[str] = None,
            fold: bool = False, kv_layers=None, layer_method: Optional[str] = None,
            grouping: str = 'contiguous', calibration=None) -> dict:
  """Converts checkpoint `src` to GQA with `num_kv_heads` in `stacks`, written to `dst`.

  num_kv_heads None keeps the source's. method 'wgqa': WGQA (learned weights of shape
  `wgqa_weights`, initialised by `wgqa_init`, pooling the source's heads; the source must
  have as many KV heads as query heads in `stacks`). fold: WGQA -> plain GQA, exactly.
  kv_layers (a tuple of producer layers, or 'cla<s>' / 'mlkv<m>'): CLA/MLKV in `stacks`,
  each producer's K/V made from its group's by `layer_method` (LAYER_METHODS).
  method 'svd' / 'procrustes': low-rank / aligned merging, per-head maps folded into the
  query and out kernels (their Adafactor slots restart). grouping 'similarity': which
  heads share a KV head is searched (`search_grouping`) instead of contiguous.
  calibration: a `gqa-jax calibrate` file (path) weighting svd, procrustes and the
  grouping search by each module's input second moment; None: the kernels alone. It must
  hold finite statistics of this very checkpoint (its config and source fingerprint).

  method, opt_state, wgqa_weights, wgqa_init and layer_method left None take DEFAULTS;
  one given that this conversion would not use is refused (as `--wgqa-weights` without
  method 'wgqa', `--layer-method` without kv_layers, a method or similarity grouping
  where no stack gets fewer KV heads, `--opt-state` for a source without optimizer
  state, `--reset-step` for one without a step), and so is a stack named twice.

  The output is written to a temporary folder beside `dst` and renamed to `dst`
  only when complete, so an interrupted conversion never leaves a `dst` that loads.
  Memory stays near the largest tensor: tensors are read, converted and written
  one at a time. A CRC-32 of every tensor written goes into gqa_jax.json, so that
  `gqa-jax inspect --verify` finds changed bytes later.

  `dst` is locked (`.<name>.lock` beside it) from the first write to the last, so a
  second conversion to the same `dst` is refused (`errors.OutputLocked`). Under the
  lock, what killed conversions left beside `dst` is cleaned up first: a previous
  `dst` hidden by an interrupted `overwrite` swap is put back, and temporary folders
  are removed; `notify` (default: stderr) is told what was done. A previous `dst` is put
  back only when it is known whole: moved aside by a swap that had not committed.

  min_dim_size_to_factor: Adafactor's threshold for the slots of pooled kernels; None
  reads it off the source's slots (T5X's 128 whenever they fit it). A value the source's
  slots contradict is refused rather than writing slots of two factorings.
  allow_external_links: read data through symlinks that leave the source's folder.

  Returns a summary (paths, formats, configs, counts, seconds, notes).
  """
  start = time.time()
  notes = []

  def note(message):
    notes.append(message)
    (notify or (lambda m: print(f'note: {m}', file=sys.stderr)))(message)

  for value, allowed, what in ((method, METHODS, 'method'),
                               (output_format, OUTPUT_FORMATS, 'output format'),
                               (opt_state, OPT_STATE, 'opt_state'),
                               (wgqa_weights, layers.KV_WEIGHT_SHAPES, 'WGQA weight shape'),
                               (wgqa_init, layers.KV_WEIGHT_INITS, 'WGQA initialisation'),
                               (layer_method, LAYER_METHODS, 'layer method'),
                               (grouping, GROUPINGS, 'grouping')):
    if value is not None and value not in allowed:
      raise ConversionError(f'unknown {what} {value!r}; use one of {allowed}.')
  stacks = _check_stacks(stacks)
  _check_unused(method=method, wgqa_weights=wgqa_weights, wgqa_init=wgqa_init,
                layer_method=layer_method, kv_layers=kv_layers, grouping=grouping)
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f'--dtype {dtype!r} is not an activation dtype; use one of '
                          f'{", ".join(DTYPES)} (or leave it out to keep the source\'s).')
  if seed is not None and (not isinstance(seed, int) or seed < 0):
    raise ConversionError(f'--seed {seed!r} must be a non-negative integer.')
  if seed is not None and not uses_seed(method, wgqa_init):
    raise ConversionError(
        f'--seed {seed} draws only the weights of --method random and of --method wgqa '
        f'--wgqa-init normal; --method {method or DEFAULTS["method"]}'
        f'{" --wgqa-init " + (wgqa_init or DEFAULTS["wgqa_init"]) if method == "wgqa" else ""}'
        ' draws none: leave --seed out.')
  seed = 0 if seed is None else seed
  # Orbax and tensorstore want absolute paths without '..': resolve once, here.
  src, dst = base.resolve_path(src, builtin=True), base.resolve_path(dst)
  _check_destination(src, dst, overwrite)  # before any work; again under the lock
  source = checkpoints.open_checkpoint(src, allow_pickle, allow_external_links)
  if opt_state is not None and not source.opt_state:
    raise ConversionError(f'--opt-state {opt_state} says what to do with the optimizer state, '
                          f'but SRC {src} has no optimizer state (Adafactor slots): leave '
                          '--opt-state out.')
  if reset_step and source.step is None:
    raise ConversionError(f'--reset-step starts the output at step 0, but SRC {src} records '
                          'no step (the output starts at step 0 anyway): leave it out.')
  if num_kv_heads is not None:
    _check_heads(source, num_kv_heads, stacks)
  target = _target_config(source.config, num_kv_heads, stacks, method,
                          wgqa_weights or DEFAULTS['wgqa_weights'],
                          wgqa_init or DEFAULTS['wgqa_init'], fold, kv_layers)
  if grouping == 'similarity' and (method == 'wgqa' or fold or kv_layers is not None or any(
      source.config.kv_weights(s) for s in stacks)):
    raise ConversionError('--grouping similarity reorders heads before pooling them: it '
                          'does not combine with --method wgqa, --fold, --kv-layers or a '
                          'WGQA source (convert with --grouping similarity first, then '
                          'apply those to its output).')
  _check_pooling(source.config, target, stacks, method, grouping, fold)
  _check_layer_method(source.config, target, stacks, layer_method, kv_layers)
  method, opt_state = method or DEFAULTS['method'], opt_state or DEFAULTS['opt_state']
  wgqa_weights = wgqa_weights or DEFAULTS['wgqa_weights']
  wgqa_init = wgqa_init or DEFAULTS['wgqa_init']
  layer_method = layer_method or DEFAULTS['layer_method']
  if calibration is not None and method not in FACTORED and grouping != 'similarity':
    raise ConversionError(f'--calibration weights --method {"/".join(FACTORED)} and '
                          f'--grouping similarity; --method {method} with contiguous '
                          'groups does not use it: leave it out, or add --grouping '
                          'similarity.')
  moments = None
  if calibration is not None:
    try:
      stats = calibration_lib.load(calibration)
      stats.check_source(source)  # this checkpoint's (config, fingerprint), and finite
      stats.check_finite([m for s in stacks for m in calibration_lib.module_names(
          source.config, s) if m in stats.modules])
    except (OSError, ValueError) as e:
      raise ConversionError(f'--calibration {calibration}: {e}') from e
    moments = stats.moment
  for stack in stacks:
    k_src, k_tgt = source.config.kv_heads(stack), target.kv_heads(stack)
    if method == 'wgqa' and k_src != source.config.query_heads(stack):
      raise ConversionError(f'--method wgqa pools the source\'s own heads with learned '
                            f'weights, but {stack} has {k_src} KV heads for '
                            f'{source.config.query_heads(stack)} query heads: convert the '
                            'MHA checkpoint.')
    if k_src % k_tgt:
      raise ConversionError(f'{stack} has {k_src} KV heads in the source; {k_tgt} does not '
                            f'divide it, so heads cannot be pooled into groups.')
  if dtype is not None:
    target = dataclasses.replace(target, dtype=dtype)
  expected = network.flat_param_shapes(target)
  plan = Plan(source.config, target, method, seed, shapes=expected,
              tensors=dict(source.params), layer_method=layer_method, moments=moments)
  if grouping == 'similarity':
    try:
      plan = dataclasses.replace(plan, perms=search_grouping(plan, stacks))
    except ValueError as e:  # a calibration file without a module it needs
      raise ConversionError(f'--calibration {calibration}: {e}') from e
  leaves = _leaves(source, opt_state == 'reinit')
  base.check_shapes(source.params, source.config, f'source {src}')
  new = _new_weights(plan, seed)
  if opt_state == 'reinit' and source.opt_state and (
      new or any(map(plan.changed, source.params))):
    plan = dataclasses.replace(plan, min_dim_size_to_factor=_source_factoring(
        source, min_dim_size_to_factor))
  leaves.update(new)
  if opt_state == 'reinit' and source.opt_state:
    leaves.update(_new_slots(plan, source, new))
  rules = match_rules(list(leaves) + list(source.opt_state or {}))
  step = 0 if reset_step or source.step is None else source.step
  summary = {
      'source': {'path': str(Path(src).resolve()), 'format': source.format,
                 'step': source.step, 'config': source.config.to_dict()},
      'config': target.to_dict(), 'step': step, 'method': method, 'stacks': list(stacks),
      'num_kv_heads': num_kv_heads, 'opt_state': opt_state, 'seed': seed,
      **({'wgqa_weights': wgqa_weights, 'wgqa_init': wgqa_init} if method == 'wgqa' else {}),
      **({'fold': True} if fold else {}),
      'grouping': grouping,
      **({'groups': {m: p.tolist() for m, p in sorted(plan.perms.items())}}
         if grouping == 'similarity' else {}),
      **({'calibration': str(base.resolve_path(calibration))}
         if calibration is not None else {}),
      **({'kv_layers': kv_layers if isinstance(kv_layers, str) else list(kv_layers),
          'layer_method': layer_method} if kv_layers is not None else {}),
      'min_dim_size_to_factor': plan.min_dim_size_to_factor,
      'output_format': output_format, 'tensors': len(leaves)}

  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConversionError(f'cannot create the folder of DST {dst.parent} ({e.strerror}): '
                          'choose a DST in a folder you can write.') from e
  with locks.hold(dst.parent / f'.{dst.name}.lock', f'convert destination {dst}', _LOCK_FIX):
    _recover(dst, note)
    _check_destination(src, dst, overwrite)  # another conversion may have finished first
    _write(dst, step, output_format, plan, rules, leaves, expected, summary, progress, note)
  summary['seconds'] = round(time.time() - start, 3)
  summary['path'] = str(dst / f'checkpoint_{step}')
  summary['notes'] = notes
  return summary


def _target_config(config: network.T5Config, num_kv_heads: Optional[int],
                   stacks: Sequence[str], method: str, wgqa_weights: str, wgqa_init: str,
                   fold: bool, kv_layers) -> network.T5Config:
  """The converted model's config (ConversionError for a combination that cannot be)."""
  weighted = [s for s in network.STACKS if config.kv_weights(s)]
  if fold and not weighted:
    raise ConversionError('--fold turns a WGQA checkpoint into plain GQA, but the source '
                          'has no WGQA weights (kv_weights) in any stack.')
  if weighted and not fold:
    raise ConversionError(f'the source is WGQA in {", ".join(weighted)}: convert it with '
                          '--fold (to plain GQA, exact) first.')
  if method in FACTORED and kv_layers is not None:
    raise ConversionError(f'--method {method} folds per-head maps into each layer\'s own '
                          'query and out kernels; it does not combine with --kv-layers '
                          f'(convert with --method {method} first, then --kv-layers from '
                          'that checkpoint).')
  if fold and (num_kv_heads is not None or method is not None or kv_layers is not None):
    raise ConversionError('--fold only folds the WGQA weights into plain GQA kernels: give '
                          'no --num-kv-heads, --method or --kv-layers with it.')
  fields = {}
  for stack in stacks:
    if num_kv_heads is not None:
      fields[f'{stack}_kv_heads'] = num_kv_heads
    if method == 'wgqa':
      fields[f'{stack}_kv_weights'] = wgqa_weights
    if kv_layers is not None:
      fields[f'{stack}_kv_layers'] = kv_layers
  if fold:
    fields.update({f'{s}_kv_weights': None for s in weighted})
  if method == 'wgqa':
    fields['kv_weights_init'] = wgqa_init
  try:
    return dataclasses.replace(config, **fields)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def _check_stacks(stacks) -> Tuple[str, ...]:
  """`stacks` as a tuple of known stacks, each named once (ConversionError otherwise)."""
  stacks = tuple(stacks.split(',')) if isinstance(stacks, str) else tuple(stacks)
  named = ','.join(map(str, stacks))
  if not stacks or any(s not in network.STACKS for s in stacks):
    raise ConversionError(f'--stacks {named}: give a comma-separated subset of '
                          f'{",".join(network.STACKS)}.')
  twice = [s for s in network.STACKS if stacks.count(s) > 1]
  if twice:
    raise ConversionError(f'--stacks {named} names {", ".join(twice)} more than once: name '
                          'each stack once.')
  return stacks


def _check_unused(*, method, wgqa_weights, wgqa_init, layer_method, kv_layers, grouping):
  """Refuses an option that the other options leave unused (None: not given)."""
  for value, flag in ((wgqa_weights, '--wgqa-weights'), (wgqa_init, '--wgqa-init')):
    if value is not None and method != 'wgqa':
      raise ConversionError(f'{flag} needs --method wgqa (it sets up the learned weights of '
                            f'WGQA){f", not --method {method}" if method else ""}: leave it '
                            'out, or add --method wgqa.')
  if layer_method is not None and kv_layers is None:
    raise ConversionError('--layer-method needs --kv-layers (it makes the kernel of a layer '
                          'that keeps K/V from those of the layers that share it): leave it '
                          'out, or add --kv-layers.')
  if grouping == 'similarity' and method == 'random':
    raise ConversionError('--grouping similarity needs --method mean, first, svd or '
                          'procrustes: --method random draws new K/V kernels, which no '
                          'grouping of the heads changes; leave --grouping out.')


def _check_pooling(source: network.T5Config, target: network.T5Config,
                   stacks: Sequence[str], method: Optional[str], grouping: str, fold: bool):
  """Refuses a pooling method or similarity grouping given where no converted stack
  gets fewer KV heads (nothing is pooled: an identity copy, or --kv-layers alone)."""
  if fold or any(target.kv_heads(s) < source.kv_heads(s) for s in stacks):
    return
  kept = ', '.join(f'{s} keeps {source.kv_heads(s)}' for s in stacks)
  for flag, given in ((f'--method {method}', method not in (None, 'wgqa')),
                      ('--grouping similarity', grouping == 'similarity')):
    if given:
      raise ConversionError(f'{flag} pools KV heads into fewer groups, but no converted stack '
                            f'gets fewer KV heads ({kept}): leave {flag.split()[0]} out, or '
                            'give a smaller --num-kv-heads.')


def _check_layer_method(source: network.T5Config, target: network.T5Config,
                        stacks: Sequence[str], layer_method: Optional[str], kv_layers):
  """Refuses --layer-method where --kv-layers keeps K/V in every layer (none shares)."""
  if layer_method is None or kv_layers is None or any(
      target.producer_layers(s) != source.producer_layers(s) for s in stacks):
    return
  spec = kv_layers if isinstance(kv_layers, str) else ','.join(map(str, kv_layers))
  raise ConversionError(f'--layer-method {layer_method} merges the K/V kernels of layers that '
                        f'share them, but --kv-layers {spec} keeps K/V in every layer of '
                        f'{", ".join(stacks)} (no layer shares): leave --layer-method out, or '
                        'give --kv-layers fewer layers.')


def _new_weights(plan: Plan, seed: int) -> Dict[str, base.Tensor]:
  """WGQA's weights for every K/V kernel that gets them: 1 / group size ('mean', exactly
  mean pooling) or standard normal draws ('normal'), as the model initialises them."""
  out = {}
  for name, shape in plan.shapes.items():
    if not name.endswith(('/key_weights', '/value_weights')):
      continue
    if plan.target.kv_weights_init == 'mean':
      stack = network.kv_kernel_stack(name.rsplit('/', 1)[0] + '/key/kernel')
      value = np.full(shape, plan.target.kv_heads(stack) / plan.target.query_heads(stack),
                      np.float32)
    else:
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      value = rng.standard_normal(shape).astype(np.float32)
    out[name] = base.constant(value)
  return out


def _new_slots(plan: Plan, source: base.Source, new: Dict[str, base.Tensor]):
  """Zero Adafactor slots for new parameters, the slot names and momentum placeholder
  as the source's K/V kernels have them."""
  out = {}
  for name in new:
    kernel = name.rsplit('/', 1)[0] + '/key/kernel'
    shapes = optimizers.t5x_slot_shapes(
        plan.shapes[name], min_dim_size_to_factor=plan.min_dim_size_to_factor or 128)
    for slot in optimizers.SLOTS:
      have = source.opt_state.get(f'param_states/{kernel}/{slot}')
      if have is None:
        continue
      shape = (1,) if slot == 'm' and have.shape == (1,) else shapes[slot]
      out[f'param_states/{name}/{slot}'] = base.constant(np.zeros(shape, have.dtype))
  return out


def _sibling(dst: Path, kind: str, tag: str) -> Path:
  """The hidden name `.<dst name>.<kind>-<tag>` beside `dst` (kind PARTIAL, ASIDE or
  DELETING; one swap's names share their tag)."""
  return dst.parent / f'.{dst.name}.{kind}-{tag}'


def _write(dst: Path, step: int, output_format: str, plan: Plan, rules, leaves, expected,
           summary: dict, progress: bool, note: Callable[[str], None]):
  """Writes the output into a temporary folder and swaps it in as `dst` (under the lock).

  With an existing `dst` (overwrite) the swap is three renames, each one step: `dst` ->
  `.dst.old-<tag>` (aside, whole), the output `.dst.partial-<tag>` -> `dst` (the commit),
  the aside -> `.dst.deleting-<tag>`, which is then deleted. So an `.old-` is always whole,
  and one whose `.partial-` of the same tag still exists was hidden by a swap that had not
  committed: a kill between the first two renames leaves exactly that, and the next
  conversion to `dst` puts it back (`_recover`). Whatever a kill leaves later (an aside of
  a committed swap, a half-deleted `.deleting-`) is removed, never restored.
  """
  tag = uuid.uuid4().hex[:_TAG_HEX]
  tmp = _sibling(dst, PARTIAL, tag)
  step_dir = tmp / f'checkpoint_{step}'
  old = None
  checksums = {}
  try:
    tmp.mkdir()
    writer = (orbax.OrbaxWriter(step_dir) if output_format == 'orbax'
              else t5x.LegacyWriter(step_dir))
    for name in _progress(sorted(leaves), progress):
      value = np.int32(step) if name == 'step' else rules[name](plan, name, leaves[name])
      if value is SKIP:
        continue
      if name in expected and tuple(value.shape) != expected[name]:
        raise ConversionError(f'{name}: converted shape {value.shape} != expected '
                              f'{expected[name]} (shape mismatch).')
      if name != 'step':
        checksums[name] = base.checksum(value)
      writer.add(_output_name(name), value)
    missing = sorted(set(expected) - set(checksums))
    if missing:  # a bug, not bad input: the rules left out parameters of the target
      raise ConversionError(f'{len(missing)} parameters of the converted model were not '
                            f'written: {missing[:5]}.')
    if 'step' not in leaves:
      writer.add('state/step', np.int32(step))
    writer.close()
    orbax.write_metadata(step_dir, dict(
        summary, checksums={'algorithm': base.CHECKSUM, 'tensors': checksums}))
    if dst.exists():  # only with overwrite: swap in the complete result, then delete
      old = _sibling(dst, ASIDE, tag)
      os.rename(dst, old)
      os.rename(tmp, dst)
    else:
      os.rename(tmp, dst)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists() and not dst.exists():
      os.rename(old, dst)  # the swap failed between its renames: put the old DST back
    if isinstance(e, OSError):  # a full disk, a folder we may not write: not a bug
      raise ConversionError(f'writing {dst} failed ({e}); nothing was written to DST.') from e
    raise
  if old is not None:  # committed: DST is the new output; the previous one goes
    doomed = _sibling(dst, DELETING, tag)
    try:
      os.rename(old, doomed)  # from here on, never mistaken for a whole previous DST
      shutil.rmtree(doomed)
    except OSError as e:  # DST is written: a leftover is the next conversion's to remove
      note(f'{dst} is written, but its previous contents were not all deleted ({e}); the '
           'next conversion to it removes them.')


def _check_destination(src: Path, dst: Path, overwrite: bool):
  """Refuses a DST that cannot be written, or whose replacement would lose data."""
  if dst.parent == dst:
    raise ConversionError(f'DST {dst} is the root folder: choose a new folder for the output.')
  # Its name, and the hidden names beside it (.NAME.lock, .NAME.partial-<tag> ...), must
  # fit the file system, or the conversion would fail once done.
  outputs.check_output_name(dst, 'DST', _LONGEST_SIBLING)
  for folder in dst.parents:
    if folder.exists() or folder.is_symlink():
      if not folder.is_dir():
        raise ConversionError(f'{folder} is a file, so DST {dst} cannot be created under it: '
                              'choose another DST.')
      break
  real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
  if base.within(real_dst, real_src):
    raise ConversionError(f'DST {dst} is {"SRC" if real_dst == real_src else "inside SRC"} '
                          f'{src}: write the output to a folder outside the source.')
  if base.within(real_src, real_dst):
    raise ConversionError(f'SRC {src} is inside DST {dst}: replacing DST would delete the '
                          'source; choose another DST.')
  if not (dst.exists() or dst.is_symlink()):
    return
  if not overwrite:
    raise ConversionError(f'{dst} already exists; choose another destination or pass '
                          '--overwrite.')
  if dst.is_symlink():
    raise ConversionError(f'DST {dst} is a symbolic link (to {os.path.realpath(dst)}): '
                          '--overwrite replaces folders only; give the folder it points to.')
  if not dst.is_dir():
    raise ConversionError(f'DST {dst} is a file, not a checkpoint folder: --overwrite '
                          'replaces a folder of checkpoints only; remove the file or choose '
                          'another DST.')
  foreign = sorted(p.name for p in dst.iterdir()
                   if not (re.fullmatch(r'checkpoint_\d+', p.name) and p.is_dir()))
  if foreign:
    raise ConversionError(
        f'DST {dst} holds {", ".join(foreign[:5])}{" ..." if len(foreign) > 5 else ""}, '
        'which are not checkpoint_<step> folders: --overwrite replaces a folder of '
        'checkpoints only (it deletes everything in it); move them or choose another DST.')


def _check_heads(source: base.Source, num_kv_heads: int, stacks: Sequence[str]):
  """Refuses a head count that pooling cannot reach (more heads than the source has)."""
  n = source.config.num_heads
  if num_kv_heads > n:
    raise ConversionError(f'--num-kv-heads {num_kv_heads} is more than the {n} query heads '
                          f'of the source: choose a divisor of {n} (1 is MQA, {n} is MHA).')
  fewer = [f'{s} has {source.config.kv_heads(s)}' for s in stacks
           if source.config.kv_heads(s) < num_kv_heads]
  if fewer:
    origin = (source.metadata.get('source') or {}).get('path')
    raise ConversionError(
        f'the source has fewer KV heads than --num-kv-heads {num_kv_heads} '
        f'({", ".join(fewer)}): conversion pools heads into fewer groups, so converting '
        'back to more KV heads is not possible; convert the MHA checkpoint instead'
        f'{f" ({origin})" if origin else ""}.')


def _du(path: Path) -> int:
  """Bytes under `path` (a leftover folder), without following links."""
  if not path.is_dir() or path.is_symlink():
    return path.lstat().st_size
  return sum(p.lstat().st_size for p in path.rglob('*') if not p.is_dir())


def _recover(dst: Path, note: Callable[[str], None]):
  """Cleans up after conversions to `dst` that were killed (called under dst's lock).

  Temporary folders are only made under the lock, so any found now belong to a dead
  process. Without a `dst`, an aside (`.old-<tag>`) whose output `.partial-<tag>` is
  still there is the previous DST hidden by a swap killed before it committed: it is
  whole (see `_write`), and put back. Any other aside belongs to a swap that committed
  (its DST was written, and maybe removed since): it is removed with the temporary
  folders and `.deleting-` ones, never restored. An aside named by a gqa_jax before the
  tags (`.old-<time>`, deleted under that name, so maybe half deleted) is removed
  beside a `dst`; without one it is kept where it is, and the user told.
  """
  prefix = f'.{dst.name}.'
  pattern = glob.escape(prefix)
  found = lambda kind: sorted(dst.parent.glob(f'{pattern}{kind}-*'))
  tag = lambda path, kind: path.name[len(f'{prefix}{kind}-'):]
  olds, partials, deleting = found(ASIDE), found(PARTIAL), found(DELETING)
  tagged = lambda path: re.fullmatch(f'[0-9a-f]{{{_TAG_HEX}}}', tag(path, ASIDE)) is not None
  if not (dst.exists() or dst.is_symlink()):
    pending = {tag(p, PARTIAL) for p in partials}
    whole = [p for p in olds if tagged(p) and tag(p, ASIDE) in pending and p.is_dir()
             and not p.is_symlink()]
    if whole:
      keep = max(whole, key=lambda p: p.stat().st_ctime_ns)  # the latest swap's
      olds.remove(keep)
      os.rename(keep, dst)
      note(f'restored {dst} from {keep.name}, which a conversion with --overwrite that was '
           'interrupted while swapping in its output had left hidden.')
    else:
      unknown = [p for p in olds if not tagged(p)]
      if unknown:
        olds = [p for p in olds if tagged(p)]
        note(f'kept {", ".join(p.name for p in unknown)} beside {dst}, not put back: a '
             'previous DST that an older gqa-jax was replacing when it was interrupted, maybe '
             'half deleted; check it with gqa-jax inspect --verify and rename it if you need '
             f'it (the next conversion to {dst.name} removes it).')
  leftovers = olds + partials + deleting
  if leftovers:
    size = sum(_du(p) for p in leftovers)
    for path in leftovers:
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink(missing_ok=True)
    note(f'removed {len(leftovers)} leftover{"s" if len(leftovers) > 1 else ""} of '
         f'interrupted conversions to {dst} ({info.format_bytes(size)}).')


def _source_factoring(source: base.Source, requested: Optional[int]) -> int:
  """The min_dim_size_to_factor that wrote the source's Adafactor slots."""
  slots = {}
  for name, tensor in source.opt_state.items():
    param, slot = name[len('param_states/'):].rsplit('/', 1)
    slots.setdefault(param, {})[slot] = tensor.shape
  shapes = {p: tuple(source.params[p].shape) for p in slots}
  prefer = requested or 128
  found = optimizers.t5x_factoring(slots, shapes, prefer)
  if found == prefer:
    return found
  example = next((f'{p} {shapes[p]}: {sorted(s.items())}' for p, s in slots.items() if any(
      optimizers.t5x_slot_shapes(shapes[p], min_dim_size_to_factor=prefer)[k] != v
      for k, v in s.items() if k != 'm')), '')
  if found is None:
    raise ConversionError(
        f"the source's Adafactor slots follow T5X's factoring rule for no "
        f'min_dim_size_to_factor (e.g. {example}); convert with --opt-state drop to write '
        'parameters and step only (the run then starts Adafactor from zeros).')
  if requested is not None:
    raise ConversionError(
        f"min_dim_size_to_factor={requested} contradicts the source's Adafactor slots "
        f'(e.g. {example}), which fit {found}: pass that, or --opt-state drop.')
  return found


def _progress(names, enabled: bool):
  if not enabled:
    return names
  from tqdm import tqdm
  return tqdm(names, desc='converting', unit='tensor', dynamic_ncols=True)
