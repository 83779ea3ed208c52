"""Plantain: interleaved plan-first reasoning against think-then-answer (arXiv:2512.03176,
PAPERS.md §5), one command:

  python -m launch.main --config=configs/repro/plantain.py --workdir=workdirs/repro_plantain

SFT of both formats on the environment's demonstrations, PPO with the format-gated reward
per seed, then TTFR and pass@1 on held-out problems, best-of-N plans and rewind-and-repeat
(``rl/repro_plantain.py``); writes ``results.md``, ``results.json``, ``plantain.png`` and
``plantain_ppo.png`` into the workdir. Every stage is a resumable workdir.
"""
from ml_collections import config_dict

from configs.rl import plantain


def get_config():
  config = config_dict.ConfigDict()
  config.job = 'repro_plantain'
  config.name = 'repro_plantain'
  config.seeds = (0, 1, 2)  # PPO seeds (rollouts, minibatch order); SFT uses seeds[0]
  config.test_problems = 256  # held-out, the same for every policy
  config.inference = config_dict.ConfigDict(dict(
      problems=256, temperatures=(1.0, 2.0), best_of=(4,), max_rewinds=3, plan_tokens=24,
      max_new_tokens=88, batch=256))
  stages = {}
  for fmt, suffix in (('interleaved', ''), ('think', '_think')):
    for kind in ('sft', 'ppo'):
      stage = plantain.get_config(kind + suffix)
      stage.rest.eval_sets = ()  # the job evaluates every policy itself
      stages[f'{kind}_{fmt}'] = stage
  config.stages = config_dict.ConfigDict(stages)
  return config
