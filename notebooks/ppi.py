# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Prediction-powered inference for autorater evaluations
#
# Estimate the mean human label of an evaluation set from autorater scores on every row and
# human labels on a few (`stats/`): the classical interval from the labels alone, PPI
# (Angelopoulos et al. 2023), PPI++ (power-tuned lambda, Angelopoulos et al. 2024) and
# StratPPI (per-stratum lambda, Fisch et al. 2024), then the cost-optimal number of labels
# and autorater scores for a target interval width (`stats/power.py`). Any runtime works.

# %% [markdown]
# ## Setup
# `REPO_URL` is the repository to install from (replace the placeholder with your fork's URL,
# see the README's "Notebooks" section). Inside a checkout the installed package is used.

# %%
REPO_URL = 'https://github.com/OWNER/REPO'

import importlib.util
import subprocess
import sys

if importlib.util.find_spec('launch') is None:  # not inside a checkout: install the package
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'git+{REPO_URL}'], check=True)

# %% tags=["parameters"]
SIZE = 'colab'  # 'colab': a fine sweep of target widths; 'tiny': a coarse one
CSV_PATH = ''  # your own CSV; empty: the shipped example (tests/data/ppi_example.csv)
SCORE_COLUMN = 'score'  # autorater score, on every row
LABEL_COLUMN = 'label'  # human label; empty = unlabelled
STRATUM_COLUMN = 'stratum'  # for StratPPI; '' to skip it
ALPHA = 0.1  # intervals at 1 - ALPHA coverage
TARGET_WIDTH = 0.1  # interval width to plan the labelling budget for
COST_LABEL, COST_SCORE = 1.0, 0.01  # cost of one human label and of one autorater score

# %%
import math

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats as sps

from launch import notebook
from stats import power, ppi, stratified

SIZE = notebook.size(SIZE)
print(jax.devices())  # any runtime: these are small NumPy-sized computations

# %% [markdown]
# ## Data
# One row per item: the autorater's score and, on some rows, a human label.

# %%
path = notebook.require_file(
    CSV_PATH or notebook.repo_file('tests/data/ppi_example.csv', REPO_URL), 'CSV_PATH')
frame = pd.read_csv(path)
notebook.require_columns([SCORE_COLUMN, LABEL_COLUMN, STRATUM_COLUMN], frame.columns, path)
labelled = frame[LABEL_COLUMN].notna().to_numpy()
Y = frame.loc[labelled, LABEL_COLUMN].to_numpy(float)
Yhat = frame.loc[labelled, SCORE_COLUMN].to_numpy(float)
Yhat_u = frame.loc[~labelled, SCORE_COLUMN].to_numpy(float)
print(f'{path}: {labelled.sum()} labelled rows, {(~labelled).sum()} unlabelled rows')
frame.head()

# %% [markdown]
# ## Intervals
# PPI is lambda = 1 (rectify the autorater's mean by its mean error on the labelled rows);
# PPI++ tunes lambda to minimise the variance; StratPPI tunes one lambda per stratum.

# %%
with jax.enable_x64(True):
  intervals = {
      'classical': ppi.classical_mean_ci(Y, alpha=ALPHA),
      'PPI': ppi.ppi_mean_ci(Y, Yhat, Yhat_u, alpha=ALPHA, lam=1.0),
      'PPI++': ppi.ppi_mean_ci(Y, Yhat, Yhat_u, alpha=ALPHA),
  }
  if STRATUM_COLUMN:
    names, ids = np.unique(frame[STRATUM_COLUMN].astype(str), return_inverse=True)
    intervals['StratPPI'] = stratified.stratppi_mean_ci(
        Y, Yhat, Yhat_u, ids[labelled], ids[~labelled], len(names), alpha=ALPHA)
table = pd.DataFrame([(k, float(lo), float(hi), float(hi - lo)) for k, (lo, hi) in
                      intervals.items()], columns=['method', 'lower', 'upper', 'width'])
table

# %%
fig, ax = plt.subplots(figsize=(7, 0.6 * len(table) + 1))
mid = (table['lower'] + table['upper']) / 2
ax.errorbar(mid, range(len(table)), xerr=table['width'] / 2, fmt='o', capsize=4)
ax.set_yticks(range(len(table)), table['method'])
ax.invert_yaxis()
ax.axvline(Y.mean(), color='gray', linestyle=':', label='mean of the labels')
ax.set(xlabel=f'mean label, {100 * (1 - ALPHA):g}% interval', title='Forest plot')
ax.legend()
plt.show()

# %% [markdown]
# ## Labelling budget for a target width
# A classical interval of width `TARGET_WIDTH` needs `n0 = (2 z sd(Y) / width)^2` labels;
# `power.ppi_mean_power` finds the cheapest (n labels, N extra autorater scores) with the
# same precision, from the correlation between labels and scores on the labelled rows.

# %%
z = sps.norm.ppf(1 - ALPHA / 2)


def plan(width):
  n0 = math.ceil((2 * z * Y.std() / width)**2)
  with jax.enable_x64(True):
    best = power.ppi_mean_power(Y, Yhat, COST_LABEL, COST_SCORE, effective_n=n0)
  return {'target width': width, 'classical labels': n0, 'classical cost': n0 * COST_LABEL,
          'PPI labels n': best['n'], 'PPI scores n + N': best['n'] + best['N'],
          'PPI cost': best['cost']}


print(plan(TARGET_WIDTH))
widths = np.linspace(TARGET_WIDTH / 2, 2 * TARGET_WIDTH, 40 if SIZE == 'colab' else 5)
sweep = pd.DataFrame([plan(w) for w in widths])
plt.plot(sweep['target width'], sweep['classical cost'], label='classical (labels only)')
plt.plot(sweep['target width'], sweep['PPI cost'], label='PPI, cost-optimal (n, N)')
plt.axvline(TARGET_WIDTH, color='gray', linestyle=':')
plt.yscale('log')
plt.xlabel('target interval width')
plt.ylabel('cost')
plt.legend()
plt.show()
