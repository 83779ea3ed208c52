"""Batched multi-turn rollouts: environments and models in, transcripts out.

Every turn of a conversation is ``<|role|> text <|end|>`` in token ids, after one BOS; the
role and end-of-turn markers are reserved tokens of the tokenizer (``reserved_tokens``),
never strings a model could spell. A role played by a model continues its own view of the
conversation (``Env.view``) after its role token, until it writes ``<|end|>`` or reaches
``max_new_tokens``: all episodes waiting on that role generate together in one batched,
jit-compiled, KV-cached ``model.decode.generate`` call. Roles without a model are scripted
by the environment. ``Transcript`` is one role's view as arrays: the token ids, the role of
every token, which tokens the trained policy generated (``policy_mask``, the loss mask)
and their behaviour log-probs (under the distribution they were sampled from).
"""
import contextlib
import dataclasses
import re
from typing import Any, Callable, Optional

import jax
import numpy as np

from model import decode
from model.config_errors import ConfigError
from rl.envs.base import Env, Turn

END_OF_TURN = '<|end|>'


def role_token(role: str) -> str:
  return f'<|{role}|>'


def reserved_tokens(roles, markup=()) -> tuple:
  """The reserved tokens a tokenizer needs for an environment's ``roles`` and ``markup``
  (``Env.markup``: tags inside a turn, e.g. ``<think>``)."""
  return tuple(role_token(r) for r in roles) + (END_OF_TURN,) + tuple(markup)


class Formatter:
  """Token ids of turns and views for one tokenizer and one environment's roles.

  ``markup`` (``Env.markup``) are strings that stand for one reserved token each inside a
  turn's text: ``encode`` maps them to their ids and ``decode`` back, so a model writes a
  tag as one token and the environment reads it as text."""

  def __init__(self, tokenizer, roles, markup=()):
    self.tokenizer = tokenizer
    self.roles = tuple(roles)
    try:
      self.role_ids = {r: tokenizer.reserved_id(role_token(r)) for r in self.roles}
      self.end_id = tokenizer.reserved_id(END_OF_TURN)
      self.markup_ids = {m: tokenizer.reserved_id(m) for m in markup}
    except ValueError as e:
      raise ConfigError(f'{e} An RL policy needs the reserved tokens '
                        f'{list(reserved_tokens(self.roles, markup))}.') from None
    self._markup_of = {i: m for m, i in self.markup_ids.items()}
    self._split = (re.compile('(' + '|'.join(map(re.escape, self.markup_ids)) + ')')
                   if self.markup_ids else None)

  def encode(self, text: str) -> list:
    """Token ids of a turn's text, each markup string one reserved id."""
    if self._split is None:
      return self.tokenizer.encode(text)
    ids = []
    for i, piece in enumerate(self._split.split(text)):
      ids += [self.markup_ids[piece]] if i % 2 else self.tokenizer.encode(piece)
    return ids

  def decode(self, ids) -> str:
    """The text of generated ids, markup ids as their strings."""
    text, run = [], []
    for i in ids:
      if int(i) in self._markup_of:
        text += [self.tokenizer.decode(run), self._markup_of[int(i)]]
        run = []
      else:
        run.append(i)
    return ''.join(text + [self.tokenizer.decode(run)])

  def check_vocab(self, vocab_size: int):
    """The model must have an embedding for every id the tokenizer produces."""
    if vocab_size < self.tokenizer.vocab_size:
      raise ConfigError(f'config.model.vocab_size={vocab_size} is smaller than the tokenizer\'s '
                       f'{self.tokenizer.vocab_size} ids (reserved role tokens included).')

  def turn_ids(self, turn: Turn) -> list:
    ids = turn.ids if turn.ids is not None else self.encode(turn.text)
    return [self.role_ids[turn.role], *ids, self.end_id]

  def context(self, view, next_role: str) -> list:
    """The prompt a model continues to speak as ``next_role``."""
    ids = [self.tokenizer.bos_id]
    for turn in view:
      ids += self.turn_ids(turn)
    return ids + [self.role_ids[next_role]]


@dataclasses.dataclass
class Transcript:
  """One role's view of a finished episode, as arrays of equal length."""
  tokens: np.ndarray  # int32
  roles: np.ndarray  # int8: index into Formatter.roles; -1 for BOS
  policy_mask: np.ndarray  # int32: 1 where the trained policy generated the token
  logprobs: np.ndarray  # float32: behaviour log-prob of those tokens, 0 elsewhere
  reward: float
  group: int  # the prompt's id: samples of one prompt share it
  info: dict


