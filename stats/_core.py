"""Shared pieces of the PPI family: z intervals, z p-values and PPI++ power tuning."""
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from stats import _validation as v


def z_interval(estimate, se, alpha, alternative='two-sided'):
  """Normal interval `(lower, upper)` at level 1 - alpha.

  One-sided intervals follow statsmodels: 'larger' gives `(lower, inf)` (the alternative
  that the parameter is larger than a null), 'smaller' gives `(-inf, upper)`. A traced
  alpha outside (0, 1) gives NaN endpoints (`stats._validation`).
  """
  ok = v.check_alpha(alpha)
  v.check_alternative(alternative)
  if alternative == 'two-sided':
    half = ndtri(1 - alpha / 2) * se
    bounds = estimate - half, estimate + half
  else:
    inf = jnp.full_like(estimate, jnp.inf)
    half = ndtri(1 - alpha) * se
    bounds = (estimate - half, inf) if alternative == 'larger' else (-inf, estimate + half)
  return v.nan_unless(ok, bounds)


def z_pvalue(estimate, se, null=0.0, alternative='two-sided'):
  """p-value of the z statistic `(estimate - null) / se`."""
  v.check_alternative(alternative)
  z = (estimate - null) / se
  if alternative == 'two-sided':
    return 2 * ndtr(-jnp.abs(z))
  return ndtr(-z) if alternative == 'larger' else ndtr(z)


def column_var(x, ddof=0):
  """Per-column variance of a 2-D array."""
  return jnp.var(x, axis=0, ddof=ddof)


def cov_matrix(x, ddof=1):
  """Covariance matrix of the columns of `x` (rows are observations), like `np.cov(x.T)`."""
  xc = x - x.mean(0)
  return xc.T @ xc / (x.shape[0] - ddof)


def power_tuning_lam(grads, grads_hat, grads_hat_unlabeled, inv_hessian, coord=None,
                     clip=True, optim_mode='overall'):
  """PPI++ power-tuning parameter (Angelopoulos, Duchi & Zrnic 2023, Eq. (7)/Prop. 2).

  `lam = tr(H^-1 [Cov(g, g_hat) + Cov(g_hat, g)] H^-1) / (2 (1 + n/N) tr(H^-1 Var(g_hat) H^-1))`,
  with the cross-covariance over the n labelled rows (ddof 0) and `Var(g_hat)` over the
  labelled and unlabelled predictions pooled (ddof 1), as in ppi_py. `coord` restricts the
  trace to one coordinate; `optim_mode='element'` returns one lambda per coordinate.
  A zero denominator (constant predictions) gives lam = 0, where every lam is equivalent.
  """
  if optim_mode not in ('overall', 'element'):
    raise ValueError(f"lam_optim_mode must be 'overall' or 'element', got {optim_mode!r}.")
  if optim_mode == 'element' and coord is not None:
    raise ValueError("coord selects one coordinate; it cannot be combined with "
                     "lam_optim_mode='element'.")
  n, N = grads.shape[0], grads_hat_unlabeled.shape[0]
  gc = grads - grads.mean(0)
  hc = grads_hat - grads_hat.mean(0)
  cross = (gc.T @ hc + hc.T @ gc) / n
  var_hat = cov_matrix(jnp.concatenate([grads_hat, grads_hat_unlabeled]), ddof=1)
  vh = inv_hessian if coord is None else inv_hessian[coord:coord + 1]
  num, den = vh @ cross @ vh.T, vh @ var_hat @ vh.T
  if optim_mode == 'overall':
    num, den = jnp.trace(num), jnp.trace(den)
  else:
    num, den = jnp.diag(num), jnp.diag(den)
  den = 2 * (1 + n / N) * den
  lam = jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))
  return jnp.clip(lam, 0.0, 1.0) if clip else lam
