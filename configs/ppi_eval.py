"""Prediction-powered estimate of a mean human label from autorater scores (stats.jobs).

  python -m launch.main --config=configs/ppi_eval.py --config.input=tests/data/ppi_example.csv \
      --config.stratum_column=stratum --workdir=workdirs/ppi_eval
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'ppi_eval'
  config.input = ''               # CSV or JSONL file
  config.score_column = 'score'   # autorater score, on every row
  config.label_column = 'label'   # human label; empty or missing = unlabelled
  config.stratum_column = ''      # optional: StratPPI over this column's values
  config.alpha = 0.1
  return config
