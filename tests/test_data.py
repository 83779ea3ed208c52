"""Tests for training/data.py: layout, packing, determinism, resume, sources."""

import itertools
import json
import math
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from array_record.python import array_record_module
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training import data
from training import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()
# Short documents of varied lengths, some multi-byte, one longer than a row.
DOCS = [f'doc {i}: ' + 'héllo 世界 ' * (i % 5) + 'x' * (3 * i) for i in range(24)]
DOCS.append('long ' + 'abcdefghij' * 20)
SEQ_LEN = 32


def _config(directory, source='text', **overrides):
  config = data.default_data_config()
  config.source = source
  config.paths = os.path.join(directory, {
      'text': '*.txt', 'jsonl': '*.jsonl', 'arrayrecord': '*.arrayrecord',
      'parquet': '*.parquet',
  }[source])
  config.seq_len = SEQ_LEN
  config.batch_size = 4
  config.shuffle_buffer = 16
  config.validation_fraction = 0.25
  config.update(overrides)
  return config


def _write_corpus(directory, docs=DOCS):
  """Writes `docs` as text files, two JSONL files, an ArrayRecord file and two Parquet
  files (row groups of 5 rows)."""
  for i, doc in enumerate(docs):
    with open(os.path.join(directory, f'doc{i:03d}.txt'), 'w') as f:
      f.write(doc)
  half = len(docs) // 2
  for name, part in (('a', docs[:half]), ('b', docs[half:])):
    with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
      for doc in part:
        f.write(json.dumps({'text': doc, 'id': 0}) + '\n\n')
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(directory, 'docs.arrayrecord'), 'group_size:1')
  for doc in docs:
    writer.write(doc.encode('utf-8'))
  writer.close()
  for name, part in (('a', docs[:half]), ('b', docs[half:])):
    table = pa.table({'id': list(range(len(part))), 'text': part})
    pq.write_table(table, os.path.join(directory, f'{name}.parquet'), row_group_size=5)


def _take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return list(itertools.islice(it, n))


def _rows(batches):
  """Flattens batches into a list of row dicts."""
  return [{k: v[i] for k, v in b.items()}
          for b in batches for i in range(len(b['tokens']))]


def _segments(row):
  """Token ids of each segment, with the target past its last input."""
  out = []
  for s in np.unique(row['segment_ids'][row['segment_ids'] > 0]):
    (idx,) = np.nonzero(row['segment_ids'] == s)
    out.append(list(row['tokens'][idx]) + list(row['targets'][idx[-1:]]
                                                [row['loss_mask'][idx[-1:]] > 0]))
  return out


class DataTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    _write_corpus(cls.dir)

  def assertBatchesEqual(self, a, b):
    self.assertEqual(len(a), len(b))
    for x, y in zip(a, b):
      self.assertEqual(sorted(x), sorted(y))
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)

  def test_layout(self):
    (batch,) = _take(data.make_dataset(_config(self.dir), TOKENIZER, 'train'),
                     1)
    self.assertEqual(
        sorted(batch),
        ['loss_mask', 'positions', 'segment_ids', 'targets', 'tokens'])
    for value in batch.values():
      self.assertEqual((value.dtype, value.shape), (np.int32, (4, SEQ_LEN)))

  @parameterized.parameters('train', 'validation')
  def test_packing_invariants(self, split):
    config = _config(self.dir, num_epochs=1)
    for row in _rows(_take(data.make_dataset(config, TOKENIZER, split), 20)):
      seg, pos = row['segment_ids'], row['positions']
      tokens, targets, mask = row['tokens'], row['targets'], row['loss_mask']
      starts = np.concatenate([[True], seg[1:] != seg[:-1]])
      real = seg > 0
      # Segments are numbered 1, 2, ... left to right; padding only at the end.
      self.assertEqual(seg[0], 1)
      np.testing.assert_array_equal(np.diff(seg[real]) >= 0, True)
      self.assertTrue(set(np.diff(np.unique(seg[real]))) <= {1})
      np.testing.assert_array_equal(real, np.arange(SEQ_LEN) < real.sum())
      # Positions restart at 0 at each segment start and count up by one.
      np.testing.assert_array_equal(pos[starts & real], 0)
      np.testing.assert_array_equal(pos[1:][~starts[1:] & real[1:]],
                                    pos[:-1][~starts[1:] & real[1:]] + 1)
      # targets[t] = tokens[t+1] where the next token is in the same segment.
      same = (seg[:-1] == seg[1:]) & real[:-1]
      np.testing.assert_array_equal(mask[:-1], same)
      np.testing.assert_array_equal(targets[:-1][same], tokens[1:][same])
      self.assertTrue(np.all(targets[mask == 0] == TOKENIZER.pad_id))
      self.assertTrue(np.all(tokens[~real] == TOKENIZER.pad_id))
      self.assertTrue(np.all(mask[~real] == 0))

  @parameterized.parameters('train', 'validation')
  def test_block_aligned_packing(self, split):
    """Every document starts at a multiple of block_len in a row's inputs; the pads between
    documents are out of the loss; all of a document's tokens are read, in order."""
    block = 4
    config = _config(self.dir, num_epochs=1, shuffle_buffer=0, block_len=block)
    data.make_dataset(config, TOKENIZER, split)  # validates the config
    rows = list(data._rows(config, TOKENIZER, split, 0, 1, 0))  # unbatched: none dropped  # pylint: disable=protected-access
    read = []
    for row in rows:
      seg, pos, mask = row['segment_ids'], row['positions'], row['loss_mask']
      starts = np.flatnonzero((seg > 0) & np.concatenate([[True], seg[1:] != seg[:-1]]))
      np.testing.assert_array_equal(starts % block, 0)
      np.testing.assert_array_equal(pos[starts], 0)
      self.assertTrue(np.all(mask[seg == 0] == 0))
      self.assertTrue(np.all(row['tokens'][seg == 0] == TOKENIZER.pad_id))
      for s in np.unique(seg[seg > 0]):
        read.append(list(row['tokens'][seg == s]))
    # Rows overlap by one token, so each document is its segments' inputs, joined; with
    # block alignment a segment never ends in the middle of another document.
    joined = [t for part in read for t in part]
    corpus, indices = data._split(config, split)  # pylint: disable=protected-access
    expected = [t for i in indices for t in
                [TOKENIZER.bos_id, *TOKENIZER.encode(corpus.read(int(i))), TOKENIZER.eos_id]]
    self.assertEqual(sorted(joined), sorted(expected))
    with self.assertRaisesRegex(ValueError, 'seq_len=32 must be a multiple of data.block_len=5'):
      data.make_dataset(_config(self.dir, block_len=5), TOKENIZER, split)

  def test_short_documents_decode_to_their_text(self):
    config = _config(self.dir, validation_fraction=1.0, seq_len=128)
    complete = [
        segment
        for row in _rows(_take(data.make_dataset(config, TOKENIZER,
                                                 'validation'), 100))
        for segment in _segments(row)
        if segment[0] == TOKENIZER.bos_id and segment[-1] == TOKENIZER.eos_id]
    self.assertGreater(len(complete), 5)
    for segment in complete:
      self.assertIn(TOKENIZER.decode(segment), DOCS)

  def test_long_document_is_split_not_dropped(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    doc = 'Python — ' + 'abcdefghij' * 30
    _write_corpus(directory, [doc])
    config = _config(directory, validation_fraction=1.0, batch_size=1)
    rows = _rows(_take(data.make_dataset(config, TOKENIZER, 'validation'),
                       100))
    self.assertLen(rows, math.ceil((len(doc.encode()) + 2) / (SEQ_LEN + 1)))
    for row in rows:
      self.assertEqual(row['positions'][0], 0)
    ids = [i for row in rows for segment in _segments(row) for i in segment]
    self.assertEqual(ids, [1] + TOKENIZER.encode(doc) + [2])

  def test_same_seed_same_batches_different_seed_differs(self):
    config = _config(self.dir)
    make = lambda seed: _take(
        data.make_dataset(config, TOKENIZER, 'train', seed=seed), 6)
    self.assertBatchesEqual(make(0), make(0))
    self.assertFalse(np.array_equal(make(0)[0]['tokens'], make(1)[0]['tokens']))

  @parameterized.parameters(True, False)
  def test_resume_is_exact(self, pack):
    # A few epochs of a small corpus: resumes across epoch boundaries.
    config = _config(self.dir, pack=pack)
    ds = data.make_dataset(config, TOKENIZER, 'train')
    it = iter(ds)
    _ = [next(it) for _ in range(12)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    self.assertBatchesEqual(_take(ds, 3, state), expected)
    fresh = data.make_dataset(config, TOKENIZER, 'train')
    self.assertBatchesEqual(_take(fresh, 3, state), expected)

  def test_processes_read_disjoint_documents(self):
    # pack=False: one document per row, so rows name their documents.
    config = _config(self.dir, pack=False, validation_fraction=1.0,
                     batch_size=2, seq_len=512)
    seen = []
    for index in range(2):
      ds = data.make_dataset(config, TOKENIZER, 'validation',
                             process_index=index, process_count=2)
      rows = _rows(_take(ds, 100))
      self.assertEqual(rows[0]['tokens'].shape, (512,))
      seen.append({TOKENIZER.decode(r['tokens']) for r in rows})
    self.assertEmpty(seen[0] & seen[1])
    self.assertLessEqual(seen[0] | seen[1], set(DOCS))
    self.assertGreaterEqual(len(seen[0] | seen[1]), len(DOCS) - 2)

  @parameterized.parameters('text', 'jsonl', 'arrayrecord', 'parquet')
  def test_sources_read_every_document(self, source):
    config = _config(self.dir, source, pack=False, validation_fraction=1.0,
                     batch_size=1, seq_len=512)
    rows = _rows(_take(data.make_dataset(config, TOKENIZER, 'validation'),
                       100))
    self.assertCountEqual([TOKENIZER.decode(r['tokens']) for r in rows], DOCS)

  def test_parquet_missing_column_is_an_error(self):
    config = _config(self.dir, 'parquet', text_field='body')
    with self.assertRaisesRegex(KeyError, "text_field='body'"):
      data.make_dataset(config, TOKENIZER, 'train')

  def test_splits_are_disjoint_and_stable(self):
    config = _config(self.dir, pack=False, batch_size=1, seq_len=512,
                     shuffle_buffer=1)
    texts = {split: set(data.document_texts(config, split))
             for split in data.SPLITS}
    self.assertEmpty(texts['train'] & texts['validation'])
    self.assertEqual(texts['train'] | texts['validation'], set(DOCS))
    self.assertNotEmpty(texts['validation'])
    # The train split is read once per epoch.
    self.assertLen(list(data.document_texts(config, 'train')),
                   len(texts['train']))

  def test_validation_paths(self):
    config = _config(self.dir, validation_paths=os.path.join(
        self.dir, 'doc00[0-4].txt'), paths=[os.path.join(self.dir, '*.txt')])
    self.assertEqual(list(data.document_texts(config, 'validation')), DOCS[:5])
    self.assertCountEqual(data.document_texts(config, 'train'), DOCS)

  def test_validation_is_finite_and_deterministic(self):
    # Explicit validation files: a hashed split of this class's random temp directory can
    # leave too few validation documents for one batch.
    config = _config(self.dir, validation_paths=os.path.join(self.dir, 'doc00[0-9].txt'))
    ds = data.make_dataset(config, TOKENIZER, 'validation')
    first, second = list(ds), list(ds)
    self.assertNotEmpty(first)
    self.assertBatchesEqual(first, second)

  def test_missing_glob_raises_at_construction(self):
    pattern = os.path.join(self.dir, 'nothing', '*.jsonl')
    config = _config(self.dir, 'jsonl')
    config.paths = [config.paths, pattern]
    with self.assertRaisesRegex(FileNotFoundError, 'nothing/\\*.jsonl'):
      data.make_dataset(config, TOKENIZER, 'train')

  def test_bad_config_errors(self):
    for field in ('seq_len', 'batch_size'):
      with self.assertRaisesRegex(ValueError, f'data.{field}=0 must be positive'):
        data.make_dataset(_config(self.dir, **{field: 0}), TOKENIZER, 'train')
    with self.assertRaisesRegex(ValueError, 'batch_size=4.*process_count=3'):
      data.make_dataset(_config(self.dir), TOKENIZER, 'train', 0, 3)
    with self.assertRaisesRegex(ValueError, 'split'):
      data.make_dataset(_config(self.dir), TOKENIZER, 'test')
    with self.assertRaisesRegex(KeyError, 'body'):
      _take(data.make_dataset(_config(self.dir, 'jsonl', text_field='body'),
                              TOKENIZER, 'train'), 1)

  def test_malformed_jsonl_is_an_error_naming_file_and_line(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(directory, 'bad.jsonl')
    for line, error, message in (
        ('{"text": "ok"', ValueError, 'not a JSON object'),
        ('{"text": 7}', TypeError, "field 'text' is int, not a string"),
        ('["text"]', KeyError, 'no field')):
      with open(path, 'w') as f:
        f.write('{"text": "fine"}\n\n' + line + '\n')
      with self.assertRaisesRegex(error, f'bad.jsonl:3: {message}'):
        data.make_dataset(_config(directory, 'jsonl'), TOKENIZER, 'train')

  def test_parquet_non_string_column_is_an_error(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    pq.write_table(pa.table({'text': [1, 2]}), os.path.join(directory, 'n.parquet'))
    with self.assertRaisesRegex(TypeError, "n.parquet: column .*'text'.* not string"):
      data.make_dataset(_config(directory, 'parquet'), TOKENIZER, 'train')

  def test_corpus_without_tokens_is_an_error(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    _write_corpus(directory, [''] * 6)
    config = _config(directory, validation_fraction=0.0, add_bos=False, add_eos=False)
    with self.assertRaisesRegex(ValueError, 'hold no tokens'):
      data.check_has_tokens(config, TOKENIZER, 'train')
    config.add_eos = True  # Every document now has its EOS token.
    data.check_has_tokens(config, TOKENIZER, 'train')

  def test_unigram_entropy(self):
    directory = self.enter_context(tempfile.TemporaryDirectory())
    # 'ab' * 17 fills two rows of 17 tokens; each row has 8 a and 8 b targets.
    _write_corpus(directory, ['ab' * 17])
    config = _config(directory, validation_fraction=1.0, add_bos=False,
                     add_eos=False, seq_len=16)
    self.assertAlmostEqual(data.unigram_entropy(config, TOKENIZER),
                           math.log(2), places=6)

  def test_sentencepiece_trained_on_document_texts(self):
    tok_config = tokenizers.default_tokenizer_config()
    tok_config.update(kind='sentencepiece', vocab_size=300)
    tok = tokenizers.make_tokenizer(tok_config, texts=data.document_texts(
        _config(self.dir)))
    config = _config(self.dir, pack=False, validation_fraction=1.0,
                     batch_size=1, seq_len=512)
    rows = _rows(_take(data.make_dataset(config, tok, 'validation'), 100))
    self.assertCountEqual([tok.decode(r['tokens']) for r in rows], DOCS)
    self.assertLess(sum(r['segment_ids'].sum() for r in rows),
                    sum(len(d.encode()) for d in DOCS))

  def test_pycorpus(self):
    config = data.default_data_config()
    config.update(seq_len=64, batch_size=2, max_docs=4, shuffle_buffer=8)
    corpus, train = data._split(config, 'train')
    _, validation = data._split(config, 'validation')
    self.assertIn('os.py', corpus.keys)
    self.assertTrue(any(k.startswith('topic/') for k in corpus.keys))
    self.assertFalse(any('site-packages' in k for k in corpus.keys))
    self.assertEmpty(set(train) & set(validation))
    (batch,) = _take(data.make_dataset(config, TOKENIZER, 'validation'), 1)
    first = corpus.read(int(validation[0]))
    self.assertEqual(TOKENIZER.decode(batch['tokens'][0]),
                     first[:config.seq_len - 1])
    self.assertBatchesEqual(
        _take(data.make_dataset(config, TOKENIZER, 'train'), 2),
        _take(data.make_dataset(config, TOKENIZER, 'train'), 2))


if __name__ == '__main__':
  absltest.main()
