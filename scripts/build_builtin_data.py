#!/usr/bin/env python
"""Builds the built-in offline data shipped in gqa_jax/data/builtin/ (run once).

Source: the CPython standard library's own source files on this machine (PSF
licence), read with `ast`, in sorted path order:

  docstring_{train,validation}.jsonl.gz  one function per line:
      {"id": "module:Qual.name", "inputs": function source without its docstring,
       "targets": first sentence of its docstring}
  pretrain_{train,validation}.jsonl.gz   {"id", "text"}: every module/class/function
      docstring, plus the language-reference topics of pydoc_data/topics.py
  sentencepiece.model                    unigram SentencePiece vocabulary trained on
      the train splits, T5 conventions (pad=0, eos=1, unk=2, no bos)
  manifest.json                          counts, bytes, sha256 and the source Python

The split is a fixed function of the id: a definition is in validation when
sha256 of its *top-level* qualified name ("module:Class", "module:func", so a class's
methods and a function's nested functions share a split) is below 10% of the hash range.
Documents and functions are deduplicated by text before splitting, so no text is
in both splits. Output is byte-for-byte reproducible for a given stdlib (gzip mtime 0,
single-threaded, seeded SentencePiece training).

Usage: python scripts/build_builtin_data.py [--stdlib DIR] [--out DIR] [--vocab-size N]
"""

import argparse
import ast
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import textwrap

VALIDATION_PERCENT = 10
MAX_INPUT_CHARS = 4000     # longer functions are dropped (keeps the shipped files small)
MAX_TARGET_CHARS = 300
SKIP_DIRS = {'site-packages', '__pycache__', 'lib-dynload'}
_SENTENCE_END = re.compile(r'(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<=[.!?])\s+')


def is_validation(key: str) -> bool:
  h = int(hashlib.sha256(key.encode('utf-8')).hexdigest()[:8], 16)
  return h % 100 < VALIDATION_PERCENT


def stdlib_files(root):
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in SKIP_DIRS and not d.startswith('config-'))
    for name in sorted(filenames):
      if name.endswith('.py'):
        yield os.path.join(dirpath, name)


def module_name(root, path):
  rel = os.path.relpath(path, root)[:-len('.py')]
  parts = rel.split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def summary_line(doc: str):
  """First sentence of the first paragraph, or None if it is not a usable summary."""
  para = ' '.join(doc.strip().split('\n\n')[0].split())
  first = _SENTENCE_END.split(para, maxsplit=1)[0].strip()
  words = first.split()
  if len(words) < 3 or len(first) > MAX_TARGET_CHARS or not first[0].isalpha():
    return None
  if '->' in first or '>>>' in first or first.split('(')[0].isidentifier() and '(' in words[0]:
    return None  # a signature line ("f(x) -> y"), not a summary
  return first


def function_input(lines, node):
  """The function's source (decorators included, dedented) without its own docstring."""
  doc = node.body[0]
  start = min([node.lineno] + [d.lineno for d in node.decorator_list])
  doc_first, doc_last = lines[doc.lineno - 1], lines[doc.end_lineno - 1]
  if doc_first[:doc.col_offset].strip() or doc_last[doc.end_col_offset:].strip(' \t\r\n;'):
    return None  # docstring shares a line with code
  after = lines[doc.end_lineno:node.end_lineno]
  while after and not after[0].strip():
    after = after[1:]  # the blank line that separated the docstring from the body
  kept = lines[start - 1:doc.lineno - 1] + after
  text = textwrap.dedent(''.join(kept)).strip('\n')
  return text if len(text) <= MAX_INPUT_CHARS else None


