"""Grain input pipelines: documents -> tokens -> packed, batched LM examples.

`make_dataset` returns a grain `IterDataset`; each element is a dict of int32
numpy arrays of shape [batch_size // process_count, seq_len]:

  tokens       input token ids (pad_id where segment_ids == 0)
  targets      the next token of the same document: targets[t] = tokens[t+1],
               or the token just past the row's end; pad_id where loss_mask == 0
  positions    position within the packed segment, 0 at each segment start
  segment_ids  1, 2, ... for the documents (or document chunks) of a row; 0 pad
  loss_mask    1 where targets[t] is a real next token of the same segment

So the loss is `sum(loss_mask * xent(logits(tokens)[t], targets[t]))`: no
shifting is left to the trainer. Rows are cut from the concatenated token
stream with `seq_len + 1` tokens each (grain's ConcatThenSplitIterDataset), so
the last input of a row still has a target; a document longer than a row is
split into chunks whose positions restart at 0, never dropped.

Pipeline: documents of the split (a hash of each document's key decides its
split) -> this process's shard `[process_index::process_count]` -> (train)
seeded shuffle, reshuffled each epoch, repeated `num_epochs` times (None:
forever) -> tokenize, add BOS/EOS -> pack -> (train) shuffle rows in windows of
`shuffle_buffer` -> batch. Order depends only on the seed and the config; the
iterator's `get_state()`/`set_state()` resume it exactly. The validation split
is neither shuffled nor repeated: finite and the same on every call.

Sources (`source`):
  pycorpus     the running Python's standard library `.py` files (test suites
               included; site-packages, dist-packages and pydoc_data/topics.py
               excluded; read as UTF-8, invalid bytes replaced), one document
               per file, keyed by path relative to the stdlib, plus each `pydoc_data.topics.topics` text (key 'topic/K').
  text         files matching `paths`, one document per file.
  jsonl        files matching `paths`, one document per non-blank line, the
               string in field `text_field`.
  arrayrecord  ArrayRecord files matching `paths`, each record a UTF-8 text.
  parquet      Parquet files matching `paths`, one document per row, the string
               in column `text_field` (read a row group at a time, pyarrow).
For file sources, `validation_paths` (if set) names the validation files and
all of `paths` is training data; otherwise both splits come from `paths`.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import glob
import hashlib
import json
import os
import pydoc_data.topics
import sysconfig

from array_record.python import array_record_module
import grain
import grain.experimental as grain_exp
from ml_collections import config_dict
import numpy as np

from training import tokenizers

SPLITS = ('train', 'validation')
# Tokenization is cheap per document; a few threads keep the packer fed
# without tokenizing far ahead of what a restored iterator needs.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def default_data_config() -> config_dict.ConfigDict:
  """Data config: the embedded pycorpus, byte-sized rows for tiny models."""
  return config_dict.ConfigDict(dict(
      source='pycorpus',  # 'pycorpus' | 'text' | 'jsonl' | 'arrayrecord' | 'parquet'
      paths=config_dict.placeholder(object),  # glob or list of globs
      validation_paths=config_dict.placeholder(object),
      text_field='text',  # jsonl field / parquet column
      seq_len=256,
      batch_size=16,  # global; each process gets batch_size // process_count
      shuffle_buffer=1024,  # rows per shuffle window (train); <= 1: none
      validation_fraction=0.05,
      add_bos=True,
      add_eos=True,
      num_epochs=config_dict.placeholder(int),  # train; None: forever
      max_docs=config_dict.placeholder(int),  # cap per split, before sharding
      pack=True,  # False: one document per row, truncated to seq_len + 1
      # > 0 (packed rows): every document starts at a multiple of block_len (the Block
      # Transformer's blocks never straddle two documents); see _BlockAlignedRows.
      block_len=0,
  ))


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """Random access to documents: `keys[i]` names document i, `read(i)` is it."""
  keys: Sequence[str]
  read: Callable[[int], str]


def _read_file(path: str) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _pycorpus() -> _Corpus:
  """Standard-library sources and pydoc topics (see the module docstring)."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in (
        'site-packages', 'dist-packages', '__pycache__')]
    files.extend(os.path.relpath(os.path.join(dirpath, name), root)
                 for name in filenames if name.endswith('.py'))
  files = sorted(f for f in files
                 if f != os.path.join('pydoc_data', 'topics.py'))
  topics = pydoc_data.topics.topics
  topic_keys = sorted(topics)

  def read(i):
    if i < len(files):
      return _read_file(os.path.join(root, files[i]))
    return topics[topic_keys[i - len(files)]]

  return _Corpus(files + [f'topic/{k}' for k in topic_keys], read)


