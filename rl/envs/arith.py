"""Multi-step arithmetic with newline-separated steps: the reasoning task of the PAV
reproduction ("Rewarding progress", arXiv:2410.08146, Sec. 4-5, in miniature).

A problem is a left-nested expression over single-digit operands, e.g. ``((3+5)*2)-4``
(the user's turn); a solution (the assistant's turn) evaluates one operation per line,
left to right, and ends with the answer line:

  3+5=8
  8*2=16
  16-4=12
  answer: 12

Steps are the lines (``steps``). Only the final answer is checked (``parse_answer``,
``score``): the last line must be exactly ``answer: N`` with N the expression's value;
anything else (wrong number, extra text, missing answer line, a turn cut at the token
limit) scores 0, never an exception. Intermediate lines are not checked: a wrong step
only hurts through the answer it leads to.

Difficulty: the number of operations is uniform in ``[min_ops, max_ops]``, operands are in
``[2, max_operand]``, operators uniform over ``ops``; an operator that would leave
``[0, max_value]`` is redrawn (``+`` always fits after a ``-`` or ``*`` is refused), so
every intermediate value is a small non-negative integer. Splits: a problem is ``test``
when the CRC32 of its text is divisible by ``test_every``, else ``train``; ``reset``
draws until the split matches, so the splits never share a problem.
"""
import dataclasses
import re
import zlib
from typing import Optional

from ml_collections import config_dict
import numpy as np

from rl.envs import base

SPLITS = ('train', 'test')
_ANSWER = re.compile(r'answer: (0|[1-9][0-9]*)')
_APPLY = {'+': lambda a, b: a + b, '-': lambda a, b: a - b, '*': lambda a, b: a * b}


def default_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      name='arith',
      min_ops=3,
      max_ops=5,
      max_operand=9,
      max_value=999,
      ops='+-*',
      test_every=5,  # about 1 problem in 5 is held out
  ))


@dataclasses.dataclass
class ArithEpisode(base.Episode):
  """Hidden state: the operands, the operators and the value."""
  operands: tuple = ()
  ops: tuple = ()
  answer: int = 0

  @property
  def problem(self) -> str:
    return problem_text(self.operands, self.ops)


def problem_text(operands, ops) -> str:
  """``((a+b)*c)-d``: every operation but the last in parentheses."""
  text = str(operands[0])
  for i, (op, b) in enumerate(zip(ops, operands[1:])):
    text = f'{text}{op}{b}'
    if i < len(ops) - 1:
      text = f'({text})'
  return text


def solution_steps(operands, ops) -> list:
  """The demonstration's lines: one operation each, then ``answer: N``."""
  lines, value = [], operands[0]
  for op, b in zip(ops, operands[1:]):
    new = _APPLY[op](value, b)
    lines.append(f'{value}{op}{b}={new}')
    value = new
  return lines + [f'answer: {value}']


def steps(text: str) -> list:
  """The steps of a solution: its lines."""
  return text.split('\n')


def parse_answer(text: str) -> Optional[int]:
  """N when the last line of ``text`` is exactly ``answer: N`` (no leading zeros), else
  None."""
  match = _ANSWER.fullmatch(steps(text)[-1])
  return int(match.group(1)) if match else None


def score(answer: int, text: str) -> float:
  """1.0 when ``text``'s final answer is ``answer``, else 0.0 (malformed text included)."""
  return float(parse_answer(text) == answer)


def split_of(problem: str, test_every: int) -> str:
  return 'test' if zlib.crc32(problem.encode()) % test_every == 0 else 'train'


class ArithEnv(base.Env):
  """One user turn (the problem), one assistant turn (the solution); reward 1 if correct."""

  roles = ('system', 'user', 'assistant')

  def __init__(self, config: Optional[config_dict.ConfigDict] = None):
    config = default_config() if config is None else config
    if not 1 <= config.min_ops <= config.max_ops:
      raise ValueError(f'min_ops={config.min_ops}, max_ops={config.max_ops}: need '
                       '1 <= min_ops <= max_ops.')
    if not 2 <= config.max_operand <= 9:
      raise ValueError(f'max_operand={config.max_operand} must be in [2, 9] (one digit).')
    if not config.ops or any(o not in _APPLY for o in config.ops) or '+' not in config.ops:
      raise ValueError(f"ops={config.ops!r} must be a subset of '+-*' holding '+'.")
    if config.max_value < 2 * config.max_operand * (config.max_ops + 1):
      raise ValueError(f'max_value={config.max_value} is too small for max_ops='
                       f'{config.max_ops} additions of operands up to {config.max_operand}.')
    if config.test_every < 2:
      raise ValueError(f'test_every={config.test_every} must be >= 2.')
    self.config = config

  def _draw(self, rng):
    cfg = self.config
    n = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
    value = int(rng.integers(2, cfg.max_operand + 1))
    operands, ops = [value], []
    for _ in range(n):
      b = int(rng.integers(2, cfg.max_operand + 1))
      op = cfg.ops[rng.integers(len(cfg.ops))]
      if not 0 <= _APPLY[op](value, b) <= cfg.max_value:
        op = '+'
      value = _APPLY[op](value, b)
      operands.append(b)
      ops.append(op)
    return tuple(operands), tuple(ops)

  def reset(self, rng: np.random.Generator, split: str = 'train') -> ArithEpisode:
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')
    while True:
      operands, ops = self._draw(rng)
      problem = problem_text(operands, ops)
      if split_of(problem, self.config.test_every) == split:
        return ArithEpisode(turns=[base.Turn('user', problem)], next_role='assistant',
                            operands=operands, ops=ops, answer=_value(operands, ops))

  def step(self, episode: ArithEpisode) -> None:
    if episode.done:
      raise ValueError('step on a finished episode.')
    turn = episode.turns[-1]
    if turn.role != 'assistant':
      raise ValueError(f'the last turn is by {turn.role!r}, expected the assistant.')
    correct = score(episode.answer, turn.text) if turn.ended else 0.0
    episode.reward, episode.done, episode.next_role = correct, True, None
    episode.info = dict(acc=correct, steps=len(steps(turn.text)),
                        malformed=float(parse_answer(turn.text) is None or not turn.ended))

  def solution(self, episode: ArithEpisode) -> str:
    return '\n'.join(solution_steps(episode.operands, episode.ops))

  def demonstration(self, rng: np.random.Generator, split: str = 'train') -> ArithEpisode:
    """A finished episode with the correct step-by-step solution (SFT data)."""
    episode = self.reset(rng, split)
    episode.turns.append(base.Turn('assistant', self.solution(episode)))
    self.step(episode)
    return episode

  def eval_settings(self) -> dict:
    return {'test': [{'split': 'test'}], 'train': [{'split': 'train'}]}

  def summary(self, episodes: list) -> dict:
    if not episodes or not all(e.done for e in episodes):
      raise ValueError('summary needs a non-empty list of finished episodes.')
    mean = lambda key: float(np.mean([e.info.get(key, 0.0) for e in episodes]))
    return dict(acc=mean('acc'), reward=float(np.mean([e.reward for e in episodes])),
                malformed=mean('malformed'), steps=mean('steps'))


def _value(operands, ops) -> int:
  value = operands[0]
  for op, b in zip(ops, operands[1:]):
    value = _APPLY[op](value, b)
  return value
