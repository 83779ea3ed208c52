"""Power analysis for PPI: the cheapest (n, N) for a target precision, or the most precise
pair for a budget (Broska, Howes & van Loon 2024, "The mixed subjects design"; ppi_py's
`ppi_power`). With `rho` the PPI correlation, a PPI estimate from n labels and N extra
unlabelled rows matches a classical estimate from `n (n + N) / (n + (1 - rho^2) N)` labels
(its effective sample size).

These are planning functions with integer rounding and branching on scalars, so they are
plain Python/NumPy (not jit-traced); `ppi_mean_power` gets rho from data with JAX arrays.
"""
import math
import warnings

import jax.numpy as jnp

from stats import _validation as v


def _pair(n, N, rho, cost_X, cost_Y, cost_Yhat):
  return {'n': n, 'N': N,
          'cost': n * cost_Y + (n + N) * (cost_Yhat + cost_X),
          'effective_n': round(n * (n + N) / (n + (1 - rho**2) * N)) if n + N else 0,
          'ppi_corr': rho}


def _classical(n, rho, cost_X, cost_Y):
  return {'n': n, 'N': 0, 'cost': n * (cost_Y + cost_X), 'effective_n': n, 'ppi_corr': rho}


def _optimal_pair(n0, rho, gamma, cost_X, cost_Y, cost_Yhat):
  """The cost-minimising (n, N) matching a classical estimate from n0 labels."""
  r2 = rho**2
  n = n0 * (1 - r2 + math.sqrt(gamma * r2 * (1 - r2)))
  N = n * (n0 - n) / (n - (1 - r2) * n0) if rho != 0 else 0
  return _pair(round(n), round(N), rho, cost_X, cost_Y, cost_Yhat)


def ppi_power(ppi_corr, cost_X, cost_Y, cost_Yhat, budget=None, effective_n=None,
              n_max=None):
  """Optimal labelled/unlabelled sample sizes for PPI with PPI correlation `ppi_corr`.

  With a `budget`, returns the most powerful pair it buys; otherwise the cheapest pair with
  the given `effective_n`. `n_max` caps n + N. Returns a dict with `n`, `N`, `cost`,
  `effective_n` and `ppi_corr`. When PPI is not cheaper than the classical design
  (cost per effective label), the classical design (N = 0) is returned.
  """
  if budget is None and effective_n is None:
    raise ValueError('At least one of `budget` and `effective_n` must be provided.')
  rho = float(ppi_corr)
  if not -1 < rho < 1:
    raise ValueError(f'ppi_corr must lie strictly between -1 and 1, got {rho}.')
  r2 = rho**2
  gamma = (cost_Yhat + cost_X) / cost_Y
  ppi_cost = cost_Y * (1 - r2 + gamma * r2 + 2 * math.sqrt(gamma * r2 * (1 - r2)))
  classical_cost = cost_Y + cost_X
  n0 = budget / ppi_cost if budget is not None else effective_n
  result = _optimal_pair(n0, rho, gamma, cost_X, cost_Y, cost_Yhat)
  if classical_cost < ppi_cost or result['N'] < 0:
    result = _classical(round(budget / classical_cost if budget is not None else n0), rho,
                        cost_X, cost_Y)
  if n_max is None or result['n'] + result['N'] <= n_max:
    return result
  if budget is not None:
    if n_max * classical_cost <= budget:
      return _classical(n_max, rho, cost_X, cost_Y)
    n = round(budget / cost_Y - n_max * gamma)
  else:
    if effective_n > n_max:
      warnings.warn('effective_n exceeds n_max; returning n = n_max, N = 0.', UserWarning)
      return _classical(n_max, rho, cost_X, cost_Y)
    n = round(n0 * n_max * (1 - r2) / (n_max - r2 * n0))
  return _pair(n, n_max - n, rho, cost_X, cost_Y, cost_Yhat)


def ppi_mean_power(Y, Yhat, cost_Y, cost_Yhat, budget=None, effective_n=None, n_max=None,
                   w=None):
  """`ppi_power` for a mean, with the PPI correlation estimated from a labelled pilot
  `(Y, Yhat)`: `rho = Cov(Y, Yhat) / sqrt(Var Y Var Yhat)` (weighted), capped at 1 - 1/n."""
  Y, Yhat = v.as_float(Y, 'Y', (1,)), v.as_float(Yhat, 'Yhat', (1,))
  v.check_same_shape('Y', Y, 'Yhat', Yhat)
  v.check_rows(Y=Y)
  v.check_finite(Y=Y, Yhat=Yhat)
  n = Y.shape[0]
  w, _ = v.weights(w, n, 'w')  # concrete inputs: a bad value has raised
  g, gh = w * (Y - jnp.sum(w * Y) / n), w * (Yhat - jnp.sum(w * Y) / n)
  g, gh = g - g.mean(), gh - gh.mean()
  rho = float(jnp.minimum(jnp.mean(g * gh) / jnp.sqrt(jnp.mean(g**2) * jnp.mean(gh**2)),
                          1 - 1 / n))
  return ppi_power(rho, 0, cost_Y, cost_Yhat, budget=budget, effective_n=effective_n,
                   n_max=n_max)