def transcript(formatter: Formatter, view, trained_roles, reward: float, group: int = 0,
               info: Optional[dict] = None, demonstration: bool = False,
               untrained_after: Optional[str] = None) -> Transcript:
  """A view as a ``Transcript``. ``policy_mask`` covers the generated tokens (with their
  end-of-turn token, when generated) of turns by ``trained_roles``; with ``demonstration``
  every turn of those roles counts as the policy's (supervised data). Turns after the first
  turn of role ``untrained_after`` (e.g. a tool's result) are left out of the mask."""
  tokens, roles, mask, logprobs = [formatter.tokenizer.bos_id], [-1], [0], [0.0]
  frozen = False
  for turn in view:
    ids = formatter.turn_ids(turn)
    role = formatter.roles.index(turn.role)
    trained = (turn.role in trained_roles and not frozen and
               (demonstration or turn.logprobs is not None))
    frozen = frozen or turn.role == untrained_after
    body = len(ids) - 2 + (1 if demonstration or turn.ended else 0)  # + the generated <|end|>
    lps = (list(turn.logprobs) if turn.logprobs is not None else [])
    tokens += ids
    roles += [role] * len(ids)
    mask += [0] + [int(trained)] * body + [0] * (len(ids) - 1 - body)
    logprobs += [0.0] + (lps + [0.0] * (len(ids) - 1 - len(lps)) if trained else
                         [0.0] * (len(ids) - 1))
  return Transcript(np.asarray(tokens, np.int32), np.asarray(roles, np.int8),
                    np.asarray(mask, np.int32), np.asarray(logprobs, np.float32),
                    float(reward), int(group), dict(info or {}))


def text_transcript(formatter: Formatter, text: str) -> Transcript:
  """Plain text after BOS, every token trained (pretraining data; no role, reward 0)."""
  ids = [formatter.tokenizer.bos_id] + formatter.tokenizer.encode(text)
  n = len(ids)
  return Transcript(np.asarray(ids, np.int32), np.full((n,), -1, np.int8),
                    np.asarray([0] + [1] * (n - 1), np.int32), np.zeros((n,), np.float32),
                    0.0, 0, {})


@dataclasses.dataclass(frozen=True)
class Actor:
  """A model playing a role: the module, its variables, and how it samples."""
  model: Any
  params: Any
  sampling: decode.SamplingConfig
  max_new_tokens: int


