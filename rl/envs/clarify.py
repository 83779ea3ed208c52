"""Ambiguous questions with costed clarification: a miniature of "Steerable clarification
policies via self-play" (arXiv:2512.04068).

World (deterministic from ``config.seed``): ``num_names`` invented names, each shared by
k in {1, 2, 3} entities (k ~ ``k_probs``). The entities of a name differ by a sense word (an
occupation) and have a prior (integer percents summing to 100: ``(p, 100 - p)`` with p from
``priors2`` for k = 2, a triple from ``priors3`` for k = 3) and an answer (a city; distinct
within a name). An episode draws a name, a hidden intent ~ priors, and the costs alpha (per
clarifying question) and beta (per word of the final answer). Reward (the paper's cost-
penalised accuracy):

  R = acc - alpha * n_clarifications - beta * words(final answer).

Texts (lower-case words separated by single spaces; senses listed by decreasing prior):
  assistant's system turn  ``ask cost 0.25 word cost 0.035 . kim : baker 70 paris , pilot 30 rome``
                           (alpha with 2 decimals, beta with 3)
  user simulator's system  ``you are the user . you mean kim the pilot .``
  opening user turn        ``where does kim live ?``
  assistant actions        ``answer rome`` | ``enumerate baker paris ; pilot rome`` |
                           ``ask baker or pilot ?``
  user reply to a question ``pilot`` (the scripted user: the intent's sense word)

The system turns are private: ``view(episode, role)`` puts the role's own system turn before
the shared conversation, so the intent is only in the user's view. The first word of an
assistant turn is its action; words(text) counts the words after it, not ';'. ``answer``
takes exactly one word (acc: it is the intent's answer); ``enumerate`` takes one or more
'sense answer' pairs separated by ';' (acc: the intent's pair is among them); ``ask`` takes
one or more words and hands the turn to the user. Anything else (empty, unknown keyword,
malformed arguments, a question beyond ``max_clarifications``, a turn cut at the token limit)
is invalid: the episode ends with acc 0, reward -alpha * n_clarifications - beta * words(text).
Any user text is accepted; the next answer is still judged against the hidden intent.

Bayes-optimal first actions (canonical texts; one question resolves the intent):
  E[answer] = p_max - beta,  E[enumerate] = 1 - 2 k beta,  E[clarify] = 1 - alpha - beta.

Costs: split 'train' draws alpha and beta uniformly from the grids of multiples of
``alpha_step`` / ``beta_step`` inside ``alpha_range`` / ``beta_range``, without the held-out
values (or uses ``single_cost``, the single-cost baseline); split 'heldout' draws from
``heldout_alphas`` / ``heldout_betas``: values inside the ranges that training never shows.
By default they are grid values removed from training (interpolation between seen costs,
written with digits in the places training uses them: a held-out value off the grids, e.g.
alpha 0.05 against a 0.02 grid, would put a digit in a place training never fills, which
tests the tokenization more than the cost).
"""
import dataclasses
from typing import Optional

from ml_collections import config_dict
import numpy as np

from rl.envs import base

NAMES = ('kim', 'ravo', 'lumi', 'tesa', 'boru', 'nika', 'davo', 'pelo', 'suri', 'mako',
         'fenu', 'gali', 'hobi', 'jora', 'kelu', 'lira', 'moti', 'nuba', 'poli', 'rina',
         'sovo', 'tari', 'vemi', 'zula', 'bexa', 'dovi', 'fiko', 'gusa', 'halo', 'jinu',
         'koro', 'lexa')
SENSES = ('baker', 'pilot', 'nurse', 'judge', 'farmer', 'singer', 'doctor', 'writer',
          'painter', 'sailor', 'teacher', 'tailor')
ANSWERS = ('paris', 'rome', 'oslo', 'lima', 'cairo', 'tokyo', 'delhi', 'quito', 'dakar',
           'seoul', 'berlin', 'madrid')
ACTIONS = ('answer', 'enumerate', 'clarify')  # first-action labels (plus 'invalid')
_KEYWORD = {'answer': 'answer', 'enumerate': 'enumerate', 'clarify': 'ask'}
_ACTION = {keyword: action for action, keyword in _KEYWORD.items()}
BEHAVIOURS = ACTIONS + ('optimal',)
_MILLI = 1000  # costs are handled in integer thousandths


