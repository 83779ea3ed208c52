"""PAV beam search against ORM best-of-N on multi-step arithmetic ("Rewarding progress",
arXiv:2410.08146, Sec. 4), one command:

  python -m launch.main --config=configs/repro/pav_search.py --workdir=workdirs/repro_pav_search

SFT policy -> first-pit Monte Carlo labels -> process verifier (PAV, Best-of-K prover) and
outcome verifier (ORM) -> accuracy against sampled tokens on held-out problems
(``rl/repro_pav_search.py``); writes ``results.md``, ``results.json`` and
``pav_search.png`` into the workdir. Every stage is a resumable workdir.
"""
from ml_collections import config_dict

from configs.rl import arith


def get_config():
  config = config_dict.ConfigDict()
  config.job = 'repro_pav_search'
  config.name = 'repro_pav_search'
  config.seed = 0  # SFT, labelled problems and verifier training
  config.search_seeds = (0, 1)  # sampling in the searches
  config.test_problems = 128
  config.max_n = 64  # ORM best-of-N for N = 1, 2, 4, ..., max_n
  config.widths = (1, 2, 4, 8, 16)  # PAV beam widths
  config.prover_k = 4
  config.alpha = 0.5
  config.expansions = 3  # next steps sampled per beam element
  config.max_steps = 10
  config.sweep_width = 4
  config.sweep_ks = (1, 2, 4, 8, 32)
  config.stages = config_dict.ConfigDict(dict(
      sft=arith.get_config('sft'), pav=arith.get_config('pav'), orm=arith.get_config('orm')))
  return config
