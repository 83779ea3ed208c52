"""Tests for training/tokenizers.py: round trips, save/load, workdir reuse."""

import inspect
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import tokenizers as hf_tokenizers

from training import tokenizers

TEXTS = {
    'ascii': 'Hello, world! 123 ~`@#$%^&*()',
    'utf8': 'héllo — 世界 🚀',
    'python': inspect.getsource(tokenizers._lines),
    'whitespace': '  a\t\tb  \n\n  c  ',
    'empty': '',
}
# Training text for the small SentencePiece and BPE models: code and prose.
CORPUS = [inspect.getsource(tokenizers), tokenizers.__doc__ * 3]


def _sentencepiece_config(vocab_size=512):
  config = tokenizers.default_tokenizer_config()
  config.kind = 'sentencepiece'
  config.vocab_size = vocab_size
  return config


def _write_hf_tokenizer(directory):
  """Trains a tiny byte-level BPE and writes directory/tokenizer.json."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<pad>', '<s>', '</s>'],
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  path = os.path.join(directory, 'tokenizer.json')
  tok.save(path)
  return path


class TokenizersTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    config = tokenizers.default_tokenizer_config()
    config.kind = 'huggingface'
    config.path = _write_hf_tokenizer(cls.tmp)
    cls.tokenizers = {
        'byte': tokenizers.make_tokenizer(
            tokenizers.default_tokenizer_config()),
        'sentencepiece': tokenizers.make_tokenizer(
            _sentencepiece_config(), texts=CORPUS),
        'huggingface': tokenizers.make_tokenizer(config),
    }

  @parameterized.product(kind=['byte', 'sentencepiece', 'huggingface'],
                         text=sorted(TEXTS))
  def test_round_trip(self, kind, text):
    tok = self.tokenizers[kind]
    ids = tok.encode(TEXTS[text])
    self.assertTrue(all(0 <= i < tok.vocab_size for i in ids))
    self.assertNotIn(tok.bos_id, ids)
    self.assertEqual(tok.decode(ids), TEXTS[text])
    # Special ids decode to nothing.
    self.assertEqual(tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]),
                     TEXTS[text])

  @parameterized.parameters('byte', 'sentencepiece', 'huggingface')
  def test_save_load_gives_same_ids(self, kind):
    tok = self.tokenizers[kind]
    directory = self.enter_context(tempfile.TemporaryDirectory())
    tok.save(directory)
    loaded = tokenizers.load_tokenizer(directory)
    self.assertIsInstance(loaded, type(tok))
    for text in TEXTS.values():
      self.assertEqual(loaded.encode(text), tok.encode(text))
    self.assertEqual(
        (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id),
        (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id))

  def test_byte_layout(self):
    tok = self.tokenizers['byte']
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size),
                     (0, 1, 2, 259))
    self.assertEqual(tok.encode('A'), [ord('A') + 3])
    self.assertEqual(tok.decode([0xff + 3, ord('a') + 3]), '\ufffda')

  def test_sentencepiece_reserved_ids_and_compression(self):
    tok = self.tokenizers['sentencepiece']
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size),
                     (0, 1, 2, 512))
    text = TEXTS['python']
    self.assertLess(len(tok.encode(text)), 0.7 * len(text.encode('utf-8')))

  def test_sentencepiece_whole_words_are_one_piece(self):
    config = _sentencepiece_config()
    config.whole_words = ('kavoli', 'zupeta')
    tok = tokenizers.make_tokenizer(config, texts=CORPUS)
    for word in config.whole_words:
      piece, ids = tok.encode(word), tok.encode(f'ask {word} now')
      self.assertLen(piece, 1)
      self.assertIn(piece[0], ids)
      self.assertEqual(tok.decode(ids), f'ask {word} now')
    self.assertGreater(len(self.tokenizers['sentencepiece'].encode('kavoli')), 1)

  def test_huggingface_special_ids_from_names(self):
    tok = self.tokenizers['huggingface']
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))

  def test_huggingface_special_ids_from_config(self):
    config = tokenizers.default_tokenizer_config()
    config.kind = 'huggingface'
    config.path = os.path.join(self.tmp, 'tokenizer.json')
    config.bos_id = 2
    tok = tokenizers.make_tokenizer(config)
    self.assertEqual((tok.bos_id, tok.eos_id), (2, 2))

  def test_workdir_saves_then_reuses(self):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    first = tokenizers.make_tokenizer(_sentencepiece_config(), workdir,
                                      texts=CORPUS)
    model = os.path.join(workdir, 'tokenizer', 'spm.model')
    mtime = os.path.getmtime(model)
    # Resuming needs no texts: the saved model is reloaded, not retrained.
    second = tokenizers.make_tokenizer(_sentencepiece_config(), workdir)
    self.assertEqual(second.encode(TEXTS['python']),
                     first.encode(TEXTS['python']))
    self.assertEqual(os.path.getmtime(model), mtime)

  def test_workdir_mismatch_raises_without_overwriting(self):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    tokenizers.make_tokenizer(_sentencepiece_config(), workdir, texts=CORPUS)
    marker = os.path.join(workdir, 'tokenizer', tokenizers.MARKER_FILE)
    with open(marker) as f:
      before = json.load(f)
    with self.assertRaisesRegex(ValueError, r'vocab_size=600.*vocab_size=512'):
      tokenizers.make_tokenizer(_sentencepiece_config(600), workdir,
                                texts=CORPUS)
    with self.assertRaisesRegex(ValueError, r"kind='byte'.*'sentencepiece'"):
      tokenizers.make_tokenizer(tokenizers.default_tokenizer_config(), workdir)
    with open(marker) as f:
      self.assertEqual(json.load(f), before)

  def test_missing_files_name_the_path(self):
    config = tokenizers.default_tokenizer_config()
    config.kind = 'huggingface'
    config.path = os.path.join(self.tmp, 'nope', 'tokenizer.json')
    with self.assertRaisesRegex(FileNotFoundError, 'nope/tokenizer.json'):
      tokenizers.make_tokenizer(config)
    empty = self.enter_context(tempfile.TemporaryDirectory())
    with self.assertRaisesRegex(FileNotFoundError, empty):
      tokenizers.load_tokenizer(empty)

  def test_bad_kind_and_missing_texts(self):
    config = tokenizers.default_tokenizer_config()
    config.kind = 'wordpiece'
    with self.assertRaisesRegex(ValueError, 'tokenizer.kind'):
      tokenizers.make_tokenizer(config)
    with self.assertRaisesRegex(ValueError, 'texts='):
      tokenizers.make_tokenizer(_sentencepiece_config())


if __name__ == '__main__':
  absltest.main()