def default_config() -> config_dict.ConfigDict:
  """Env config (``make_env`` dispatches on ``name``)."""
  return config_dict.ConfigDict(dict(
      name='clarify',
      seed=0,  # the world: names, senses, priors, answers
      num_names=24,
      k_probs=(0.2, 0.4, 0.4),  # P(k = 1, 2, 3)
      priors2=(50, 60, 70, 80, 90),  # p_max percent for k = 2
      priors3=((40, 30, 30), (50, 30, 20), (60, 30, 10), (70, 20, 10), (80, 10, 10)),
      max_clarifications=2,
      # 'outcome': acc against the hidden intent; 'expected': without a question, acc
      # averaged over the intent under the priors (see ClarifyEnv._accuracy).
      reward='outcome',
      alpha_range=(0.0, 0.6),
      beta_range=(0.0, 0.1),
      # Training grids: multiples inside the ranges. Fine grids make the policy read the
      # costs as numbers: with 0.02 / 0.004 grids (one seed) ReST's policy matched costs it
      # had seen and barely clarified at unseen ones (docs/RESULTS.md).
      alpha_step=0.01,
      beta_step=0.001,
      # Never drawn in training (removed from the grids), spelled with the grids' digits.
      heldout_alphas=(0.04, 0.14, 0.24, 0.34, 0.44, 0.54),
      heldout_betas=(0.012, 0.028, 0.048, 0.068, 0.088),
      single_cost=config_dict.placeholder(tuple),  # (alpha, beta) for every train episode
  ))


@dataclasses.dataclass
class ClarifyEpisode(base.Episode):
  """Hidden state: the name's entities (by decreasing prior), the intent, the costs."""
  alpha: float = 0.0
  beta: float = 0.0
  name: str = ''
  senses: tuple = ()
  priors: tuple = ()  # integer percents
  answers: tuple = ()
  intent: int = 0
  n_clarifications: int = 0
  first_action: Optional[str] = None

  @property
  def k(self) -> int:
    return len(self.senses)


def _milli(value, field: str, decimals: int = 3) -> int:
  """``value`` in thousandths; ValueError unless it has at most ``decimals`` decimals."""
  scaled = float(value) * _MILLI
  unit = 10 ** (3 - decimals)
  if abs(scaled - round(scaled)) > 1e-6 or round(scaled) % unit:
    raise ValueError(f'{field}={value!r} must have at most {decimals} decimals.')
  return round(scaled)