def walk_definitions(tree, prefix=()):
  """Yields (qualified-name tuple, node) for every class and function, nested too."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      name = prefix + (node.name,)
      yield name, node
      yield from walk_definitions(node, name)
    elif not isinstance(node, ast.Lambda):
      yield from walk_definitions(node, prefix)


def extract(root):
  functions, documents = [], []
  for path in stdlib_files(root):
    try:
      with open(path, encoding='utf-8') as f:
        source = f.read()
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # deliberately broken test inputs
    mod = module_name(root, path)
    lines = source.splitlines(keepends=True)
    doc = ast.get_docstring(tree)
    if doc:
      documents.append({'id': mod, 'key': mod, 'text': doc})
    if mod == 'pydoc_data.topics':
      topics = ast.literal_eval(tree.body[-1].value)
      documents += [{'id': f'{mod}:{k}', 'key': f'{mod}:{k}', 'text': inspect.cleandoc(v)}
                    for k, v in sorted(topics.items())]
    for qual, node in walk_definitions(tree):
      key = f'{mod}:{qual[0]}'
      ident = f'{mod}:{".".join(qual)}'
      doc = ast.get_docstring(node)
      if not doc:
        continue
      documents.append({'id': ident, 'key': key, 'text': doc})
      if isinstance(node, ast.ClassDef) or len(node.body) < 2:
        continue
      target = summary_line(doc)
      inputs = target and function_input(lines, node)
      if inputs:
        functions.append({'id': ident, 'key': key, 'inputs': inputs, 'targets': target})
  return functions, documents


def dedup_and_split(records, text_fields):
  seen, splits = set(), {'train': [], 'validation': []}
  for r in records:
    text = '\x00'.join(r[f] for f in text_fields)
    if text in seen:
      continue
    seen.add(text)
    split = 'validation' if is_validation(r.pop('key')) else 'train'
    splits[split].append(r)
  return splits


def write_jsonl_gz(path, records):
  buf = io.BytesIO()
  with gzip.GzipFile(filename='', mode='wb', fileobj=buf, mtime=0, compresslevel=9) as f:
    for r in records:
      f.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + '\n').encode('utf-8'))
  with open(path, 'wb') as f:
    f.write(buf.getvalue())


def train_vocab(out_dir, sentences, vocab_size):
  import sentencepiece as spm
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, model_type='unigram',
      vocab_size=vocab_size, character_coverage=0.9995, num_threads=1,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>',
      input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=4192,
      minloglevel=2)
  with open(os.path.join(out_dir, 'sentencepiece.model'), 'wb') as f:
    f.write(model.getvalue())


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--stdlib', default=sysconfig.get_paths()['stdlib'])
  p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'gqa_jax',
                                               'data', 'builtin'))
  p.add_argument('--vocab-size', type=int, default=4000)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)

  functions, documents = extract(args.stdlib)
  data = {'docstring': dedup_and_split(functions, ('inputs',)),
          'pretrain': dedup_and_split(documents, ('text',))}
  manifest = {'source': f'CPython {sys.version.split()[0]} standard library',
              'stdlib': args.stdlib, 'validation_percent': VALIDATION_PERCENT,
              'vocab_size': args.vocab_size, 'files': {}}
  for name, splits in data.items():
    for split, records in splits.items():
      write_jsonl_gz(os.path.join(args.out, f'{name}_{split}.jsonl.gz'), records)
      manifest[f'{name}_{split}_examples'] = len(records)

  # The vocabulary sees the train splits only, line by line (SentencePiece's unit).
  sentences = [line for r in data['pretrain']['train'] for line in r['text'].splitlines()]
  for r in data['docstring']['train']:
    sentences += r['inputs'].splitlines() + [r['targets']]
  train_vocab(args.out, [s for s in sentences if s.strip()], args.vocab_size)

  for name in sorted(os.listdir(args.out)):
    if name.endswith(('.gz', '.model')):
      with open(os.path.join(args.out, name), 'rb') as f:
        blob = f.read()
      manifest['files'][name] = {'bytes': len(blob),
                                 'sha256': hashlib.sha256(blob).hexdigest()}
  with open(os.path.join(args.out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write('\n')
  print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == '__main__':
  main()
