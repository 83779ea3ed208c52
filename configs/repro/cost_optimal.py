"""Budget savings of cost-optimal weak/strong rater allocation (arXiv:2506.07949; PAPERS.md §10).

  python -m launch.main --config=configs/repro/cost_optimal.py --workdir=workdirs/repro_cost_optimal
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'repro_cost_optimal'
  config.seed = 0
  config.c_g = 0.05          # weak (autorater) rating cost; a strong label costs c_h
  config.c_h = 1.0
  config.alpha = 0.1
  config.difficulty_a = (0.2, 0.5, 1.0, 3.0)   # item difficulty p ~ Beta(a, a)
  config.population = 200_000                  # items used for the policies' expectations
  config.burn_in = 300                         # strong labels spent to estimate U
  config.num_bins = 10                         # bins of G for the burn-in estimate of U
  config.uniform_rate = 0.1                    # standard PPI: label 10% of items (N = 9 n)
  config.target_widths = (0.01, 0.02, 0.04, 0.08)
  config.check_width = 0.02                    # Monte-Carlo check at this width
  config.n_mc = 1000
  return config
