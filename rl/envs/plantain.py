"""Plan-first interleaved reasoning on multi-step arithmetic: the task of the Plantain
reproduction (arXiv:2512.03176, PAPERS.md §5), built on ``rl.envs.arith``.

The problem is arith's (``((3+5)*2)-4``); the response has one of two formats, written with
four markup tags that are one reserved token each (``Env.markup``, ``rl.episodes``):

  think        (think-then-answer, the baseline)
    <think>3+5=8\\n8*2=16\\n16-4=12</think><answer>answer: 12</answer>
  interleaved  (Plantain, Sec. 3: think/answer segments repeated, the first visible segment
               a step-by-step plan naming the operations in order)
    <think></think><answer>plan: + * -</answer><think>3+5=8</think><answer>8</answer>
    <think>8*2=16</think><answer>16</answer><think>16-4=12</think><answer>answer: 12</answer>
    (one line here for reading; the response has no newline between segments)

Reward (Sec. 4, RL stage): ``r = r_format * (1 + r_correct + r_plan)``. ``r_format`` is a
0/1 gate on the configured format (``parse``: a turn cut at the token limit, a missing or
stray tag, a plan that does not parse all give 0, never an exception); ``r_correct`` is 1
when the last answer segment is ``answer: N`` with N the value; ``r_plan`` is the rule
judge's score of the plan (``judge_plan``: the fraction of the operations named in the
right place; the judge accepts a plan at 1) and is 0 in the think format, which has no plan.

Rewind-and-repeat (Sec. 5) puts rejected plans in the context: ``reset(..., rejected=...)``
appends one ``not: <plan>`` line per rejected plan to the problem, and a share
``rejected_fraction`` of the interleaved demonstrations carry such lines (wrong plans drawn
by ``corrupt_plan``) so the policy learns to read them.
"""
import dataclasses
import re
from typing import Optional

from ml_collections import config_dict
import numpy as np

from rl.envs import arith
from rl.envs import base

THINK, END_THINK, ANSWER, END_ANSWER = '<think>', '</think>', '<answer>', '</answer>'
MARKUP = (THINK, END_THINK, ANSWER, END_ANSWER)
FORMATS = ('interleaved', 'think')
_SEGMENT = re.compile(r'<think>([^<]*)</think><answer>([^<]*)</answer>')
_PLAN = re.compile(r'plan: ([-+*](?: [-+*])*)')
_FINAL = re.compile(r'answer: (0|[1-9][0-9]*)')


def default_config() -> config_dict.ConfigDict:
  config = arith.default_config().to_dict()
  config.update(name='plantain', format='interleaved', rejected_fraction=0.2, max_rejected=2)
  return config_dict.ConfigDict(config)


@dataclasses.dataclass
class Parsed:
  """A response that has the format: the plan's operators (interleaved) and the answer."""
  plan: tuple
  answer: Optional[int]  # None: the last segment is not ``answer: N``


def plan_text(ops) -> str:
  return 'plan: ' + ' '.join(ops)


def response_text(operands, ops, fmt: str) -> str:
  """The demonstration's response in format ``fmt`` (module docstring)."""
  lines = arith.solution_steps(operands, ops)
  steps, final = lines[:-1], lines[-1]
  if fmt == 'think':
    return f'{THINK}{chr(10).join(steps)}{END_THINK}{ANSWER}{final}{END_ANSWER}'
  values = [s.split('=')[1] for s in steps[:-1]] + [final]
  return (f'{THINK}{END_THINK}{ANSWER}{plan_text(ops)}{END_ANSWER}' +
          ''.join(f'{THINK}{s}{END_THINK}{ANSWER}{v}{END_ANSWER}' for s, v in zip(steps, values)))


def parse_plan(text: str) -> Optional[tuple]:
  """The operators of the plan in the first answer segment of ``text`` (a whole response or
  just its first segment), or None when it does not start with a well-formed plan segment."""
  match = _SEGMENT.match(text)
  plan = match and _PLAN.fullmatch(match.group(2))
  return tuple(plan.group(1).split(' ')) if plan else None


def parse(text: str, fmt: str) -> Optional[Parsed]:
  """``text`` read in format ``fmt``, or None when it breaks the format (r_format = 0)."""
  if not re.fullmatch(f'(?:{_SEGMENT.pattern})+', text):
    return None
  segments = _SEGMENT.findall(text)
  final = _FINAL.fullmatch(segments[-1][1])
  answer = int(final.group(1)) if final else None
  if fmt == 'think':
    return Parsed((), answer) if len(segments) == 1 else None
  plan = parse_plan(text)
  if plan is None or len(segments) < 2:
    return None
  return Parsed(plan, answer)


