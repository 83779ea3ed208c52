"""Tokenizers behind one interface: byte-level, SentencePiece, Hugging Face.

`make_tokenizer(config, workdir)` builds the tokenizer named by `config.kind`
and saves it under `workdir/tokenizer/`; a resumed run finds it there and
reloads it, so every run in a workdir uses the same vocabulary. Files go
through `etils.epath`, so a workdir may be a cloud path. `encode` never
adds BOS/EOS: the data pipeline adds them where its config says.

Reserved tokens (`config.reserved_tokens`, e.g. the RL roles' `<|user|>` and the
end-of-turn `<|end|>`) get ids of their own that text never encodes to and that decode
to nothing: the byte tokenizer appends them after the bytes, SentencePiece adds them as
control symbols, and a Hugging Face tokenizer must already have them in its vocabulary.
`reserved_id(token)` returns one's id, or raises naming the missing token.
"""

import abc
from collections.abc import Iterable
import io
import json
import os
from typing import ClassVar

from etils import epath

from ml_collections import config_dict
import sentencepiece as spm
import tokenizers as hf_tokenizers

MARKER_FILE = 'tokenizer_kind.json'
TOKENIZER_SUBDIR = 'tokenizer'


def default_tokenizer_config() -> config_dict.ConfigDict:
  """Tokenizer config; `kind` is 'byte', 'sentencepiece' or 'huggingface'."""
  return config_dict.ConfigDict(dict(
      kind='byte',
      # sentencepiece: trained on the first `max_train_chars` characters of the
      # texts given to `make_tokenizer`, one line per sentence.
      vocab_size=1024,
      model_type='bpe',  # or 'unigram'
      max_train_chars=3_000_000,
      character_coverage=0.9999,
      split_digits=False,  # sentencepiece: every digit its own piece
      # sentencepiece: strings always encoded as one piece each (user-defined symbols), e.g.
      # a synthetic world's entity names; they count in vocab_size
      whole_words=(),
      # huggingface: path of a tokenizer.json; special ids override the ones
      # found by name (tokenizer_config.json beside it, then common names).
      path='',
      bos_id=config_dict.placeholder(int),
      eos_id=config_dict.placeholder(int),
      pad_id=config_dict.placeholder(int),
      reserved_tokens=(),  # e.g. ('<|user|>', '<|assistant|>', '<|end|>')
  ))


