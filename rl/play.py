"""Playing an environment with a policy on a trainer's mesh: rollouts, evaluation, samples.

The policy's variables stay sharded as the trainer keeps them; prompts are placed on the
mesh's batch axes, and every generate call runs under the trainer's mesh and axis rules.
"""
import copy
import math

import jax
import numpy as np
from ml_collections import config_dict

from model import decode
from rl import episodes as ep
from training import sharding
from training import workdir as workdir_lib


def default_rollout_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      max_new_tokens=16,  # per turn
      max_turns=6,  # model turns per episode
      batch=512,  # episodes per rollout call
      self_play=True,  # the policy also plays the roles it is not trained on
      temperature=1.0, top_k=0, top_p=1.0, greedy=False))


class Player:
  """Rolls out ``env`` episodes with the policy of a ``Trainer``."""

  def __init__(self, env, trainer, formatter, rollout_cfg, trained_roles=('assistant',)):
    if jax.process_count() > 1:
      raise NotImplementedError('RL rollouts run in one process (any number of local '
                                'devices); multi-process rollouts are not built yet.')
    self.env, self.trainer, self.formatter = env, trainer, formatter
    self.cfg, self.trained_roles = rollout_cfg, tuple(trained_roles)
    unknown = [r for r in self.trained_roles if r not in env.speakers]
    if unknown:
      raise ValueError(f'trained roles {unknown} are not speaking roles of the environment '
                       f'{env.speakers}.')
    self.batch_multiple = math.prod(trainer.mesh.shape[a] for a in sharding.BATCH_AXES)

  def actors(self, variables, sampling=None):
    """The policy plays the trained roles, and in self-play every other model role."""
    actor = ep.Actor(self.trainer.model, variables, sampling or decode.SamplingConfig.from_config(self.cfg),
                     self.cfg.max_new_tokens)
    roles = [r for r in self.env.speakers if r in self.trained_roles or self.cfg.self_play]
    return {r: actor for r in roles}

  def play(self, episodes, variables, rng, sampling=None, desc='rollout'):
    """Plays ``episodes`` to the end in batches of ``rollout.batch``; returns them."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    actors = self.actors(variables, sampling)
    place = lambda x: sharding.shard_batch(x, self.trainer.mesh)
    with tqdm(total=len(episodes), desc=desc, unit='episode', dynamic_ncols=True,
              disable=jax.process_index() != 0) as progress:
      for start in range(0, len(episodes), self.cfg.batch):
        batch = episodes[start:start + self.cfg.batch]
        ep.rollout(self.env, batch, actors, self.formatter, jax.random.fold_in(rng, start),
                   self.cfg.max_turns, self.batch_multiple, place, self.trainer.context)
        progress.update(len(batch))
    return episodes

  def grow(self, np_rng, n_prompts, samples_per_prompt, variables, rng, split='train'):
    """ReST's Grow: ``samples_per_prompt`` episodes of each of ``n_prompts`` fresh prompts
    (copies of one reset episode); returns (episodes, prompt ids)."""
    prompts = [self.env.reset(np_rng, split) for _ in range(n_prompts)]
    episodes = [copy.deepcopy(p) for p in prompts for _ in range(samples_per_prompt)]
    groups = np.repeat(np.arange(n_prompts), samples_per_prompt)
    return self.play(episodes, variables, rng, desc='grow'), groups

  def evaluate(self, variables, settings, n_per_setting, seed, sampling):
    """Plays ``n_per_setting`` episodes per setting (``env.reset`` overrides, e.g. costs);
    returns a list of (setting, env summary) and all episodes."""
    np_rng = np.random.default_rng([seed, 7])
    episodes, owners = [], []
    for i, setting in enumerate(settings):
      split = setting.get('split', 'heldout')
      overrides = {k: v for k, v in setting.items() if k != 'split'}
      episodes += [self.env.reset(np_rng, split, **overrides) for _ in range(n_per_setting)]
      owners += [i] * n_per_setting
    self.play(episodes, variables, jax.random.PRNGKey(seed), sampling, desc='evaluate')
    owners = np.asarray(owners)
    per_setting = [(s, self.env.summary([e for e, o in zip(episodes, owners) if o == i]))
                   for i, s in enumerate(settings)]
    return per_setting, episodes


def write_samples(workdir, name, env, episodes, role, limit=8):
  """A few transcripts of ``role``'s view as text: ``samples/<name>.txt`` (process 0)."""
  lines = []
  for e in episodes[:limit]:
    lines.append(f'# reward {e.reward:.3f} {e.info}')
    lines += [f'{t.role}: {t.text}' for t in env.view(e, role)]
    lines.append('')
  directory = workdir_lib.path(workdir) / 'samples'
  if workdir_lib.is_primary():
    directory.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text(directory / f'{name}.txt', '\n'.join(lines))