def judge_plan(plan: Optional[tuple], ops) -> float:
  """The rule judge (the paper's LLM judge, Sec. 4): the fraction of positions where the
  plan names the right operator, over the longer of the plan and the true operations; 1.0
  (accepted) only for the exact plan, 0.0 for no plan."""
  if not plan:
    return 0.0
  return sum(a == b for a, b in zip(plan, ops)) / max(len(plan), len(ops))


def corrupt_plan(rng: np.random.Generator, ops, alphabet: str) -> tuple:
  """A wrong plan: one operator of ``ops`` replaced by another of ``alphabet``, or (with
  a single-operator alphabet) one operation dropped or repeated."""
  ops = list(ops)
  i = int(rng.integers(len(ops)))
  others = sorted(set(alphabet) - {ops[i]})
  if others:
    ops[i] = others[int(rng.integers(len(others)))]
  elif len(ops) > 1 and rng.random() < 0.5:
    del ops[i]
  else:
    ops.insert(i, ops[i])
  return tuple(ops)


@dataclasses.dataclass
class PlantainEpisode(arith.ArithEpisode):
  rejected: tuple = ()  # plans already rejected (in the problem turn)


class PlantainEnv(arith.ArithEnv):
  """Arithmetic in the think or interleaved format with the format-gated reward."""

  markup = MARKUP

  def __init__(self, config: Optional[config_dict.ConfigDict] = None):
    config = default_config() if config is None else config
    super().__init__(config)
    if config.format not in FORMATS:
      raise ValueError(f'format={config.format!r} must be one of {FORMATS}.')
    if not 0 <= config.rejected_fraction <= 1:
      raise ValueError(f'rejected_fraction={config.rejected_fraction} must be in [0, 1].')
    if config.max_rejected < 1:
      raise ValueError(f'max_rejected={config.max_rejected} must be >= 1.')

  @property
  def format(self) -> str:
    return self.config.format

  def reset(self, rng: np.random.Generator, split: str = 'train',
            rejected=()) -> PlantainEpisode:
    return self.with_rejected(super().reset(rng, split), rejected)

  def with_rejected(self, episode: arith.ArithEpisode, rejected) -> PlantainEpisode:
    """A fresh copy of ``episode``'s opening with ``rejected`` plans (operator tuples) in the
    problem turn, one ``not: plan: ...`` line each (rewind-and-repeat, Sec. 5)."""
    rejected = tuple(tuple(p) for p in rejected)
    text = episode.problem + ''.join(f'\nnot: {plan_text(p)}' for p in rejected)
    return PlantainEpisode(turns=[base.Turn('user', text)], next_role='assistant',
                           operands=episode.operands, ops=episode.ops, answer=episode.answer,
                           rejected=rejected)

  def step(self, episode: PlantainEpisode) -> None:
    if episode.done:
      raise ValueError('step on a finished episode.')
    turn = episode.turns[-1]
    if turn.role != 'assistant':
      raise ValueError(f'the last turn is by {turn.role!r}, expected the assistant.')
    parsed = parse(turn.text, self.format) if turn.ended else None
    r_format = float(parsed is not None)
    r_correct = float(parsed is not None and parsed.answer == episode.answer)
    r_plan = judge_plan(parsed.plan, episode.ops) if parsed is not None else 0.0
    episode.reward = r_format * (1.0 + r_correct + r_plan)
    episode.done, episode.next_role = True, None
    episode.info = dict(acc=r_correct, format=r_format, plan=r_plan,
                        plan_ok=float(r_plan == 1.0), malformed=1.0 - r_format)

  def solution(self, episode: PlantainEpisode) -> str:
    return response_text(episode.operands, episode.ops, self.format)

  def demonstration(self, rng: np.random.Generator, split: str = 'train') -> PlantainEpisode:
    """A finished episode with the correct response; in the interleaved format a share
    ``rejected_fraction`` has 1 to ``max_rejected`` wrong plans in its problem turn."""
    episode = self.reset(rng, split)
    cfg = self.config
    if self.format == 'interleaved' and rng.random() < cfg.rejected_fraction:
      n = int(rng.integers(1, cfg.max_rejected + 1))
      episode = self.with_rejected(
          episode, [corrupt_plan(rng, episode.ops, cfg.ops) for _ in range(n)])
    episode.turns.append(base.Turn('assistant', self.solution(episode)))
    self.step(episode)
    return episode

  def summary(self, episodes: list) -> dict:
    if not episodes or not all(e.done for e in episodes):
      raise ValueError('summary needs a non-empty list of finished episodes.')
    mean = lambda key: float(np.mean([e.info.get(key, 0.0) for e in episodes]))
    return dict(acc=mean('acc'), reward=float(np.mean([e.reward for e in episodes])),
                format=mean('format'), plan=mean('plan'), plan_ok=mean('plan_ok'))