def _glob(paths) -> list[str]:
  """Sorted files matching a glob or list of globs; each must match."""
  files = []
  for pattern in [paths] if isinstance(paths, str) else list(paths or []):
    matched = sorted(glob.glob(pattern, recursive=True))
    if not matched:
      raise FileNotFoundError(f'data.paths: no files match {pattern!r}')
    files.extend(matched)
  if not files:
    raise ValueError('data.paths is empty; set it to a glob or list of globs')
  return files


def _text_files(paths, config) -> _Corpus:
  del config  # Unused.
  files = _glob(paths)
  return _Corpus(files, lambda i: _read_file(files[i]))


def _jsonl_record(key: str, line: bytes, field: str) -> str:
  """The text of one JSONL line; a clear error naming `file:line` otherwise."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise ValueError(f'{key}: not a JSON object ({e}).') from None
  if not isinstance(record, dict) or field not in record:
    raise KeyError(f'{key}: no field data.text_field={field!r}')
  if not isinstance(record[field], str):
    raise TypeError(f'{key}: field {field!r} is {type(record[field]).__name__}, not a '
                    'string.')
  return record[field]


def _jsonl_files(paths, config) -> _Corpus:
  """One document per non-blank line; lines are located by byte offset. Every line is
  parsed and checked once here, so a malformed line fails before training starts."""
  keys, offsets = [], []
  field = config.text_field
  for path in _glob(paths):
    with open(path, 'rb') as f:
      offset = 0
      for number, line in enumerate(f, start=1):
        if line.strip():
          keys.append(f'{path}:{number}')
          offsets.append((path, offset))
          _jsonl_record(keys[-1], line, field)
        offset += len(line)

  def read(i):
    path, offset = offsets[i]
    with open(path, 'rb') as f:
      f.seek(offset)
      return _jsonl_record(keys[i], f.readline(), field)

  return _Corpus(keys, read)


def _arrayrecord_files(paths, config) -> _Corpus:
  del config  # Unused.
  files = _glob(paths)
  keys = []
  for path in files:
    reader = array_record_module.ArrayRecordReader(path)
    keys.extend(f'{path}:{i}' for i in range(reader.num_records()))
    reader.close()
  source = grain.sources.ArrayRecordDataSource(files)
  return _Corpus(keys, lambda i: source[i].decode('utf-8', errors='replace'))


def _parquet_files(paths, config) -> _Corpus:
  """One document per row of column `text_field`; rows are located by row group, and
  the last row group read is kept (shuffled reads cost a row group each)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  field, keys, rows = config.text_field, [], []
  for path in _glob(paths):
    meta = pq.ParquetFile(path)
    if field not in meta.schema_arrow.names:
      raise KeyError(f'{path}: no column data.text_field={field!r} '
                     f'(columns: {meta.schema_arrow.names})')
    kind = meta.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise TypeError(f'{path}: column data.text_field={field!r} has type {kind}, not string.')
    for group in range(meta.num_row_groups):
      count = meta.metadata.row_group(group).num_rows
      keys.extend(f'{path}:{len(rows) + i}' for i in range(count))
      rows.extend((path, group, i) for i in range(count))

  @functools.lru_cache(maxsize=2)
  def row_group(path, group):
    return pq.ParquetFile(path).read_row_group(group, columns=[field]).column(0).to_pylist()

  def read(i):
    path, group, row = rows[i]
    return row_group(path, group)[row] or ''

  return _Corpus(keys, read)


_FILE_SOURCES = {
    'text': _text_files,
    'jsonl': _jsonl_files,
    'arrayrecord': _arrayrecord_files,
    'parquet': _parquet_files,
}


def _in_validation(key: str, fraction: float) -> bool:
  """A stable pseudo-random split of document keys (not Python's hash())."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < fraction


def _split(config, split: str) -> tuple[_Corpus, np.ndarray]:
  """The corpus and the indices of the documents of `split`, in key order."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}')
  if config.source == 'pycorpus':
    corpus = _pycorpus()
  elif config.source in _FILE_SOURCES:
    open_files = _FILE_SOURCES[config.source]
    if config.validation_paths:
      paths = config.validation_paths if split == 'validation' else config.paths
      corpus = open_files(paths, config)
      return corpus, _cap(np.arange(len(corpus.keys)), config)
    corpus = open_files(config.paths, config)
  else:
    raise ValueError(f'data.source={config.source!r}; expected pycorpus or '
                     f'one of {sorted(_FILE_SOURCES)}')
  wanted = split == 'validation'
  indices = [i for i, key in enumerate(corpus.keys)
             if _in_validation(key, config.validation_fraction) == wanted]
  return corpus, _cap(np.asarray(indices, np.int64), config)


def _cap(indices: np.ndarray, config) -> np.ndarray:
  return indices if config.max_docs is None else indices[:config.max_docs]


