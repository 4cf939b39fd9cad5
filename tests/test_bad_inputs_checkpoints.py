"""Issue 13, checkpoints: every bad input to `convert` / `inspect` is one line and exit 2
with nothing loadable written; checkpoints cannot read outside their folder; a locked
DST; killed conversions and saves leave data that the next run restores or cleans up;
`inspect --verify` names damaged tensors.

Everything runs as the user types it, from a temporary working directory with relative
paths. One tiny T5X legacy source and one conversion of it are built per module.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from conftest import assert_nothing_loads, assert_user_error
from gqa_jax import checkpoints, locks, network
from gqa_jax import convert as convert_lib
from gqa_jax.checkpoints import orbax, t5x, training

STEP = 3
KV = 'decoder/layers_0/self_attention/key/kernel'


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """{'src': tiny MHA T5X legacy checkpoint_3, 'conv': its GQA-2 conversion, 'params'}."""
  root = tmp_path_factory.mktemp('built')
  cfg = network.get_preset('tiny', vocab_size=64, dtype='float32')
  params = {'/'.join(k): np.array(v) for k, v in flatten_dict(
      network.init_params(cfg, jax.random.PRNGKey(3))).items()}
  t5x.write_all(root / 'src' / f'checkpoint_{STEP}',
                [(f'target/{k}', v) for k, v in params.items()] +
                [('state/step', np.int32(STEP))])
  convert_lib.convert(root / 'src', root / 'conv', 2, progress=False)
  return {'root': root, 'src': root / 'src', 'conv': root / 'conv', 'params': params}


@pytest.fixture
def work(tmp_path, monkeypatch, built):
  """A fresh working directory holding writable copies `src/` and `conv/`."""
  for name in ('src', 'conv'):
    shutil.copytree(built[name], tmp_path / name)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def ckpt_file(folder, name):
  return Path(folder) / f'checkpoint_{STEP}' / name


def edit_msgpack(folder, edit):
  """Rewrites the T5X msgpack of `folder`, applying `edit` to every tensorstore spec."""
  file = ckpt_file(folder, 'checkpoint')
  def walk(node, path=()):
    if isinstance(node, dict) and 'driver' in node:  # named as in the tree: optimizer/target/..
      return edit('/'.join(path[1:]), node)
    return {k: walk(v, path + (k,)) for k, v in node.items()} if isinstance(node, dict) else node
  file.write_bytes(serialization.msgpack_serialize(
      walk(serialization.msgpack_restore(file.read_bytes()))))


def set_metadata(text):
  ckpt_file('conv', orbax.METADATA_FILE).write_text(text)


def metadata_with(**config_changes):
  info = json.loads(ckpt_file('conv', orbax.METADATA_FILE).read_text())
  info['config'].update(config_changes)
  return json.dumps(info)


def point_kv_outside(key):
  """src's KV kernel spec names an existing array folder outside src (absolute path)."""
  outside = Path('elsewhere').resolve()
  shutil.copytree(ckpt_file('src', 'target.decoder.layers_0.self_attention.key.kernel'),
                  outside / 'secret')
  def edit(name, spec):
    if name == f'target/{KV}':
      if key == 'kvstore':
        spec['kvstore']['path'] = str(outside / 'secret')
      else:  # older T5X files: a top-level path
        spec.pop('kvstore')
        spec['path'] = str(outside / 'secret')
    return spec
  edit_msgpack('src', edit)


def link_kv_outside(folder):
  """The KV kernel's array folder moved out of `folder` and symlinked back in."""
  inner = ckpt_file(folder, 'target.decoder.layers_0.self_attention.key.kernel')
  shutil.move(inner, 'moved_out')
  inner.symlink_to(Path('moved_out').resolve())