def _cost_values(config, which: str, decimals: int):
  """(training grid, held-out values) in thousandths for 'alpha' or 'beta', validated."""
  lo, hi = (_milli(v, f'{which}_range', decimals) for v in config[f'{which}_range'])
  if not 0 <= lo <= hi:
    raise ValueError(f'{which}_range={tuple(config[f"{which}_range"])} needs 0 <= min <= max.')
  step = _milli(config[f'{which}_step'], f'{which}_step', decimals)
  if step <= 0:
    raise ValueError(f'{which}_step must be positive, got {config[f"{which}_step"]}.')
  grid = list(range(-(-lo // step) * step, hi + 1, step))
  if not grid:
    raise ValueError(f'{which}_range holds no multiple of {which}_step.')
  heldout = [_milli(v, f'heldout_{which}s', decimals) for v in config[f'heldout_{which}s']]
  if not heldout:
    raise ValueError(f'heldout_{which}s is empty.')
  for v in heldout:
    if not lo <= v <= hi:
      raise ValueError(f'heldout_{which}s value {v / _MILLI} is outside {which}_range.')
  grid = [v for v in grid if v not in heldout]
  if not grid:
    raise ValueError(f'heldout_{which}s leave no training value of {which}.')
  return grid, heldout


def _words(text: str) -> int:
  """Words after the action keyword, not counting ';'."""
  return sum(w != ';' for w in text.replace(';', ' ; ').split()[1:])


def _parse(text: str) -> Optional[tuple]:
  """(action, argument) of an assistant turn, or None when it does not parse."""
  words = text.split()
  if not words or words[0] not in _ACTION:
    return None
  action, rest = _ACTION[words[0]], ' '.join(words[1:])
  if action == 'answer':
    return (action, rest) if len(words) == 2 else None
  if action == 'clarify':
    return (action, rest) if rest else None
  pairs = [tuple(item.split()) for item in rest.split(';')]
  return (action, pairs) if all(len(pair) == 2 for pair in pairs) else None


class ClarifyEnv(base.Env):
  """Answer, enumerate or ask (see the module docstring)."""

  roles = ('system', 'user', 'assistant')

  def __init__(self, config: Optional[config_dict.ConfigDict] = None):
    config = default_config() if config is None else config
    if not 1 <= config.num_names <= len(NAMES):
      raise ValueError(f'num_names must be in [1, {len(NAMES)}], got {config.num_names}.')
    k_probs = np.asarray(config.k_probs, float)
    if k_probs.shape != (3,) or (k_probs < 0).any() or abs(k_probs.sum() - 1) > 1e-6:
      raise ValueError(f'k_probs must be 3 probabilities summing to 1, got {config.k_probs}.')
    if not config.priors2 or any(not 50 <= p <= 100 for p in config.priors2):
      raise ValueError(f'priors2 must be percents in [50, 100], got {config.priors2}.')
    if not config.priors3 or any(
        len(t) != 3 or sum(t) != 100 or min(t) < 0 or list(t) != sorted(t, reverse=True)
        for t in config.priors3):
      raise ValueError('priors3 must be decreasing percent triples summing to 100, '
                       f'got {config.priors3}.')
    if config.get('reward', 'outcome') not in ('outcome', 'expected'):
      raise ValueError(f"reward must be 'outcome' or 'expected', got {config.reward!r}.")
    if config.max_clarifications < 1:
      raise ValueError(f'max_clarifications must be >= 1, got {config.max_clarifications}.')
    self.config = config
    self._alpha_grid, self._heldout_alphas = _cost_values(config, 'alpha', 2)
    self._beta_grid, self._heldout_betas = _cost_values(config, 'beta', 3)
    self._single_cost = None
    if config.single_cost is not None:
      if len(config.single_cost) != 2:
        raise ValueError(f'single_cost must be (alpha, beta), got {config.single_cost}.')
      self._single_cost = (_milli(config.single_cost[0], 'single_cost alpha', 2),
                           _milli(config.single_cost[1], 'single_cost beta', 3))
    rng = np.random.default_rng(config.seed)
    self.world = {}  # name -> (senses, priors, answers)
    for name in NAMES[:config.num_names]:
      k = int(rng.choice(3, p=k_probs)) + 1
      if k == 1:
        priors = (100,)
      elif k == 2:
        p_max = int(config.priors2[rng.integers(len(config.priors2))])
        priors = (p_max, 100 - p_max)
      else:
        priors = tuple(int(p) for p in config.priors3[rng.integers(len(config.priors3))])
      self.world[name] = (tuple(rng.choice(SENSES, k, replace=False).tolist()), priors,
                          tuple(rng.choice(ANSWERS, k, replace=False).tolist()))

  @property
  def train_alphas(self) -> tuple:
    return tuple(v / _MILLI for v in self._alpha_grid)

  @property
  def train_betas(self) -> tuple:
    return tuple(v / _MILLI for v in self._beta_grid)

  @property
  def heldout_alphas(self) -> tuple:
    return tuple(v / _MILLI for v in self._heldout_alphas)

  @property
  def heldout_betas(self) -> tuple:
    return tuple(v / _MILLI for v in self._heldout_betas)

  def reset(self, rng: np.random.Generator, split: str = 'train', alpha=None, beta=None,
            name=None, intent=None) -> ClarifyEpisode:
    """A new episode; ``alpha``, ``beta``, ``name``, ``intent`` (an index into the name's
    entities) override the sampled values."""
    if split == 'train':
      alphas, betas = ((self._single_cost[0],), (self._single_cost[1],)) \
          if self._single_cost else (self._alpha_grid, self._beta_grid)
    elif split == 'heldout':
      alphas, betas = self._heldout_alphas, self._heldout_betas
    else:
      raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    alpha = alphas[rng.integers(len(alphas))] if alpha is None else _milli(alpha, 'alpha', 2)
    beta = betas[rng.integers(len(betas))] if beta is None else _milli(beta, 'beta', 3)
    if alpha < 0 or beta < 0:
      raise ValueError(f'alpha and beta must be >= 0, got {alpha / _MILLI}, {beta / _MILLI}.')
    if name is None:
      name = list(self.world)[rng.integers(len(self.world))]
    elif name not in self.world:
      raise ValueError(f'name {name!r} is not in the world ({", ".join(self.world)}).')
    senses, priors, answers = self.world[name]
    if intent is None:
      intent = int(rng.choice(len(priors), p=np.asarray(priors) / 100))
    elif not 0 <= intent < len(priors):
      raise ValueError(f'intent must be in [0, {len(priors)}) for {name!r}, got {intent}.')
    return ClarifyEpisode(turns=[base.Turn('user', f'where does {name} live ?')],
                          next_role='assistant', alpha=alpha / _MILLI, beta=beta / _MILLI,
                          name=name, senses=senses, priors=priors, answers=answers,
                          intent=intent)

  def system_prompt(self, episode: ClarifyEpisode, role: str) -> str:
    """The private system turn of ``role``."""
    if role == 'user':
      return f'you are the user . you mean {episode.name} the {episode.senses[episode.intent]} .'
    if role == 'assistant':
      entities = ' , '.join(f'{s} {p} {a}' for s, p, a in
                            zip(episode.senses, episode.priors, episode.answers))
      return (f'ask cost {episode.alpha:.2f} word cost {episode.beta:.3f} . '
              f'{episode.name} : {entities}')
    raise ValueError(f"role must be 'user' or 'assistant', got {role!r}.")

  def view(self, episode: ClarifyEpisode, role: str) -> list:
    return [base.Turn('system', self.system_prompt(episode, role))] + list(episode.turns)

  def step(self, episode: ClarifyEpisode) -> None:
    if episode.done:
      raise ValueError('step on a finished episode.')
    turn = episode.turns[-1]
    if turn.role != episode.next_role:
      raise ValueError(f'the last turn is by {turn.role!r}, expected {episode.next_role!r}.')
    if turn.role == 'user':
      episode.next_role = 'assistant'
      return
    parsed = _parse(turn.text) if turn.ended else None
    if parsed and parsed[0] == 'clarify' and (
        episode.n_clarifications >= self.config.max_clarifications):
      parsed = None
    action = parsed[0] if parsed else 'invalid'
    if episode.first_action is None:
      episode.first_action = action
    if action == 'clarify':
      episode.n_clarifications += 1
      episode.next_role = 'user'
      return
    acc = self._accuracy(episode, action, parsed)
    words = _words(turn.text)
    episode.reward = acc - episode.alpha * episode.n_clarifications - episode.beta * words
    episode.done, episode.next_role = True, None
    episode.info = dict(action=episode.first_action, final_action=action,
                        n_clarifications=episode.n_clarifications, words=words, acc=acc,
                        optimal=episode.first_action in optimal_actions(episode),
                        k=episode.k)

  def _accuracy(self, episode: ClarifyEpisode, action: str, parsed) -> float:
    """acc of a final action. With ``reward='expected'`` and no question asked, the
    accuracy is averaged over the intents the assistant cannot tell apart (the prior mass of
    the entities its text gets right): the same expectation as the outcome, less variance."""
    if action == 'invalid':
      return 0.0
    entities = list(zip(episode.senses, episode.answers))
    if action == 'answer':
      right = [i for i, (_, a) in enumerate(entities) if a == parsed[1]]
    else:
      right = [i for i, pair in enumerate(entities) if pair in parsed[1]]
    if self.config.get('reward') == 'expected' and episode.n_clarifications == 0:
      return sum(episode.priors[i] for i in right) / 100
    return float(episode.intent in right)

  def scripted(self, episode: ClarifyEpisode, role: str) -> str:
    """The user simulator: replies to a question with the intent's sense word."""
    if role != 'user':
      return super().scripted(episode, role)
    return episode.senses[episode.intent]

  def assistant_text(self, episode: ClarifyEpisode, behaviour: str) -> str:
    """The scripted assistant's next turn: canonical text for ``behaviour`` ('answer' guesses
    the most likely sense; 'clarify' asks, then answers the sense named in the reply;
    'optimal' takes the first Bayes-optimal action in ``ACTIONS`` order)."""
    if behaviour == 'optimal':
      behaviour = next(a for a in ACTIONS if a in optimal_actions(episode))
    if behaviour not in ACTIONS:
      raise ValueError(f'behaviour must be one of {BEHAVIOURS} or None, got {behaviour!r}.')
    if behaviour == 'enumerate':
      return 'enumerate ' + ' ; '.join(f'{s} {a}' for s, a in zip(episode.senses,
                                                                  episode.answers))
    if behaviour == 'clarify' and episode.n_clarifications == 0:
      return 'ask ' + ' or '.join(episode.senses) + ' ?'
    guess = 0  # senses are listed by decreasing prior
    if episode.n_clarifications:
      reply = episode.turns[-1].text.split()
      guess = next((i for i, s in enumerate(episode.senses) if s in reply), 0)
    return f'answer {episode.answers[guess]}'

  def demonstration(self, rng: np.random.Generator, split: str = 'train',
                    behaviour: Optional[str] = None, **overrides) -> ClarifyEpisode:
    """A finished episode whose every turn the env wrote (SFT data); ``behaviour`` in
    ``BEHAVIOURS``, None: uniform over ``ACTIONS``."""
    if behaviour is None:
      behaviour = ACTIONS[rng.integers(len(ACTIONS))]
    elif behaviour not in BEHAVIOURS:
      raise ValueError(f'behaviour must be one of {BEHAVIOURS} or None, got {behaviour!r}.')
    episode = self.reset(rng, split, **overrides)
    while not episode.done:
      role = episode.next_role
      text = (self.assistant_text(episode, behaviour) if role == 'assistant'
              else self.scripted(episode, role))
      episode.turns.append(base.Turn(role, text))
      self.step(episode)
    return episode

  def eval_settings(self) -> dict:
    """'heldout': every pair of held-out costs; 'seen': a coarse grid of training costs."""
    heldout = [dict(split='heldout', alpha=a, beta=b)
               for a in self.heldout_alphas for b in self.heldout_betas]
    alphas, betas = self.train_alphas, self.train_betas
    seen = [dict(split='train', alpha=a, beta=b)
            for a in alphas[::max(1, len(alphas) // 4)] for b in betas[::max(1, len(betas) // 3)]]
    return {'heldout': heldout, 'seen': seen}

  def summary(self, episodes: list) -> dict:
    """Means over finished episodes: reward, acc, first-action rates, agreement with the
    Bayes-optimal first action, clarifications and final-answer words."""
    if not episodes or not all(e.done for e in episodes):
      raise ValueError('summary needs a non-empty list of finished episodes.')
    mean = lambda f: float(np.mean([f(e) for e in episodes]))
    out = dict(reward=mean(lambda e: e.reward), acc=mean(lambda e: e.info['acc']))
    for action in ACTIONS + ('invalid',):
      out[f'rate/{action}'] = mean(lambda e, a=action: e.info['action'] == a)
    out.update(optimal_agreement=mean(lambda e: e.info['optimal']),
               n_clarifications=mean(lambda e: e.info['n_clarifications']),
               words=mean(lambda e: e.info['words']))
    return out


def expected_rewards(episode: ClarifyEpisode) -> dict:
  """Expected reward of each first action under the priors (module docstring)."""
  return dict(answer=max(episode.priors) / 100 - episode.beta,
              enumerate=1 - 2 * episode.k * episode.beta,
              clarify=1 - episode.alpha - episode.beta)


def optimal_actions(episode: ClarifyEpisode) -> set:
  """The Bayes-optimal first actions (all within 1e-9 of the best)."""
  values = expected_rewards(episode)
  best = max(values.values())
  return {a for a, v in values.items() if v >= best - 1e-9}


def fixed_action_value(episode: ClarifyEpisode, action: str) -> float:
  """Expected reward of always taking ``action`` first (analytic baselines)."""
  if action not in ACTIONS:
    raise ValueError(f'action must be one of {ACTIONS}, got {action!r}.')
  return expected_rewards(episode)[action]


def bayes_value(episode: ClarifyEpisode) -> float:
  """Expected reward of the Bayes-optimal policy."""
  return max(expected_rewards(episode).values())