def _documents(config, split: str, process_index: int, process_count: int,
               seed: int, num_epochs: int | None
               ) -> tuple[_Corpus, grain.MapDataset]:
  """Document indices of this process, shuffled and repeated for training."""
  corpus, indices = _split(config, split)
  indices = indices[process_index::process_count]
  if not indices.size:
    raise ValueError(
        f'No {split} documents for process {process_index} of {process_count} '
        f'(data.source={config.source!r}, validation_fraction='
        f'{config.validation_fraction}, max_docs={config.max_docs}).')
  ds = grain.MapDataset.source(indices)
  if split == 'train':
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
  return corpus, ds


def document_texts(data_config: config_dict.ConfigDict, split: str = 'train',
                   seed: int = 0) -> Iterator[str]:
  """Texts of one epoch of `split`, in training order (e.g. to fit a tokenizer)."""
  corpus, ds = _documents(data_config, split, 0, 1, seed, num_epochs=1)
  for index in ds:
    yield corpus.read(int(index))


def _tokenize(corpus: _Corpus, tokenizer: tokenizers.Tokenizer, config,
              index) -> np.ndarray:
  ids = tokenizer.encode(corpus.read(int(index)))
  ids = ([tokenizer.bos_id] * config.add_bos + ids
         + [tokenizer.eos_id] * config.add_eos)
  return np.asarray(ids, np.int32)