class Tokenizer(abc.ABC):
  """The interface the data pipeline, trainer and samplers rely on."""

  kind: ClassVar[str]

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids (pad, bos, eos) decode to nothing."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  reserved_tokens: tuple = ()

  def reserved_id(self, token: str) -> int:
    """The id of a reserved token (see the module docstring)."""
    ids = self._reserved_ids()
    if token not in ids:
      raise ValueError(f'The {self.kind} tokenizer has no reserved token {token!r} (it has '
                       f'{sorted(ids)}); add it to config.tokenizer.reserved_tokens.')
    return ids[token]

  def _reserved_ids(self) -> dict[str, int]:
    return {}

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: config_dict.ConfigDict,
                  texts: Iterable[str] | None) -> 'Tokenizer':
    """Builds (or trains, from `texts`) the tokenizer described by `config`."""

  @classmethod
  @abc.abstractmethod
  def load(cls, directory: str, info: dict) -> 'Tokenizer':
    """Reloads what `save` wrote; `info` is the marker file's content."""

  def _save_files(self, directory: str) -> None:
    """Writes the files `load` needs besides the marker."""

  def save(self, directory: str) -> None:
    """Writes the tokenizer and a marker naming its kind into `directory`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._save_files(directory)
    info = dict(kind=self.kind, vocab_size=self.vocab_size, bos_id=self.bos_id,
                eos_id=self.eos_id, pad_id=self.pad_id,
                reserved_tokens=list(self.reserved_tokens))
    (directory / MARKER_FILE).write_text(json.dumps(info, indent=2))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: pad 0, bos 1, eos 2, byte b -> b + 3, reserved tokens from 259 on."""

  kind = 'byte'
  _OFFSET = 3
  _BYTES_END = 256 + _OFFSET

  def __init__(self, reserved_tokens=()):
    self.reserved_tokens = tuple(_unique(reserved_tokens))

  def encode(self, text):
    return [b + self._OFFSET for b in text.encode('utf-8')]

  def decode(self, ids):
    data = bytes(int(i) - self._OFFSET for i in ids
                 if self._OFFSET <= i < self._BYTES_END)
    return data.decode('utf-8', errors='replace')

  vocab_size = property(lambda self: self._BYTES_END + len(self.reserved_tokens))
  pad_id = property(lambda self: 0)
  bos_id = property(lambda self: 1)
  eos_id = property(lambda self: 2)

  def _reserved_ids(self):
    return {t: self._BYTES_END + i for i, t in enumerate(self.reserved_tokens)}

  @classmethod
  def from_config(cls, config, texts):
    return cls(config.get('reserved_tokens', ()))

  @classmethod
  def load(cls, directory, info):
    return cls(info.get('reserved_tokens', ()))


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece with pad 0, bos 1, eos 2, unk 3 and byte fallback."""

  kind = 'sentencepiece'
  MODEL_FILE = 'spm.model'

  def __init__(self, model_proto: bytes, reserved_tokens=()):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.reserved_tokens = tuple(reserved_tokens)

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  vocab_size = property(lambda self: self._sp.vocab_size())
  pad_id = property(lambda self: self._sp.pad_id())
  bos_id = property(lambda self: self._sp.bos_id())
  eos_id = property(lambda self: self._sp.eos_id())

  def _reserved_ids(self):
    return {t: self._sp.piece_to_id(t) for t in self.reserved_tokens}

  @classmethod
  def from_config(cls, config, texts):
    """Trains on lines of `texts`, up to `config.max_train_chars` characters."""
    if texts is None:
      raise ValueError('tokenizer.kind=sentencepiece needs training texts: pass '
                       'texts= to make_tokenizer (e.g. data.document_texts).')
    model = io.BytesIO()
    reserved = tuple(_unique(config.get('reserved_tokens', ())))
    # Identity normalisation, kept whitespace and '\n' as a piece make
    # decode(encode(text)) == text for code; byte_fallback covers rare chars.
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, config.max_train_chars),
        model_writer=model, vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=config.character_coverage,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=['\n', *_unique(config.get('whole_words', ()))],
        num_threads=os.cpu_count() or 1,
        split_digits=config.get('split_digits', False),
        minloglevel=2, **({'control_symbols': list(reserved)} if reserved else {}))
    return cls(model.getvalue(), reserved)

  @classmethod
  def load(cls, directory, info):
    return cls(_existing(epath.Path(directory) / cls.MODEL_FILE).read_bytes(),
               info.get('reserved_tokens', ()))

  def _save_files(self, directory):
    (directory / self.MODEL_FILE).write_bytes(self._proto)


def _lines(texts: Iterable[str], max_chars: int):
  """Yields non-empty lines of `texts` until `max_chars` characters."""
  total = 0
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line
        total += len(line)
        if total >= max_chars:
          return


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, encoded without added special tokens."""

  kind = 'huggingface'
  FILE = 'tokenizer.json'
  _NAMES = {
      'bos': ('<s>', '<|begin_of_text|>', '<bos>', '<|endoftext|>'),
      'eos': ('</s>', '<|end_of_text|>', '<eos>', '<|endoftext|>'),
      'pad': ('<pad>', '<|pad|>', '[PAD]', '<|finetune_right_pad_id|>'),
  }

  def __init__(self, path: str, bos_id: int, eos_id: int, pad_id: int, reserved_tokens=()):
    self._path = path
    self._tok = hf_tokenizers.Tokenizer.from_str(_existing(epath.Path(path)).read_text())
    self._special = dict(bos=bos_id, eos=eos_id, pad=pad_id)
    self.reserved_tokens = tuple(_unique(reserved_tokens))
    missing = [t for t in self.reserved_tokens if self._tok.token_to_id(t) is None]
    if missing:
      raise ValueError(f'{path}: the reserved tokens {missing} are not in the vocabulary; '
                       'use tokens the tokenizer has (see its added_tokens).')

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  vocab_size = property(
      lambda self: self._tok.get_vocab_size(with_added_tokens=True))
  bos_id = property(lambda self: self._special['bos'])
  eos_id = property(lambda self: self._special['eos'])
  pad_id = property(lambda self: self._special['pad'])

  def _reserved_ids(self):
    return {t: self._tok.token_to_id(t) for t in self.reserved_tokens}

  @classmethod
  def from_config(cls, config, texts):
    path = config.path
    if not path:
      raise ValueError('tokenizer.kind=huggingface needs tokenizer.path, the '
                       'path of a tokenizer.json.')
    tok = hf_tokenizers.Tokenizer.from_str(_existing(epath.Path(path)).read_text())
    named = _hf_special_token_names(os.path.dirname(path))
    ids = {}
    for name in ('bos', 'eos', 'pad'):
      ids[name] = config[f'{name}_id']
      candidates = (named.get(name),) + cls._NAMES[name]
      for token in candidates:
        if ids[name] is None and token is not None:
          ids[name] = tok.token_to_id(token)
    ids['pad'] = ids['eos'] if ids['pad'] is None else ids['pad']
    missing = [n for n in ('bos', 'eos') if ids[n] is None]
    if missing:
      raise ValueError(f'{path}: no {"/".join(missing)} token found; set '
                       + ', '.join(f'tokenizer.{n}_id' for n in missing))
    return cls(path, ids['bos'], ids['eos'], ids['pad'], config.get('reserved_tokens', ()))

  @classmethod
  def load(cls, directory, info):
    return cls(os.fspath(epath.Path(directory) / cls.FILE), info['bos_id'],
               info['eos_id'], info['pad_id'], info.get('reserved_tokens', ()))

  def _save_files(self, directory):
    target = directory / self.FILE
    if os.fspath(target) != os.fspath(epath.Path(self._path)):
      target.write_text(epath.Path(self._path).read_text())


