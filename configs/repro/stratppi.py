"""StratPPI §5.1 widths in miniature (arXiv:2406.04291; PAPERS.md §9).

  python -m launch.main --config=configs/repro/stratppi.py --workdir=workdirs/repro_stratppi
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'repro_stratppi'
  config.seed = 0
  config.n_values = (100, 200, 1000)
  config.N = 10_000
  config.n_trials = 1000
  config.alpha = 0.1
  config.allocations = ('proportional', 'optimal')
  # f = Y + mu_k + sigma_k eps in K = 2 strata of equal size.
  config.scenarios = ml_collections.ConfigDict({
      'homogeneous': {'mu': (0.0, 0.0), 'sigma': (1.0, 1.0)},
      'different_variance': {'mu': (0.0, 0.0), 'sigma': (0.25, 4.0)},
  })
  return config
