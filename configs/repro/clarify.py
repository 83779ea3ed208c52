"""Reproduction of cost-steerable clarification (arXiv:2512.04068) in miniature, one command:

  python -m launch.main --config=configs/repro/clarify.py --workdir=workdirs/repro_clarify

SFT once, then for every seed ReST with costs sampled per episode (the steerable policy)
and ReST at a single cost (the baseline), all evaluated on held-out costs against the
fixed-action baselines and the Bayes-optimal policy; writes ``results.md``,
``results.json`` and ``clarify.png`` into the workdir. Each stage is its own resumable
workdir: rerunning the command continues where it stopped. Stage fields can be overridden,
e.g. ``--config.stages.rest.rest.iterations=2``.
"""
from ml_collections import config_dict

from configs.rl import clarify


def get_config():
  config = config_dict.ConfigDict()
  config.job = 'repro_clarify'
  config.name = 'repro_clarify'
  config.seeds = (0, 1, 2)  # ReST seeds (rollouts and fine-tuning); SFT uses the first
  config.baseline_instances = 400  # per held-out cost pair, for the analytic baselines
  config.stages = config_dict.ConfigDict(dict(
      sft=clarify.get_config('sft'), rest=clarify.get_config('rest'),
      single=clarify.get_config('single')))
  return config
