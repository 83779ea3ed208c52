"""Preference hacking and pessimism (PRPO, P3O; arXiv:2503.06810) in miniature, one command:

  python -m launch.main --config=configs/repro/pessimism.py --workdir=workdirs/repro_pessimism

or one method at a time (same workdir: μ, the dataset and the proxy are shared and cached)
with ``configs/repro/pessimism.py:<method>``, method in ``rl.repro_pessimism.METHODS``
(reinforce, dpo, ipo, prpo, prpo_logz, p3o; ``prpo`` and ``p3o`` include their η sweep).
The whole pipeline runs once per stage seed (``stage_seeds``: μ, D, the proxy and the
pairwise model) in ``<workdir>/stage<seed>``, each writing ``results.md``, ``results.json``,
``pessimism.png``, ``pessimism_<method>.png`` and ``pessimism_eta.png``; finished stages and
runs are kept and skipped by a rerun whose own fields are unchanged. The workdir gets the
per-stage-seed table and the summary across stage seeds (``results.md``, ``results.json``,
``pessimism_stage_seeds.png``). One stage seed with two policy seeds (the first
reproduction's layout): ``--config.stage_seeds='(0,)' --config.seeds='(0,1)'``.
"""
from ml_collections import config_dict

from configs import base
from rl import repro_pessimism


def get_config(method='all'):
  if method != 'all' and method not in repro_pessimism.METHODS:
    raise ValueError(f'configs/repro/pessimism.py:{method}: expected all or one of '
                     f'{repro_pessimism.METHODS}.')
  config = config_dict.ConfigDict()
  config.job = 'repro_pessimism'
  config.name = 'repro_pessimism'
  config.methods = repro_pessimism.METHODS if method == 'all' else (method,)
  # Each stage seed draws its own μ, D, proxy and pairwise model; the spread across them is
  # the spread the summary reports, so one policy seed per stage seed by default.
  config.stage_seeds = (0, 1, 2)
  config.seeds = (0,)  # policy runs, for every stage seed
  config.task = dict(max_good_len=8, penalty=2.0, mu_max_len=6, mu_tail=0.35, max_len=16)
  config.model = base.model_config(vocab_size=259, embed_dim=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2, mlp_dim=192)
  config.sft = dict(steps=400, batch=64, learning_rate=3e-3)
  config.data = dict(pairs=400, heldout_fraction=0.2)
  config.reward_model = dict(steps=300, batch=64, learning_rate=1e-3)
  config.policy = dict(steps=200, batch=64, learning_rate=3e-4, eval_every=10, eval_batch=128,
                       kl_estimator='k2')
  config.kl_coeffs = (0.01, 0.1, 1.0)  # REINFORCE against the proxy
  config.dpo_beta = 0.1
  config.pessimistic_kl_coeffs = (0.01, 0.1, 1.0)  # PRPO / P3O
  # η of the runs above: the adversary minimises (policy term) + (1/η)·(NLL on D), so a
  # large η frees it from the data (more pessimism) and η -> 0 leaves the MLE fit (none).
  config.eta = 1.0
  # η sweep, PRPO and P3O at η in {0.01, 10}: weaker and stronger pessimism than η = 1
  # (above), at the lowest KL coefficient, on the first stage seed only (all_stage_seeds=True:
  # on every one). Cut for time (docs/RESULTS.md) from the grid etas=(0.01, 0.1, 10.0, 100.0),
  # kl_coeffs=(0.01, 0.1), which is reachable by override.
  config.eta_sweep = dict(etas=(0.01, 10.0), kl_coeffs=(0.01,), methods=('prpo', 'p3o'),
                          all_stage_seeds=False)
  config.adversary = dict(learning_rate=1e-3, steps_per_policy_step=1, K=64, pool=1024)
  # P3O's P(y ≻ y′): 'pair' reads [y ; EOS ; y′] jointly, logit = g(y, y′) − g(y′, y), fit on
  # D; 'difference' is σ(f(y) − f(y′)) with f the proxy. The policy's reward for y is the
  # mean of P(y ≻ y′) over ``comparisons`` responses y′ of D.
  config.preference_model = dict(kind='pair', steps=300, batch=64, learning_rate=1e-3,
                                 comparisons=1)
  return config
