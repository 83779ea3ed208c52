"""The environment interface every RL loop runs: multi-turn conversations between roles.

An environment is host-side Python (the policy runs on the accelerator, the environment
parses text and keeps score). One ``Episode`` per conversation:

  episode = env.reset(rng, split)              # opening turns, and who acts first
  while not episode.done:
    role = episode.next_role
    view = env.view(episode, role)             # the turns that role sees, own prompt first
    text = <role's model continues view>  or  env.scripted(episode, role)
    episode.turns.append(Turn(role, text, ...))
    env.step(episode)                          # parses the turn, sets next_role / done / reward

Roles that a model plays and roles that the environment scripts are chosen by the caller
(``rl.episodes``); an environment that can script a role implements ``scripted`` for it.
A role's view may hold private turns (e.g. the user simulator's hidden intent), which is why
views are per role: a transcript is always one role's view.
"""
import abc
import dataclasses
from typing import Any, Optional

import numpy as np


@dataclasses.dataclass
class Turn:
  """One turn. ``ids`` and ``logprobs`` are set when a model generated it: the exact token
  ids (without the end-of-turn token) and their behaviour log-probs (with the end-of-turn
  token's last, when it was generated)."""
  role: str
  text: str
  ids: Optional[list] = None
  logprobs: Optional[list] = None
  ended: bool = True  # False: generation hit its token limit before end-of-turn


@dataclasses.dataclass
class Episode:
  """One conversation. Environments subclass it to hold their hidden state."""
  turns: list = dataclasses.field(default_factory=list)  # the shared conversation
  next_role: Optional[str] = None
  done: bool = False
  reward: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)


class Env(abc.ABC):
  """A batch-agnostic multi-turn environment (see the module docstring)."""

  roles: tuple  # every role that can speak, e.g. ('system', 'user', 'assistant')
  markup: tuple = ()  # tags inside a turn that are one reserved token each (rl.episodes)
  scripted_roles: tuple = ()  # roles the environment always plays itself (e.g. a tool)

  @property
  def speakers(self) -> tuple:
    """The roles a model may play, each with its own view ('system' only opens views; the
    ``scripted_roles`` are the environment's)."""
    return tuple(r for r in self.roles if r != 'system' and r not in self.scripted_roles)

  @abc.abstractmethod
  def reset(self, rng: np.random.Generator, split: str = 'train', **overrides) -> Episode:
    """A new episode with its opening turns and ``next_role``; ``overrides`` fix sampled
    quantities (e.g. costs) for evaluation."""

  @abc.abstractmethod
  def step(self, episode: Episode) -> None:
    """Reads the last turn of ``episode.turns`` and advances: sets ``next_role``, or
    ``done``, ``reward`` and ``info``. A turn it cannot parse is an invalid action with
    the reward the environment defines, never an exception."""

  def view(self, episode: Episode, role: str) -> list:
    """The turns ``role`` sees, in order (default: the shared conversation)."""
    del role
    return list(episode.turns)

  def scripted(self, episode: Episode, role: str) -> str:
    """The environment's own speaker for ``role`` (e.g. a user simulator)."""
    raise NotImplementedError(f'{type(self).__name__} has no scripted {role!r}.')

  def summary(self, episodes: list) -> dict[str, Any]:
    """Environment-specific metrics over finished episodes (default: none)."""
    del episodes
    return {}

  def pretraining_texts(self) -> list:
    """Plain texts the policy learns before acting (``rl_sft``'s pretraining share; default:
    none)."""
    return []

  def whole_words(self) -> tuple:
    """Strings the tokenizer must encode as one piece each (``rl_sft`` adds them to
    ``tokenizer.whole_words``; default: none)."""
    return ()

  def relabel(self, episode: Episode, rng: np.random.Generator) -> Optional[Episode]:
    """The finished episode as ReST trains on it (default: itself), or None when it must not
    be trained on. An environment may rewrite what the policy must not learn from its own
    rollouts, e.g. a retrieved fact replaced by a counterfactual one, so that training
    teaches reading, not the fact."""
    del rng
    return episode

  def pretraining_episodes(self) -> list:
    """Finished conversations the policy learns before acting, every model turn trained
    (``rl_sft``'s pretraining share, with ``pretraining_texts``; default: none)."""
    return []

  def eval_settings(self) -> dict:
    """Named evaluation sets: ``{name: [reset overrides, with an optional 'split']}``."""
    return {'train': [{'split': 'train'}]}
