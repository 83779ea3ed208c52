"""`ppi_eval`: prediction-powered estimate of a mean label from an autorater-scored file.

  python -m launch.main --config=configs/ppi_eval.py --config.input=FILE.csv --workdir=DIR

The file (CSV, or JSONL with one object per line) has an autorater score on every row and a
human label on some rows (an empty or missing label means unlabelled), optionally a stratum
column. Prints the PPI++ estimate (StratPPI when `config.stratum_column` is set), its
interval, the classical interval from the labelled rows alone, and the effective sample
size `n (se_classical / se_ppi)^2` (how many labels the classical estimate would need for
the same precision); writes them to `DIR/ppi_eval.json`.
"""
import csv
import json
import math
import os

import jax
import numpy as np

from stats import ppi
from stats import stratified


def _read_rows(path):
  if not path:
    raise ValueError('config.input is required: a CSV or JSONL file of scores and labels.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.input={path!r}: no such file.')
  with open(path, newline='') as f:
    if path.endswith(('.jsonl', '.json')):
      rows = [json.loads(line) for line in f if line.strip()]
    else:
      rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f'config.input={path!r} has no rows.')
  return rows


def _column(rows, name, field, path, allow_missing=False):
  """Column `name` as floats (NaN for empty/missing when `allow_missing`)."""
  if not any(name in r for r in rows):
    raise ValueError(f'config.{field}={name!r}: no such column in {path!r}; columns are '
                     f'{sorted(rows[0])}.')
  out = []
  for i, r in enumerate(rows):
    x = r.get(name)
    if x is None or (isinstance(x, str) and not x.strip()):
      if not allow_missing:
        raise ValueError(f'{path!r} row {i + 1}: column {name!r} is empty.')
      out.append(math.nan)
    else:
      try:
        out.append(float(x))
      except ValueError as e:
        raise ValueError(f'{path!r} row {i + 1}: column {name!r} is not a number: {x!r}.') from e
  return np.asarray(out)


def ppi_eval(config, workdir):
  rows = _read_rows(config.input)
  score = _column(rows, config.score_column, 'score_column', config.input)
  label = _column(rows, config.label_column, 'label_column', config.input, allow_missing=True)
  labelled = ~np.isnan(label)
  Y, Yhat, Yhat_u = label[labelled], score[labelled], score[~labelled]
  with jax.enable_x64(True):
    if config.stratum_column:
      raw = [str(r.get(config.stratum_column, '')) for r in rows]
      if not any(config.stratum_column in r for r in rows):
        raise ValueError(f'config.stratum_column={config.stratum_column!r}: no such column in '
                         f'{config.input!r}.')
      names = sorted(set(raw))
      ids = np.asarray([names.index(s) for s in raw])
      args = (Y, Yhat, Yhat_u, ids[labelled], ids[~labelled], len(names))
      estimate = stratified.stratppi_mean_pointestimate(*args)
      lo, hi = stratified.stratppi_mean_ci(*args, alpha=config.alpha)
      lam = stratified.stratppi_lam(*args)
      method = 'StratPPI'
    else:
      estimate = ppi.ppi_mean_pointestimate(Y, Yhat, Yhat_u)
      lo, hi = ppi.ppi_mean_ci(Y, Yhat, Yhat_u, alpha=config.alpha)
      lam = ppi.ppi_mean_lam(Y, Yhat, Yhat_u)
      method = 'PPI++'
    c_lo, c_hi = ppi.classical_mean_ci(Y, alpha=config.alpha)
  n = int(labelled.sum())
  result = {
      'input': os.path.abspath(config.input), 'method': method, 'alpha': config.alpha,
      'n_labelled': n, 'n_unlabelled': int((~labelled).sum()),
      'estimate': float(estimate), 'ci': [float(lo), float(hi)],
      'classical_estimate': float(Y.mean()), 'classical_ci': [float(c_lo), float(c_hi)],
      'lambda': np.asarray(lam).tolist(),
      'effective_sample_size': n * float((c_hi - c_lo) / (hi - lo))**2,
  }
  level = f'{100 * (1 - config.alpha):g}%'
  print(f'{method} estimate {result["estimate"]:.4f}, {level} CI [{lo:.4f}, {hi:.4f}]\n'
        f'classical estimate {result["classical_estimate"]:.4f}, {level} CI '
        f'[{c_lo:.4f}, {c_hi:.4f}]\n'
        f'labelled n = {n}, unlabelled N = {result["n_unlabelled"]}, effective sample size '
        f'{result["effective_sample_size"]:.1f}')
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'ppi_eval.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result
