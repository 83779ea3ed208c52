"""Reproduction of collaborative self-play for tool use and selective prediction
(arXiv:2503.14481) in miniature, one command:

  python -m launch.main --config=configs/repro/collab.py --workdir=workdirs/repro_collab

SFT of the in-context baseline (memorised facts + format demonstrations; also ReST's start),
the action-supervised baseline (that policy fine-tuned on the facts + oracle demonstrations),
ReST on the society's rollouts for every seed, each seed's policy taken at the iteration whose
single agent earns the most on the held-out ``select_splits`` questions, then each policy
deployed alone with both tools (mode 'single') on the train, test and ood questions; writes
``results.md``, ``results.json`` and ``collab.png`` into the workdir. Each stage is its own
resumable workdir. Stage fields can be overridden, e.g.
``--config.stages.rest.rest.iterations=2``.
"""
from ml_collections import config_dict

from configs.rl import collab


def get_config():
  config = config_dict.ConfigDict()
  config.job = 'repro_collab'
  config.name = 'repro_collab'
  config.seeds = (0, 1, 2)  # ReST seeds (rollouts and fine-tuning); both SFTs use the first
  config.splits = ('train', 'test', 'ood')  # every question of each, greedy actions
  # ReST's iteration per seed: the highest mean reward of its single agent on these splits'
  # questions, which ReST never asks and the criteria do not judge (those of the SFT
  # demonstrations: 'demo' of the train relations, 'demo_ood' of the others, where
  # forgetting shows); (): the last
  config.select_splits = ('demo', 'demo_ood')
  config.stages = config_dict.ConfigDict(dict(
      sft=collab.get_config('sft'), oracle=collab.get_config('oracle'),
      rest=collab.get_config('rest')))
  return config