def hf_index_naming(shard):
  """An HF folder whose index maps shared.weight to `shard`."""
  Path('hf').mkdir()
  Path('hf/config.json').write_text(json.dumps({'model_type': 't5'}))
  Path('hf/model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'shared.weight': shard}}))
  Path('outside.safetensors').parent.mkdir(exist_ok=True)
  save_file({'shared.weight': np.ones((4, 4), np.float32)}, 'outside.safetensors')


def link_orbax_data_outside():
  """conv's OCDBT data folder moved out and symlinked back (a linked big-data folder)."""
  inner = ckpt_file('conv', 'state/d')
  shutil.move(inner, 'data_elsewhere')
  inner.symlink_to(Path('data_elsewhere').resolve())


def mkfile(path, text='mine'):
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(text)


CONVERT = ['convert', 'src', 'out', '--num-kv-heads', '2', '--quiet']

# id: (setup run in the working directory, argv, fragments of the one error line).
CASES = {
    'dst-exists-without-overwrite': (
        lambda: Path('out').mkdir(), CONVERT, ['already exists', '--overwrite']),
    'overwrite-onto-a-file': (
        lambda: mkfile('out'), CONVERT + ['--overwrite'],
        ['is a file, not a checkpoint folder', 'choose another DST']),
    'dst-under-a-file': (
        lambda: mkfile('afile'), ['convert', 'src', 'afile/out', '--num-kv-heads', '2'],
        ['afile is a file', 'cannot be created under it', 'choose another DST']),
    'overwrite-a-folder-of-other-files': (
        lambda: mkfile('out/notes.txt'), CONVERT + ['--overwrite'],
        ['notes.txt', 'not checkpoint_<step> folders', 'choose another DST']),
    'overwrite-a-symlink': (
        lambda: (Path('real').mkdir(), Path('out').symlink_to(Path('real').resolve())),
        CONVERT + ['--overwrite'], ['symbolic link', 'give the folder it points to']),
    'src-is-dst': (
        lambda: None, ['convert', 'src', 'src', '--num-kv-heads', '2', '--overwrite'],
        ['is SRC', 'outside the source']),
    'dst-inside-src': (
        lambda: None, ['convert', 'src', 'src/gqa', '--num-kv-heads', '2'],
        ['inside SRC', 'outside the source']),
    'src-inside-dst': (
        lambda: None, ['convert', f'src/checkpoint_{STEP}', 'src', '--num-kv-heads', '2',
                       '--overwrite'], ['inside DST', 'delete the source']),
    'more-kv-heads-than-the-source-has': (
        lambda: None, ['convert', 'conv', 'out', '--num-kv-heads', '4'],
        ['decoder_self has 2', 'converting back to more KV heads is not possible',
         'convert the MHA checkpoint instead']),
    'more-kv-heads-than-query-heads': (
        lambda: None, ['convert', 'src', 'out', '--num-kv-heads', '8'],
        ['more than the 4 query heads', 'choose a divisor of 4']),
    'dtype-bogus': (
        lambda: None, CONVERT + ['--dtype', 'float31'],
        ["--dtype 'float31'", 'bfloat16, float32, float16']),
    'seed-negative': (lambda: None, CONVERT + ['--seed', '-1'], ['--seed -1', 'non-negative']),
    'convert-from-garbage-gqa-jax-json': (
        lambda: set_metadata('{"config": {trunc'), ['convert', 'conv', 'out',
                                                    '--num-kv-heads', '1'],
        ['gqa_jax.json is not JSON', 'delete it', 'restore it']),
    'inspect-garbage-gqa-jax-json': (
        lambda: set_metadata('\x00\x01 garbage'), ['inspect', 'conv'],
        ['gqa_jax.json is not JSON', 'delete it']),
    'inspect-gqa-jax-json-not-an-object': (
        lambda: set_metadata('[1, 2]'), ['inspect', 'conv'], ['JSON list, not an object']),
    'inspect-gqa-jax-json-unknown-config-keys': (
        lambda: set_metadata(metadata_with(num_kv_head=2, colour='red')), ['inspect', 'conv'],
        ['unknown keys in "config": colour, num_kv_head', 'remove them']),
    'convert-gqa-jax-json-invalid-value': (
        lambda: set_metadata(metadata_with(num_heads='four', dtype='float31')),
        ['convert', 'conv', 'out', '--num-kv-heads', '1'],
        ["num_heads='four'", "dtype='float31'", 'correct them']),
    'inspect-gqa-jax-json-config-not-the-tensors': (
        lambda: set_metadata(metadata_with(emb_dim=64)), ['inspect', 'conv'],
        ['the config in', 'gqa_jax.json does not match the model config', 'expected (64, 32)',
         'delete it to infer the config']),
    't5x-kvstore-path-outside-the-folder': (
        lambda: point_kv_outside('kvstore'), CONVERT,
        [f'tensor target/{KV} points at', 'elsewhere/secret', 'outside the checkpoint folder']),
    't5x-top-level-path-outside-the-folder': (
        lambda: point_kv_outside('path'), ['inspect', 'src'],
        [f'tensor target/{KV} points at', 'outside the checkpoint folder']),
    't5x-symlink-out-of-the-folder': (
        lambda: link_kv_outside('src'), CONVERT,
        ['target.decoder.layers_0.self_attention.key.kernel', 'moved_out',
         '--allow-external-links']),
    'orbax-symlink-out-of-the-folder': (
        link_orbax_data_outside, ['inspect', 'conv'],
        ['state/d', 'data_elsewhere', '--allow-external-links']),
    'hf-index-absolute-shard-outside': (
        lambda: hf_index_naming(str(Path('outside.safetensors').resolve())),
        ['convert', 'hf', 'out', '--num-kv-heads', '2'],
        ["shard '/", "of tensor 'shared.weight'", 'outside the checkpoint folder']),
    'hf-index-dotdot-shard': (
        lambda: hf_index_naming('../outside.safetensors'), ['inspect', 'hf'],
        ["shard '../outside.safetensors'", 'outside the checkpoint folder']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(work, gqa, case):
  setup, argv, fragments = CASES[case]
  setup()
  before = sorted(str(p) for p in work.rglob('*'))
  result = gqa(*argv)
  assert_user_error(result, *fragments)
  assert sorted(str(p) for p in work.rglob('*')) == before  # no output, lock, temp folder
  if not Path('out').exists():
    assert_nothing_loads('out')
  if Path('out').is_file():
    assert Path('out').read_text() == 'mine'


def test_links_out_of_the_folder_are_read_with_the_flag(work, gqa, built):
  link_kv_outside('src')
  assert gqa(*CONVERT, '--allow-external-links').status == 0
  got = checkpoints.open_checkpoint('out').params[KV].read()
  expected = built['params'][KV].reshape(32, 2, 2, 8).mean(axis=2).reshape(32, 16)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  link_orbax_data_outside()
  assert gqa('inspect', 'conv', '--verify', '--allow-external-links').status == 0


def test_relative_and_gcs_paths_still_resolve_inside(work, gqa):
  """T5X's published checkpoints name gs:// paths; copied locally they are read by their
  folder name inside the checkpoint, and `..` in a relative path cannot leave it."""
  def edit(name, spec):
    folder = spec['kvstore']['path']
    spec['kvstore'] = ({'driver': 'gcs', 'bucket': 'b', 'path': f'x/{folder}'}
                       if name.startswith('target/encoder') else
                       {'driver': 'file', 'path': f'../../{folder}'})
    return spec
  edit_msgpack('src', edit)
  assert gqa('inspect', 'src', '--verify').status == 0


# ------------------------------------------------------------------- locks ----

def test_a_second_conversion_to_a_locked_dst_is_refused(work, gqa):
  with locks.hold(work / '.out.lock', 'convert destination out', 'wait'):
    result = gqa(*CONVERT)
  assert_user_error(result, f'convert destination {work / "out"} is in use by process '
                    f'{os.getpid()}', 'wait for that conversion to finish, or choose another DST')
  assert_nothing_loads('out')
  assert not list(work.glob('.out.*'))
  assert gqa(*CONVERT).status == 0  # once free, it goes through; the lock file is gone
  assert sorted(p.name for p in work.iterdir() if p.name.startswith('.')) == []


# ------------------------------------------------- interrupted conversions ----

def test_kill_between_the_overwrite_renames_loses_nothing(work, gqa):
  """SIGKILL-like death (os._exit) right after DST was moved aside: the next conversion
  puts the previous DST back, says so, and only then does its own work."""
  assert gqa(*CONVERT).status == 0
  before = checkpoints.open_checkpoint('out').metadata['checksums']
  script = textwrap.dedent('''
      import os, sys
      from gqa_jax import cli
      from pathlib import Path
      rename = os.rename
      def dying_rename(a, b):
        if Path(b).name == 'out':  # DST is already .out.old-*: die before output -> DST
          os._exit(9)
        rename(a, b)
      os.rename = dying_rename
      cli.main(['convert', 'src', 'out', '--num-kv-heads', '1', '--quiet', '--overwrite'])
      ''')
  died = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
  assert died.returncode == 9, died.stderr[-2000:]
  assert not Path('out').exists()
  assert len(list(work.glob('.out.old-*'))) == 1 and len(list(work.glob('.out.partial-*'))) == 1

  result = gqa('inspect', 'out')  # a reader does not repair: DST is absent
  assert_user_error(result, 'does not exist')
  result = gqa(*CONVERT)  # no --overwrite: restores DST, then finds it exists
  assert_user_error(result, 'already exists')
  assert 'restored' in result.err and 'removed 1 leftover of interrupted conversions' in result.err
  assert checkpoints.open_checkpoint('out').metadata['checksums'] == before
  assert not list(work.glob('.out.*'))


def test_leftovers_of_killed_conversions_are_removed_and_reported(work, gqa):
  assert gqa(*CONVERT).status == 0
  # What killed runs leave: a half-written output and a half-deleted previous DST.
  shutil.copytree('conv', '.out.partial-0badf00d')
  shutil.copytree('conv', '.out.old-00000000000000000001')
  (work / '.outer.partial-1').mkdir()  # another DST's: not ours to touch
  result = gqa(*CONVERT, '--overwrite', '--num-kv-heads', '1')
  assert result.status == 0, result.err
  assert 'gqa-jax: note: removed 2 leftovers of interrupted conversions' in result.err
  assert re.search(r' \(\d+\.\d\d [KM]iB\)', result.err), result.err
  assert sorted(p.name for p in work.glob('.*')) == ['.outer.partial-1']
  assert checkpoints.open_checkpoint('out').config.kv_heads('decoder_self') == 1


def test_failed_swap_puts_the_old_dst_back(work, gqa, monkeypatch):
  """An error (not a kill) between the two renames is undone on the spot."""
  assert gqa(*CONVERT).status == 0
  rename, calls = os.rename, []
  def failing_rename(a, b):
    if '.partial-' in Path(a).name and not calls:  # DST is already .out.old-*
      calls.append(b)
      raise OSError(28, 'No space left on device')
    rename(a, b)
  monkeypatch.setattr(os, 'rename', failing_rename)
  result = gqa(*CONVERT, '--overwrite', '--num-kv-heads', '1')
  monkeypatch.setattr(os, 'rename', rename)
  assert_user_error(result, 'No space left on device', 'nothing was written to DST')
  assert checkpoints.open_checkpoint('out').config.kv_heads('decoder_self') == 2
  assert not list(work.glob('.out.*'))


def test_conversion_metadata_is_inside_the_renamed_folder(work, gqa, monkeypatch):
  """gqa_jax.json is written before the output is renamed to DST: a kill at any point
  leaves either no DST or one with its metadata."""
  seen = []
  rename = os.rename
  def spy(a, b):
    seen.append((Path(a).name, (Path(a) / f'checkpoint_{STEP}' / 'gqa_jax.json').is_file()))
    rename(a, b)
  monkeypatch.setattr(os, 'rename', spy)
  assert gqa(*CONVERT).status == 0
  assert [ok for name, ok in seen if '.partial-' in name] == [True], seen


# -------------------------------------------------------- training saves ----

def tiny_run(model_dir):
  cfg = network.get_preset('tiny', vocab_size=64, dtype='float32')
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  training.TrainCheckpointer(model_dir, config=cfg).save(5, params, {}, {'batches': 5})
  return cfg


def test_training_metadata_commits_with_the_checkpoint(work, gqa):
  cfg = tiny_run('run')
  step_dir = work / 'run' / 'checkpoint_5'
  stored = json.loads((step_dir / orbax.STEP_METADATA).read_text())['custom_metadata']
  assert stored[orbax.CUSTOM_KEY]['config'] == cfg.to_dict()
  assert not (step_dir / orbax.METADATA_FILE).exists()  # nothing written after the commit
  source = checkpoints.open_checkpoint('run')
  assert (source.format, source.config, source.step) == ('gqa-jax', cfg, 5)

  # Written by an older gqa_jax: gqa_jax.json beside state/, still read.
  info = json.loads((step_dir / orbax.STEP_METADATA).read_text())
  legacy_record = info.pop('custom_metadata')[orbax.CUSTOM_KEY]
  (step_dir / orbax.STEP_METADATA).write_text(json.dumps(info))
  (step_dir / orbax.METADATA_FILE).write_text(json.dumps(legacy_record))
  assert checkpoints.open_checkpoint('run').config == cfg

  # ... and killed between Orbax's commit and that file: not passed off as T5X bfloat16.
  (step_dir / orbax.METADATA_FILE).unlink()
  assert_user_error(gqa('inspect', 'run'), 'gqa_jax training checkpoint without its model '
                    'config', 'use an earlier checkpoint_<step>')


# ------------------------------------------------------------------ verify ----

def chunk(folder, tensor):
  return next(ckpt_file(folder, tensor).glob('0.*'))


def truncate_chunk():
  file = chunk('src', 'target.decoder.layers_1.mlp.wo.kernel')
  file.write_bytes(file.read_bytes()[:40])


def flip_bits_in_chunk():
  file = chunk('src', 'target.encoder.layers_0.mlp.wi_0.kernel')
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x24
  file.write_bytes(bytes(data))


def flip_bits_in_orbax_data():
  files = [p for p in ckpt_file('conv', 'state').rglob('*') if p.is_file() and
           p.parent.name == 'd']
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  for offset in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
    data[offset] ^= 0x10
  biggest.write_bytes(bytes(data))


def write_nan(built):
  params = dict(built['params'])
  params['decoder/decoder_norm/scale'] = params['decoder/decoder_norm/scale'].copy()
  params['decoder/decoder_norm/scale'][3] = np.nan
  shutil.rmtree('src')
  t5x.write_all(Path('src') / f'checkpoint_{STEP}',
                [(f'target/{k}', v) for k, v in params.items()])


VERIFY_CASES = {
    'truncated-zarr-chunk': (lambda b: truncate_chunk(), 'src',
                             ['decoder/layers_1/mlp/wo/kernel'], 'unreadable'),
    'bit-flipped-gzip-chunk': (lambda b: flip_bits_in_chunk(), 'src',
                               ['encoder/layers_0/mlp/wi_0/kernel'], 'unreadable'),
    # Where in Orbax's data files the flips land can vary with the write's order: inside
    # a tensor's bytes (its CRC-32 differs) or in what decodes them (unreadable).
    'bit-flipped-orbax-data-of-a-conversion': (lambda b: flip_bits_in_orbax_data(), 'conv',
                                               [], ('differs from the recorded',
                                                    'unreadable')),
    'nan-in-a-tensor': (write_nan, 'src', ['decoder/decoder_norm/scale'],
                        '1 of 32 values are NaN or infinite'),
}


def test_verify_names_changed_bytes_as_the_cause_of_a_nan(work):
  # Flipped bits in a recorded tensor can also make a NaN (CI saw it once): the CRC
  # mismatch is the cause and is named first, the NaN beside it.
  source = checkpoints.open_checkpoint('conv')
  name = 'encoder/layers_1/mlp/wi_0/kernel'
  intact = source.params[name]
  def damaged():
    value = np.array(intact.read())
    value.reshape(-1)[7] = np.nan
    return value
  source.params[name] = dataclasses.replace(intact, reader=damaged)
  bad, compared = checkpoints.verify(source, progress=False)
  assert list(bad) == [name] and compared == len(source.params)
  assert bad[name].startswith('crc32 ') and 'differs from the recorded' in bad[name]
  assert bad[name].endswith(f'; 1 of {intact.read().size} values are NaN or infinite')


@pytest.mark.parametrize('case', list(VERIFY_CASES))
def test_verify_names_damaged_tensors(work, gqa, built, case):
  damage, ckpt, names, problem = VERIFY_CASES[case]
  damage(built)
  plain = gqa('inspect', ckpt)  # plain inspect reads no tensor data: fast, and passes
  assert plain.status == 0, plain.err
  result = gqa('inspect', ckpt, '--verify')
  assert_user_error(result, 'tensors are damaged', 'copy the checkpoint again', *names)
  bad = [l for l in result.out.splitlines() if l.startswith('BAD ')]
  problems = (problem,) if isinstance(problem, str) else problem
  assert bad and all(any(p in l for p in problems) for l in bad), result.out
  for name in names:
    assert any(l.startswith(f'BAD {name}: ') for l in bad), bad
  report = json.loads(gqa('inspect', ckpt, '--verify', '--json').out)
  assert set(report['verify']['bad']) == {l[4:].split(':')[0] for l in bad}


def test_verify_passes_intact_checkpoints_and_compares_recorded_checksums(work, gqa):
  result = gqa('inspect', 'conv', '--verify')
  assert result.status == 0, result.err
  n = int(result.out.split('verified: ')[1].split(' of ')[0])
  assert f'{n} of {n} tensors intact ({n} against recorded CRC-32s)' in result.out
  result = gqa('inspect', 'src', '--verify')
  assert result.status == 0 and 'intact (0 against recorded CRC-32s)' in result.out


def test_hugging_face_hub_cache_snapshot_needs_no_flag(work, gqa):
  """The hub cache's snapshot folders are links into the model's own blobs/: allowed;
  the same links leaving that model's cache folder are not."""
  from test_hf import hf_config, hf_state  # pylint: disable=import-outside-toplevel
  repo = work / 'hub' / 'models--org--t5'
  (repo / 'blobs').mkdir(parents=True)
  save_file(hf_state(), str(repo / 'blobs' / 'aaa'))
  (repo / 'blobs' / 'bbb').write_text(json.dumps(hf_config()))
  snapshot = repo / 'snapshots' / 'rev1'
  snapshot.mkdir(parents=True)
  (snapshot / 'model.safetensors').symlink_to('../../blobs/aaa')
  (snapshot / 'config.json').symlink_to('../../blobs/bbb')
  assert gqa('inspect', snapshot, '--verify').status == 0
  shutil.move(repo / 'blobs' / 'aaa', work / 'aaa')
  (snapshot / 'model.safetensors').unlink()
  (snapshot / 'model.safetensors').symlink_to(work / 'aaa')
  assert_user_error(gqa('inspect', snapshot), 'weights file', 'is a link to',
                    '--allow-external-links')
