"""The planted-subsequence toy of "Rewarding progress" (arXiv:2410.08146, App. B), one command:

  python -m launch.main --config=configs/repro/pav_toy.py --workdir=workdirs/repro_pav_toy

Outcome-only REINFORCE against the effective reward Q^pi + alpha A^mu for provers mu_gamma,
over several seeds (``rl/repro_pav_toy.py``); writes ``results.md``, ``results.json``,
``pav_toy.png`` and ``pav_toy_final.png`` into the workdir. Finished variants are kept in
``runs/`` and skipped by a rerun with the same fields.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'repro_pav_toy'
  config.name = 'repro_pav_toy'
  # Task: responses of `length` tokens over `vocab_size`; reward 1 iff the planted y* of
  # `target_len` distinct tokens (drawn with `task_seed`) occurs contiguously.
  config.vocab_size = 15
  config.length = 10
  config.target_len = 5
  config.task_seed = 0
  # Policy (MLP on one-hot position and automaton state) and REINFORCE.
  config.hidden = 64
  config.optimizer = 'adam'
  config.learning_rate = 3e-3
  config.batch = 64  # sampled responses per step
  config.steps = 2000
  config.alpha = 1.0  # weight of the prover advantage in the effective reward
  config.gammas = (1, 2, 4, 8, 12, 15, 30, 100)
  config.seeds = (0, 1, 2)
  config.thresholds = (0.5, 0.9)  # success rates whose sample counts are reported
  return config