def _one_document_row(ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """A row holding one document, truncated to `length`, zero-padded."""
  ids = ids[:length]
  pad = length - ids.size
  return dict(tokens=np.pad(ids, (0, pad)),
              tokens_segment_ids=np.pad(np.ones_like(ids), (0, pad)),
              tokens_positions=np.pad(np.arange(ids.size, dtype=np.int32),
                                      (0, pad)))


class _BlockAlignedIterator(grain.DatasetIterator):
  """Yields rows of ``seq_len + 1`` tokens cut from a stream of documents, each padded to a
  multiple of ``block_len`` (pad entries have segment id 0). Consecutive rows overlap by one
  token and start every ``seq_len`` stream tokens, so with ``seq_len % block_len == 0`` every
  document starts at a block boundary of every row's inputs; each stream token is an input
  once and a target once. As in the other packing, positions restart at 0 where a document
  (or its continuation) starts in a row and segment ids number a row's documents from 1. The state is the parent's plus the stream tokens not yet cut."""

  def __init__(self, parent, seq_len, block_len, pad_id):
    super().__init__(parent)
    self._seq_len, self._block_len, self._pad_id = seq_len, block_len, pad_id
    self._buffer = []  # [token, document number (-1: pad), position]
    self._documents = 0

  def _pull(self):
    ids = next(self._parent)
    padded = -(-ids.size // self._block_len) * self._block_len
    self._buffer += [[int(t), self._documents, i] for i, t in enumerate(ids)]
    self._buffer += [[self._pad_id, -1, 0]] * (padded - ids.size)
    self._documents += 1

  def __next__(self):
    length = self._seq_len + 1
    while len(self._buffer) < length:
      try:
        self._pull()
      except StopIteration:
        if not any(doc >= 0 for _, doc, _ in self._buffer[:self._seq_len]):
          raise
        self._buffer += [[self._pad_id, -1, 0]] * (length - len(self._buffer))
    row, self._buffer = self._buffer[:length], self._buffer[self._seq_len:]
    numbers, first = {}, {}
    for _, doc, position in row:
      if doc >= 0 and doc not in numbers:
        numbers[doc], first[doc] = len(numbers) + 1, position
    return dict(tokens=np.asarray([t for t, _, _ in row], np.int32),
                tokens_segment_ids=np.asarray([numbers.get(d, 0) for _, d, _ in row], np.int32),
                tokens_positions=np.asarray([p - first[d] if d >= 0 else 0 for _, d, p in row],
                                            np.int32))

  def get_state(self):
    return {'parent': self._parent.get_state(), 'buffer': [list(e) for e in self._buffer],
            'documents': self._documents}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._buffer = [list(e) for e in state['buffer']]
    self._documents = state['documents']


class _BlockAlignedRows(grain.IterDataset):
  """Block-aligned packing of token arrays (see ``_BlockAlignedIterator``)."""

  def __init__(self, parent, seq_len, block_len, pad_id):
    super().__init__(parent)
    self._args = (seq_len, block_len, pad_id)

  def __iter__(self):
    return _BlockAlignedIterator(self._parent.__iter__(), *self._args)


def _shift(pad_id: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Turns a packed row of seq_len + 1 tokens into inputs and targets."""
  tokens, segments = row['tokens'], row['tokens_segment_ids']
  inputs = segments[:-1]
  loss_mask = (inputs == segments[1:]) & (inputs != 0)
  return dict(
      tokens=np.where(inputs != 0, tokens[:-1], pad_id).astype(np.int32),
      targets=np.where(loss_mask, tokens[1:], pad_id).astype(np.int32),
      positions=row['tokens_positions'][:-1].astype(np.int32),
      segment_ids=inputs.astype(np.int32),
      loss_mask=loss_mask.astype(np.int32),
  )


def _rows(config, tokenizer: tokenizers.Tokenizer, split: str,
          process_index: int, process_count: int, seed: int
          ) -> grain.IterDataset:
  """Unbatched rows in the layout of the module docstring."""
  num_epochs = config.num_epochs if split == 'train' else 1
  corpus, ds = _documents(config, split, process_index, process_count, seed,
                          num_epochs)
  ds = ds.map(functools.partial(_tokenize, corpus, tokenizer, config))
  ds = ds.filter(lambda ids: ids.size > 0)
  rows = ds.to_iter_dataset(_READ_OPTIONS)
  length = config.seq_len + 1
  if config.pack and config.get('block_len', 0):
    rows = _BlockAlignedRows(rows, config.seq_len, config.block_len, tokenizer.pad_id)
  elif config.pack:
    rows = grain_exp.ConcatThenSplitIterDataset(
        rows.map(lambda ids: dict(tokens=ids)),
        length_struct=dict(tokens=length))
  else:
    rows = rows.map(functools.partial(_one_document_row, length=length))
  rows = rows.map(functools.partial(_shift, tokenizer.pad_id))
  if split == 'train' and config.shuffle_buffer > 1:
    rows = grain_exp.WindowShuffleIterDataset(
        rows, window_size=config.shuffle_buffer, seed=seed)
  return rows


def make_dataset(data_config: config_dict.ConfigDict,
                 tokenizer: tokenizers.Tokenizer, split: str,
                 process_index: int = 0, process_count: int = 1,
                 seed: int = 0) -> grain.IterDataset:
  """This process's batches of `split`; see the module docstring for layout.

  Args:
    data_config: a `default_data_config()`-like ConfigDict.
    tokenizer: a `tokenizers.Tokenizer`.
    split: 'train' (shuffled, repeated `num_epochs` times) or 'validation'
      (in a fixed order, once; finite and deterministic).
    process_index: this process's index; it reads a disjoint shard of documents.
    process_count: number of processes sharing `data_config.batch_size`.
    seed: shuffle seed (train only).

  Returns:
    A grain IterDataset of dicts of int32 arrays [batch_size // process_count,
    seq_len]; `iter(ds)` has `get_state()` / `set_state()` for checkpoints.
  """
  for field in ('seq_len', 'batch_size'):
    if data_config[field] <= 0:
      raise ValueError(f'data.{field}={data_config[field]} must be positive.')
  block_len = data_config.get('block_len', 0)
  if block_len < 0 or block_len and data_config.seq_len % block_len:
    raise ValueError(f'data.seq_len={data_config.seq_len} must be a multiple of '
                     f'data.block_len={block_len} (blocks of block-aligned packing).')
  if data_config.batch_size % process_count:
    raise ValueError(f'data.batch_size={data_config.batch_size} is not '
                     f'divisible by process_count={process_count}')
  rows = _rows(data_config, tokenizer, split, process_index, process_count,
               seed)
  return rows.batch(data_config.batch_size // process_count,
                    drop_remainder=True)


def check_has_tokens(data_config: config_dict.ConfigDict,
                     tokenizer: tokenizers.Tokenizer, split: str,
                     process_index: int = 0, process_count: int = 1) -> None:
  """Raises ValueError if this process's documents of `split` hold no token at all.

  Reads documents in order and stops at the first with a token, so it costs one
  document on a real corpus (and one epoch on an empty one, which would otherwise make
  the repeated training stream spin forever).
  """
  corpus, ds = _documents(data_config, split, process_index, process_count, 0,
                          num_epochs=1)
  for index in ds:
    if _tokenize(corpus, tokenizer, data_config, index).size:
      return
  raise ValueError(
      f'The {split} documents of data.source={data_config.source!r} (process '
      f'{process_index} of {process_count}) hold no tokens: every document is empty '
      f'and data.add_bos/add_eos are off.')


def unigram_entropy(data_config: config_dict.ConfigDict,
                    tokenizer: tokenizers.Tokenizer, split: str = 'validation',
                    max_tokens: int = 1_000_000) -> float:
  """Entropy (nats/token) of the unigram distribution of `split`'s targets.

  Counts the targets the model is scored on (loss_mask == 1) of the first
  `max_tokens` of them: the loss of the best context-free predictor.
  """
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for row in _rows(data_config, tokenizer, split, 0, 1, seed=0):
    counts += np.bincount(row['targets'][row['loss_mask'] == 1],
                          minlength=tokenizer.vocab_size)
    if counts.sum() >= max_tokens:
      break
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