def bucket(n: int, multiple: int) -> int:
  """``n`` rounded up to a power of two, then to a multiple of ``multiple``: few shapes,
  few compiles."""
  size = 1 << max(0, (n - 1).bit_length())
  return -(-size // multiple) * multiple


def padded_width(rows: list, multiple: int = 16) -> int:
  """The longest of ``rows`` (token id lists) rounded up to ``multiple``."""
  return -(-max(map(len, rows)) // multiple) * multiple


def pad_rows(rows: list, pad_id: int, multiple: int = 16, width: int = 0):
  """``rows`` (token id lists) right-padded into int32 [2^k rows, ``width``] (default
  ``padded_width(rows, multiple)``), and the lengths (1 for padding rows): few shapes, few
  compiles."""
  width = width or padded_width(rows, multiple)
  tokens = np.full((bucket(len(rows), 1), width), pad_id, np.int32)
  lengths = np.ones((len(tokens),), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    lengths[i] = len(row)
  return tokens, lengths


def generate_turns(actor: Actor, contexts: list, formatter: Formatter, rng,
                   batch_multiple: int = 1, place: Callable = lambda x: x,
                   generate: Callable = decode.generate, stop_tokens=None) -> list:
  """One turn for each context: a list of (ids, logprobs, ended); ``ended`` when the turn
  stopped at one of ``stop_tokens`` (default: end-of-turn), which ``ids`` leave out.

  Contexts are right-padded to a multiple of 16 tokens and the batch to a power of two
  (and a multiple of ``batch_multiple``, the mesh's batch shards); ``place`` puts the
  prompts on the mesh. ``generate`` has the signature and outputs of ``decode.generate``
  (``bench/rollout.py`` swaps in a sampler without a KV cache).
  """
  stops = (formatter.end_id,) if stop_tokens is None else tuple(stop_tokens)
  n, longest = len(contexts), max(len(c) for c in contexts)
  rows, width = bucket(n, batch_multiple), -(-longest // 16) * 16
  prompts = np.full((rows, width), formatter.tokenizer.pad_id, np.int32)
  lengths = np.ones((rows,), np.int32)
  prompts[n:, 0] = formatter.tokenizer.bos_id
  for i, ids in enumerate(contexts):
    prompts[i, :len(ids)] = ids
    lengths[i] = len(ids)
  out = generate(actor.model, actor.params, place(prompts), actor.max_new_tokens,
                 actor.sampling, rng, stop_tokens=stops,
                 pad_id=formatter.tokenizer.pad_id, prompt_lengths=place(lengths))
  tokens, logprobs, counts = jax.device_get((out.tokens, out.sample_logprobs, out.lengths))
  turns = []
  for i in range(n):
    count = int(counts[i])
    ended = count > 0 and int(tokens[i, count - 1]) in stops
    ids = tokens[i, :count - 1 if ended else count].tolist()
    turns.append((ids, logprobs[i, :count].tolist(), bool(ended)))
  return turns


def rollout(env: Env, episodes: list, actors: dict, formatter: Formatter, rng,
            max_turns: int = 16, batch_multiple: int = 1, place: Callable = lambda x: x,
            context: Callable = contextlib.nullcontext,
            generate: Callable = decode.generate) -> list:
  """Plays ``episodes`` (fresh from ``env.reset``) to the end, in place, and returns them.

  Each round, scripted roles speak until every live episode waits on a model role; then
  each model role generates one turn for all the episodes waiting on it, in one batch.
  An episode still running after ``max_turns`` model turns is cut off: ``done`` with
  ``info['truncated'] = True`` and reward 0.
  """
  model_turns = [0] * len(episodes)
  for round_index in range(max_turns + 1):
    waiting = {}
    for i, episode in enumerate(episodes):
      while not episode.done and episode.next_role not in actors:
        role = episode.next_role
        episode.turns.append(Turn(role, env.scripted(episode, role)))
        env.step(episode)
      if episode.done:
        continue
      if model_turns[i] >= max_turns:
        episode.done, episode.reward = True, 0.0
        episode.info = dict(episode.info, truncated=True)
        continue
      waiting.setdefault(episode.next_role, []).append(i)
    if not waiting:
      break
    for role_index, (role, indices) in enumerate(sorted(waiting.items())):
      contexts = [formatter.context(env.view(episodes[i], role), role) for i in indices]
      turn_rng = jax.random.fold_in(jax.random.fold_in(rng, round_index), role_index)
      with context():
        turns = generate_turns(actors[role], contexts, formatter, turn_rng, batch_multiple,
                               place, generate)
      for i, (ids, logprobs, ended) in zip(indices, turns):
        text = formatter.decode(ids)
        episodes[i].turns.append(Turn(role, text, ids, logprobs, ended))
        model_turns[i] += 1
        env.step(episodes[i])
  return episodes


def transcripts(env: Env, episodes: list, formatter: Formatter, role: str, trained_roles,
                groups=None, demonstration: bool = False,
                untrained_after: Optional[str] = None) -> list:
  """``role``'s view of each finished episode as a Transcript (``transcript``)."""
  groups = range(len(episodes)) if groups is None else groups
  return [transcript(formatter, env.view(e, role), trained_roles, e.reward, g, e.info,
                     demonstration, untrained_after) for e, g in zip(episodes, groups)]


BATCH_FIELDS = ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask',
                'behaviour_logprobs', 'rewards', 'group_ids')


def to_batch(items: list, seq_len: int, pad_id: int) -> dict:
  """Transcripts as trainer arrays [N, seq_len]: ``tokens``/``targets`` shifted by one,
  ``loss_mask`` from ``policy_mask``, ``behaviour_logprobs`` aligned with targets, plus
  per-sequence ``rewards`` and ``group_ids``."""
  too_long = [len(t.tokens) for t in items if len(t.tokens) > seq_len + 1]
  if too_long:
    raise ValueError(f'{len(too_long)} transcript(s) have up to {max(too_long)} tokens, more '
                     f'than data.seq_len + 1 = {seq_len + 1}; raise data.seq_len or lower the '
                     'per-turn max_new_tokens.')
  n = len(items)
  batch = dict(tokens=np.full((n, seq_len), pad_id, np.int32),
               targets=np.full((n, seq_len), pad_id, np.int32),
               positions=np.zeros((n, seq_len), np.int32),
               segment_ids=np.zeros((n, seq_len), np.int32),
               loss_mask=np.zeros((n, seq_len), np.int32),
               behaviour_logprobs=np.zeros((n, seq_len), np.float32),
               rewards=np.asarray([t.reward for t in items], np.float32),
               group_ids=np.asarray([t.group for t in items], np.int32))
  for i, t in enumerate(items):
    m = len(t.tokens) - 1
    batch['tokens'][i, :m] = t.tokens[:-1]
    batch['targets'][i, :m] = t.tokens[1:]
    batch['positions'][i, :m] = np.arange(m)
    batch['segment_ids'][i, :m] = 1
    batch['loss_mask'][i, :m] = t.policy_mask[1:]
    batch['behaviour_logprobs'][i, :m] = t.logprobs[1:]
  return batch


def epoch_batches(arrays: dict, batch_size: int, seed, start: int = 0):
  """Endless batches of ``batch_size`` rows, reshuffled every epoch: batch ``k`` is a
  function of (``seed``, an int or a tuple of ints, and ``k``) only, so a resumed loop
  continues from ``start``."""
  n = len(next(iter(arrays.values())))
  if n == 0:
    raise ValueError('No transcripts to train on (all were filtered out).')
  seed = tuple(np.atleast_1d(seed).tolist())
  k = start
  while True:
    epoch, offset = divmod(k * batch_size, n)
    order = np.concatenate([np.random.default_rng([*seed, epoch + e]).permutation(n)
                            for e in range(2 + batch_size // n)])
    rows = order[offset:offset + batch_size]
    yield {name: value[rows] for name, value in arrays.items()}
    k += 1


def summarize_rewards(episodes: list) -> dict:
  rewards = np.asarray([e.reward for e in episodes], np.float64)
  return {'reward': float(rewards.mean()), 'reward_std': float(rewards.std()),
          'truncated': float(np.mean([bool(e.info.get('truncated')) for e in episodes]))}
