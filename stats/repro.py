"""Paper reproductions in miniature, run as `launch.main` jobs.

* `stratppi`: StratPPI §5.1 (arXiv:2406.04291; PAPERS.md §9) — mean 90% CI widths of
  StratPPI under proportional and optimal allocation against the paper's figures.
* `cost_optimal`: budget savings of the cost-optimal policies (arXiv:2506.07949; PAPERS.md
  §10) — total cost to reach a target CI width for classical, uniform PPI, the cost-optimal
  random policy and the active policy, on items of heterogeneous difficulty.

Each writes `<name>.md` (table), `<name>.json` and PNG plots into the workdir.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from stats import active
from stats import stratified
from stats.ppi import ppi_mean_ci

# PAPERS.md §9: the paper's mean widths (n = 100 / 200 / 1000); the n=1000 values are firm.
PAPER_WIDTHS = {
    ('homogeneous', 'proportional'): {100: 0.235, 200: 0.167, 1000: 0.077},
    ('different_variance', 'proportional'): {100: 0.235, 200: 0.167, 1000: 0.077},
    ('different_variance', 'optimal'): {100: 0.222, 200: 0.152, 1000: 0.068},
}


def _write(workdir, name, rows, columns, extra=None):
  os.makedirs(workdir, exist_ok=True)
  fmt = lambda x: f'{x:.4f}' if isinstance(x, float) else str(x)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r[c]) for c in columns) + ' |' for r in rows]
  with open(os.path.join(workdir, f'{name}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump({'rows': rows, **(extra or {})}, f, indent=1)
  print('\n'.join(lines))


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


# ------------------------------------------------------------------------------------------
# StratPPI §5.1: Y ~ N(0, 1), f = Y + mu_k + sigma_k eps, K = 2 equal strata, N = 10,000.
# ------------------------------------------------------------------------------------------


def _strat_trials(key, sigma, mu, n_k, N, n_trials, alpha):
  """Widths and coverage (theta = 0) of StratPPI, PPI++ and classical over vmapped trials."""
  K = len(sigma)
  strata = jnp.repeat(jnp.arange(K), jnp.asarray(n_k), total_repeat_length=sum(n_k))
  strata_u = jnp.repeat(jnp.arange(K), N // K, total_repeat_length=N // K * K)
  sig, m = jnp.asarray(sigma), jnp.asarray(mu)

  def one(key):
    ky, ke, kyu, keu = jax.random.split(key, 4)
    Y = jax.random.normal(ky, strata.shape)
    f = Y + m[strata] + sig[strata] * jax.random.normal(ke, strata.shape)
    fu = (jax.random.normal(kyu, strata_u.shape) + m[strata_u] +
          sig[strata_u] * jax.random.normal(keu, strata_u.shape))
    out = {}
    for name, (lo, hi) in [
        ('stratppi', stratified.stratppi_mean_ci(Y, f, fu, strata, strata_u, K, alpha)),
        ('ppi++', ppi_mean_ci(Y, f, fu, alpha)),
        ('classical', ppi_mean_ci(Y, f, fu, alpha, lam=0.0))]:
      out[name] = (hi - lo, (lo <= 0) & (0 <= hi))
    return out

  return jax.jit(jax.vmap(one))(jax.random.split(key, n_trials))


def stratppi(config, workdir):
  """Mean 90% CI widths of StratPPI (§5.1) at each n, scenario and allocation."""
  rows = []
  key = jax.random.key(config.seed)
  for scenario, sc in config.scenarios.items():
    sigma = np.asarray(sc.sigma, float)
    # Population residual sd with the optimal lambda_k = 1 / (1 + sigma_k^2).
    sd = sigma / np.sqrt(1 + sigma**2)
    weights = np.full(len(sigma), 1 / len(sigma))
    for allocation in config.allocations:
      if scenario == 'homogeneous' and allocation == 'optimal':
        continue  # identical to proportional when the strata are alike
      for n in config.n_values:
        n_k = (stratified.allocate_proportional(n, weights) if allocation == 'proportional'
               else stratified.allocate_optimal(n, weights, sd))
        key, sub = jax.random.split(key)
        res = _strat_trials(sub, tuple(sigma), tuple(sc.mu), tuple(int(x) for x in n_k),
                            config.N, config.n_trials, config.alpha)
        paper = PAPER_WIDTHS.get((scenario, allocation), {}).get(n)
        rows.append({
            'scenario': scenario, 'allocation': allocation, 'n': int(n),
            'n_k': '/'.join(str(int(x)) for x in n_k),
            'width_stratppi': float(res['stratppi'][0].mean()),
            'paper_width': paper if paper is not None else '-',
            'coverage_stratppi': float(res['stratppi'][1].mean()),
            'width_ppi++': float(res['ppi++'][0].mean()),
            'width_classical': float(res['classical'][0].mean()),
        })
  columns = ['scenario', 'allocation', 'n', 'n_k', 'width_stratppi', 'paper_width',
             'coverage_stratppi', 'width_ppi++', 'width_classical']
  _write(workdir, 'stratppi', rows, columns,
         {'config': {'N': config.N, 'n_trials': config.n_trials, 'alpha': config.alpha,
                     'seed': config.seed}})
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(config.scenarios), figsize=(5 * len(config.scenarios), 4))
  for ax, scenario in zip(np.atleast_1d(axes), config.scenarios):
    sel = [r for r in rows if r['scenario'] == scenario]
    for allocation in config.allocations:
      pts = [r for r in sel if r['allocation'] == allocation]
      if pts:
        ax.plot([r['n'] for r in pts], [r['width_stratppi'] for r in pts], 'o-',
                label=f'StratPPI ({allocation})')
        paper = PAPER_WIDTHS.get((scenario, allocation), {})
        ax.plot(list(paper), list(paper.values()), 'x', ms=9, label=f'paper ({allocation})')
    pts = [r for r in sel if r['allocation'] == sel[0]['allocation']]
    ax.plot([r['n'] for r in pts], [r['width_ppi++'] for r in pts], 's--', label='PPI++')
    ax.plot([r['n'] for r in pts], [r['width_classical'] for r in pts], 'k:', label='classical')
    ax.set(xscale='log', yscale='log', xlabel='labelled n', ylabel='mean 90% CI width',
           title=scenario)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'stratppi_widths.png'), dpi=120)
  plt.close(fig)
  return rows


# ------------------------------------------------------------------------------------------
# Cost-optimal weak/strong allocation: items with difficulty p ~ Beta(a, a), strong label
# H ~ Bernoulli(p), calibrated weak rating G = p, so U = sqrt(G (1 - G)).
# ------------------------------------------------------------------------------------------


def _policies(G, H_burn, G_burn, c_g, c_h, uniform_rate, num_bins):
  """Per-item rate functions (of G) for every method, from a population sample G.

  Returns {method: (rate_fn, per-item cost, per-item Var(Delta))} with the true U = sqrt(G (1-G))
  for the variance, and the burn-in estimate of U and Var(H) for the burn-in active policy.
  """
  U = active.binary_uncertainty(G)
  var_h = float(jnp.mean(G) * (1 - jnp.mean(G)))
  mse = float(jnp.mean(U**2))
  bins = lambda g: jnp.clip((g * num_bins).astype(jnp.int32), 0, num_bins - 1)
  U_hat = active.estimate_uncertainty(H_burn, G_burn, bins(G_burn), bins(G), num_bins)
  var_h_hat = float(jnp.var(H_burn, ddof=1))
  rates = {
      'classical': None,
      'uniform PPI': lambda g: jnp.full_like(g, uniform_rate),
      'random π*': lambda g: jnp.full_like(g, active.random_policy_rate(var_h, mse, c_g, c_h)),
  }
  for name, u_pop, u_fn, vh in [
      ('active (model U)', U, active.binary_uncertainty, var_h),
      ('active (burn-in U)', U_hat,
       lambda g: active.estimate_uncertainty(H_burn, G_burn, bins(G_burn), bins(g), num_bins),
       var_h_hat)]:
    _, tau, gamma = active.active_policy(u_pop, vh, c_g, c_h)
    rates[name] = (lambda u_fn, tau, gamma:
                   lambda g: jnp.where(u_fn(g) <= tau, gamma * u_fn(g), 1.0))(u_fn, tau, gamma)
  out = {}
  for name, rate in rates.items():
    if rate is None:
      out[name] = (None, c_h, var_h)
    else:
      cost, var_delta = active.policy_cost_and_variance(rate(G), U, var_h, c_g, c_h)
      out[name] = (rate, float(cost), float(var_delta))
  return out


def _simulate(key, rate, pool, T, n_trials, alpha, c_g, c_h):
  """Monte-Carlo check at T items drawn from the population `pool` of difficulties: mean
  width, coverage of E[H] = mean(pool), mean realised cost and mean estimate."""
  truth = jnp.mean(pool)

  def one(key):
    kp, kh, kx = jax.random.split(key, 3)
    p = pool[jax.random.randint(kp, (T,), 0, pool.shape[0])]
    H = (jax.random.uniform(kh, (T,)) < p).astype(p.dtype)
    if rate is None:
      est, (lo, hi) = active.cost_optimal_mean_ci(H, H, jnp.ones(T, bool), jnp.ones(T), alpha)
      cost = c_h * T
    else:
      pi = rate(p)
      xi = active.sample_labels(kx, pi)
      est, (lo, hi) = active.cost_optimal_mean_ci(H, p, xi, pi, alpha)
      cost = active.realised_cost(xi, c_g, c_h)
    return hi - lo, (lo <= truth) & (truth <= hi), cost, est

  w, cov, cost, est = jax.jit(jax.vmap(one))(jax.random.split(key, n_trials))
  return float(w.mean()), float(cov.mean()), float(cost.mean()), float(est.mean())


def cost_optimal(config, workdir):
  """Total cost to reach a target CI width, per method, and Monte-Carlo checks."""
  key = jax.random.key(config.seed)
  z2 = float(2 * ndtri(1 - config.alpha / 2))**2
  c_g, c_h = config.c_g, config.c_h
  rows, curves = [], {}
  for a in config.difficulty_a:
    key, kp, kb, kh = jax.random.split(key, 4)
    G = jax.random.beta(kp, a, a, (config.population,))
    G_burn = jax.random.beta(kb, a, a, (config.burn_in,))
    H_burn = (jax.random.uniform(kh, (config.burn_in,)) < G_burn).astype(G_burn.dtype)
    burn_cost = config.burn_in * (c_g + c_h)
    pols = _policies(G, H_burn, G_burn, c_g, c_h, config.uniform_rate, config.num_bins)
    curves[a] = {}
    for name, (rate, cost_item, var_delta) in pols.items():
      extra = burn_cost if 'burn-in' in name else 0.0
      total = lambda width: z2 * var_delta / width**2 * cost_item + extra
      curves[a][name] = [total(w) for w in config.target_widths]
      row = {'a': float(a), 'method': name, 'cost_per_item': cost_item,
             'var_per_item': var_delta,
             'cost_at_width': total(config.check_width)}
      T = int(np.ceil(z2 * var_delta / config.check_width**2))
      key, sub = jax.random.split(key)
      width, coverage, cost, est = _simulate(sub, rate, G, T, config.n_mc, config.alpha, c_g,
                                             c_h)
      row.update({'T_items': T, 'mc_width': width, 'mc_coverage': coverage,
                  'mc_cost': cost + extra, 'mc_mean_estimate': est})
      rows.append(row)
  # Savings are relative to classical at the same width (costs scale as 1/width^2).
  for r in rows:
    classical = next(c for c in rows if c['a'] == r['a'] and c['method'] == 'classical')
    r['saving_vs_classical'] = 1 - r['cost_at_width'] / classical['cost_at_width']
  columns = ['a', 'method', 'cost_per_item', 'var_per_item', 'cost_at_width',
             'saving_vs_classical', 'T_items', 'mc_width', 'mc_coverage', 'mc_cost',
             'mc_mean_estimate']
  _write(workdir, 'cost_optimal', rows, columns,
         {'config': {k: config[k] for k in ('c_g', 'c_h', 'alpha', 'check_width', 'burn_in',
                                            'uniform_rate', 'population', 'n_mc', 'seed')},
          'curves': {str(a): c for a, c in curves.items()},
          'target_widths': list(config.target_widths)})
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  a0 = config.difficulty_a[0]
  colors = {name: f'C{i}' for i, name in enumerate(curves[a0])}
  for name, costs in curves[a0].items():
    axes[0].plot(config.target_widths, costs, 'o-', color=colors[name], label=name)
  axes[0].set(xscale='log', yscale='log', xlabel='target 90% CI width',
              ylabel='total cost (strong label = 1)', title=f'difficulty ~ Beta({a0}, {a0})')
  axes[0].legend(fontsize=7)
  for name in curves[a0]:
    if name != 'classical':
      axes[1].plot(config.difficulty_a,
                   [100 * next(r['saving_vs_classical'] for r in rows
                               if r['a'] == a and r['method'] == name)
                    for a in config.difficulty_a], 'o-', color=colors[name], label=name)
  axes[1].set(xscale='log', xlabel='Beta(a, a) parameter (small a: more heterogeneous)',
              ylabel='saving vs classical (%)', title=f'width {config.check_width}')
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'cost_optimal_savings.png'), dpi=120)
  plt.close(fig)
  return rows