def _hf_special_token_names(directory: str) -> dict[str, str]:
  """bos/eos/pad token strings from a tokenizer_config.json, if present."""
  path = os.path.join(directory, 'tokenizer_config.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    cfg = json.load(f)
  names = {}
  for name in ('bos', 'eos', 'pad'):
    token = cfg.get(f'{name}_token')
    names[name] = token.get('content') if isinstance(token, dict) else token
  return names


_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls
    for cls in (ByteTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer)
}


def _unique(tokens):
  """``tokens`` as a list, refusing duplicates and empty strings."""
  tokens = list(tokens)
  bad = [t for t in tokens if not t or tokens.count(t) > 1]
  if bad:
    raise ValueError(f'tokenizer.reserved_tokens={tokens} has empty or repeated tokens {bad}.')
  return tokens


def _existing(path):
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'Tokenizer file not found: {path}')
  return path


def load_tokenizer(directory: str) -> Tokenizer:
  """Reloads a tokenizer written by `Tokenizer.save(directory)`."""
  info = json.loads(_existing(epath.Path(directory) / MARKER_FILE).read_text())
  return _KINDS[info['kind']].load(directory, info)


def make_tokenizer(config: config_dict.ConfigDict, workdir: str | None = None,
                   texts: Iterable[str] | None = None, save: bool = True) -> Tokenizer:
  """Builds the tokenizer of `config`, or reloads the one saved in `workdir`.

  Args:
    config: a `default_tokenizer_config()`-like ConfigDict.
    workdir: run directory; the tokenizer is saved to `workdir/tokenizer/`, and
      reloaded from there when present (after checking it matches `config`).
    texts: training documents, needed only to train a new SentencePiece model.
    save: save a newly built tokenizer into the workdir (a job that must check
      more before writing anything saves it itself, with `Tokenizer.save`).
  """
  if config.kind not in _KINDS:
    raise ValueError(f'tokenizer.kind={config.kind!r}; expected one of '
                     f'{sorted(_KINDS)}')
  directory = workdir and epath.Path(workdir) / TOKENIZER_SUBDIR
  if directory and (directory / MARKER_FILE).exists():
    tokenizer = load_tokenizer(directory)
    _check_matches(tokenizer, config, directory)
    return tokenizer
  tokenizer = _KINDS[config.kind].from_config(config, texts)
  if directory and save:
    tokenizer.save(directory)
  return tokenizer


def _check_matches(tokenizer: Tokenizer, config: config_dict.ConfigDict,
                   directory: str) -> None:
  """Raises if the tokenizer saved in a workdir disagrees with `config`."""
  expected = [('kind', config.kind, tokenizer.kind),
              ('reserved_tokens', tuple(config.get('reserved_tokens', ())),
               tuple(tokenizer.reserved_tokens))]
  if config.kind == 'sentencepiece':
    expected.append(('vocab_size', config.vocab_size, tokenizer.vocab_size))
  for field, want, saved in expected:
    if want != saved:
      raise ValueError(
          f'tokenizer.{field}={want!r} but the tokenizer saved in {directory} '
          f'has {field}={saved!r}; use a fresh workdir or set '
          f'tokenizer.{field}={saved!r}.')
