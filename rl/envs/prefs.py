"""A preference-hacking setting with an exact gold reward (Pessimistic RLHF,
arXiv:2503.06810, PAPERS.md §7, in miniature).

Responses are short strings over the letters ``a``–``h`` (one empty prompt). The gold reward
of any text ``y``:

  gold(y) = #good letters (a–d) − #characters outside a–h − penalty · max(0, |y| − max_good_len)

so within ``max_good_len`` characters every good letter is worth +1, and beyond it each
extra character costs ``penalty`` (> 1: longer is strictly worse). The optimum is any
string of exactly ``max_good_len`` good letters (gold = ``max_good_len``).

The data policy μ (``sample_demonstration``: what the reference policy is fine-tuned on)
writes uniform letters with lengths mostly ≤ ``mu_max_len`` < ``max_good_len`` and a thin
geometric tail beyond; on its support gold grows with the number of good letters, hence
with length. A reward model fit to Bradley–Terry labels on μ's pairs learns "more good
letters is better" and has almost no data past ``max_good_len``: the trap a policy
optimised against it can exploit by writing long strings.

Not an ``rl.envs.base.Env``: one turn, no roles; ``rl/repro_pessimism.py`` samples from the
policy directly.
"""
import dataclasses

import numpy as np

LETTERS = 'abcdefgh'
GOOD = frozenset('abcd')


@dataclasses.dataclass(frozen=True)
class PrefsTask:
  """The gold reward's constants and μ's length distribution (module doc)."""
  max_good_len: int = 8
  penalty: float = 2.0
  mu_max_len: int = 6  # μ's lengths 1..mu_max_len are equally likely ...
  mu_tail: float = 0.35  # ... and length mu_max_len + k has relative weight mu_tail**k
  max_len: int = 16  # longest response (generation limit; μ's tail is cut here)

  def __post_init__(self):
    if self.max_good_len < 1 or self.mu_max_len < 1:
      raise ValueError(f'max_good_len={self.max_good_len} and mu_max_len={self.mu_max_len} '
                       'must be >= 1.')
    if not self.penalty > 0:
      raise ValueError(f'penalty={self.penalty} must be > 0.')
    if not 0 <= self.mu_tail < 1:
      raise ValueError(f'mu_tail={self.mu_tail} must be in [0, 1).')
    if self.max_len < max(self.max_good_len, self.mu_max_len):
      raise ValueError(f'max_len={self.max_len} must be >= max_good_len and mu_max_len.')

  def length_probs(self):
    """μ's length distribution over 0..max_len [max_len + 1]."""
    lengths = np.arange(self.max_len + 1)
    w = np.where(lengths <= self.mu_max_len, 1.0,
                 self.mu_tail ** np.maximum(lengths - self.mu_max_len, 0).astype(float))
    w[0] = 0.0
    return w / w.sum()


def gold_reward(task: PrefsTask, text: str) -> float:
  """The exact gold reward of any text (module doc)."""
  good = sum(c in GOOD for c in text)
  invalid = sum(c not in LETTERS for c in text)
  return float(good - invalid - task.penalty * max(0, len(text) - task.max_good_len))


def sample_demonstration(task: PrefsTask, rng: np.random.Generator) -> str:
  """One response of the data policy μ: a length from ``length_probs``, uniform letters."""
  n = rng.choice(task.max_len + 1, p=task.length_probs())
  return ''.join(rng.choice(list(LETTERS), size=n))


def label_pairs(task: PrefsTask, first, second, rng: np.random.Generator, prompt=''):
  """Bradley–Terry labels on the gold reward: ``first[i]`` is chosen with probability
  ``σ(gold(first[i]) − gold(second[i]))``. Identical pairs are dropped (they say nothing).
  Returns ``{"prompt", "chosen", "rejected"}`` rows (``rl.preference.load_preferences``'s
  format)."""
  if len(first) != len(second):
    raise ValueError(f'first and second hold {len(first)} and {len(second)} responses; '
                     'expected the same number.')
  rows = []
  for y1, y2 in zip(first, second):
    if y1 == y2:
      continue
    p = 1.0 / (1.0 + np.exp(gold_reward(task, y2) - gold_reward(task, y1)))
    chosen, rejected = (y1, y2) if rng.random() < p else (y2, y1)
    rows.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
  return rows
