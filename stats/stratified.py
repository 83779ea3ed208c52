"""Stratified prediction-powered inference, StratPPI (Fisch et al., arXiv:2406.04291).

PPI++ within each of K strata, combined with stratum weights `w_k = N_k / N` (the share of
the unlabelled population in stratum k, unless `stratum_weights` are given) (PAPERS.md §9):

  theta = sum_k w_k [ mean_k(Y) + lam_k (mean_k(f_unlabelled) - mean_k(f_labelled)) ]
  Var   = sum_k w_k^2 [ Var_k(Y - lam_k f) / n_k + lam_k^2 Var_k(f_unlabelled) / N_k ]
  lam_k = Cov_k(Y, f) / ((1 + n_k / N_k) Var_k(f))          (clipped to [0, 1])

Conventions follow ppi_py's mean, so one stratum reproduces `ppi_mean_ci` exactly: the
covariance and both variances in Var use ddof=0, and Var_k(f) in lam_k pools the labelled
and unlabelled predictions (ddof=1). `lam=1` is stratified PPI, `lam=0` the stratified
classical estimator. Strata are integer ids in [0, num_strata); `num_strata` is static
under jit. Validation follows `stats._validation`: a stratum id out of range, a stratum with
fewer than two labelled or unlabelled rows, NaN/inf data, a non-finite `lam`, negative
`stratum_weights` or alpha outside (0, 1) raise a ValueError when concrete; when traced
(inside jit/vmap) every output is NaN instead.

Allocation of a labelling budget across strata (§4 of the paper): proportional
(`n_k ∝ w_k`), optimal (Neyman on the residual, `n_k ∝ w_k sd_k(Y - lam_k f)`), or a
heuristic from the autorater's confidence when no labels exist yet, then rounded to
integers that sum to the budget (largest remainder, at least two per stratum when possible).
Allocation is planning done before labelling, so it is plain NumPy.
"""
import jax.numpy as jnp
import numpy as np

from stats import _validation as v
from stats._core import z_interval


def _inputs(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata, lam=None):
  """Validated arrays, one-hot strata `(Y, Yhat, Yhat_unlabeled, onehot, onehot_u)` and the
  flag of the value checks."""
  Y, Yhat = v.as_float(Y, 'Y', (1,)), v.as_float(Yhat, 'Yhat', (1,))
  Yhat_unlabeled = v.as_float(Yhat_unlabeled, 'Yhat_unlabeled', (1,))
  strata, strata_unlabeled = jnp.asarray(strata), jnp.asarray(strata_unlabeled)
  v.check_same_shape('Y', Y, 'Yhat', Yhat)
  v.check_same_shape('Y', Y, 'strata', strata)
  v.check_same_shape('Yhat_unlabeled', Yhat_unlabeled, 'strata_unlabeled', strata_unlabeled)
  ok = v.check_finite(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_unlabeled) & v.check_lam(lam)
  if num_strata is None:
    if not v.is_concrete(strata, strata_unlabeled):
      raise ValueError('num_strata must be given (statically) inside jit/vmap.')
    num_strata = int(max(strata.max(), strata_unlabeled.max())) + 1
  onehot = (strata[:, None] == jnp.arange(num_strata)).astype(Y.dtype)
  onehot_u = (strata_unlabeled[:, None] == jnp.arange(num_strata)).astype(Y.dtype)
  for name, oh in [('strata', onehot), ('strata_unlabeled', onehot_u)]:
    ok &= v.require(oh.sum(1) == 1, f'{name} must hold integer ids in [0, {num_strata}).')
    counts = oh.sum(0)
    ok &= v.require(counts >= 2, lambda: f'{name}: strata '
                    f'{np.flatnonzero(np.asarray(counts) < 2).tolist()} have fewer than 2 rows.')
  return (Y, Yhat, Yhat_unlabeled, onehot, onehot_u), ok


def _moments(x, onehot):
  """Per-stratum count, mean and (ddof=0) variance of `x`, plus the centring function."""
  n_k = onehot.sum(0)
  mean = (onehot.T @ x) / n_k
  centred = lambda z, m: z - onehot @ m
  return n_k, mean, centred


def _fit(Y, Yhat, Yhat_unlabeled, onehot, onehot_u, lam, stratum_weights):
  n_k, ybar, cy = _moments(Y, onehot)
  _, fbar, cf = _moments(Yhat, onehot)
  N_k, fbar_u, cfu = _moments(Yhat_unlabeled, onehot_u)
  var_u = onehot_u.T @ cfu(Yhat_unlabeled, fbar_u)**2 / N_k
  if lam is None:
    cov = onehot.T @ (cy(Y, ybar) * cf(Yhat, fbar)) / n_k
    pooled = (onehot.T @ Yhat + onehot_u.T @ Yhat_unlabeled) / (n_k + N_k)
    var_pooled = (onehot.T @ (Yhat - onehot @ pooled)**2 +
                  onehot_u.T @ (Yhat_unlabeled - onehot_u @ pooled)**2) / (n_k + N_k - 1)
    den = (1 + n_k / N_k) * var_pooled
    lam = jnp.clip(jnp.where(den == 0, 0.0, cov / jnp.where(den == 0, 1.0, den)), 0.0, 1.0)
  lam = jnp.broadcast_to(jnp.asarray(lam, Y.dtype), n_k.shape)
  resid = Y - (onehot @ lam) * Yhat
  _, rbar, cr = _moments(resid, onehot)
  var_r = onehot.T @ cr(resid, rbar)**2 / n_k
  w = N_k / N_k.sum() if stratum_weights is None else stratum_weights
  estimate = jnp.sum(w * (ybar + lam * (fbar_u - fbar)))
  se = jnp.sqrt(jnp.sum(w**2 * (var_r / n_k + lam**2 * var_u / N_k)))
  return estimate, se, lam, jnp.sqrt(var_r)


def _stratum_weights(stratum_weights, num_strata):
  """Given stratum weights normalised to sum to 1 (None stays None), and their flag."""
  if stratum_weights is None:
    return None, True
  w, ok = v.weights(stratum_weights, num_strata, 'stratum_weights')
  return w / num_strata, ok


def stratppi_mean_pointestimate(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled,
                                num_strata=None, lam=None, stratum_weights=None):
  """StratPPI point estimate of the mean of Y (module docstring; NaN if a traced value is
  bad)."""
  data, ok = _inputs(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata, lam)
  stratum_weights, ok_w = _stratum_weights(stratum_weights, data[3].shape[1])
  return v.nan_unless(ok & ok_w, _fit(*data, lam, stratum_weights)[0])


def stratppi_mean_ci(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata=None,
                     alpha=0.1, alternative='two-sided', lam=None, stratum_weights=None):
  """StratPPI (1 - alpha) z interval `(lower, upper)` for the mean of Y.

  `lam=None` tunes lambda per stratum; a scalar or a (K,) array fixes it. Bad values raise
  when concrete; traced ones give NaN endpoints (module docstring).
  """
  data, ok = _inputs(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata, lam)
  stratum_weights, ok_w = _stratum_weights(stratum_weights, data[3].shape[1])
  estimate, se, _, _ = _fit(*data, lam, stratum_weights)
  return v.nan_unless(ok & ok_w, z_interval(estimate, v.positive_se(se), alpha, alternative))


def stratppi_lam(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata=None):
  """Per-stratum power-tuning parameters lam_k, shape (K,); NaN if a traced input is bad."""
  data, ok = _inputs(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata)
  return v.nan_unless(ok, _fit(*data, None, None)[2])


def residual_sd(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata=None,
                lam=None):
  """Per-stratum sd_k(Y - lam_k f) from a labelled pilot: the input of `allocate_optimal`
  (NaN if a traced input is bad)."""
  data, ok = _inputs(Y, Yhat, Yhat_unlabeled, strata, strata_unlabeled, num_strata, lam)
  return v.nan_unless(ok, _fit(*data, lam, None)[3])


# ------------------------------------------------------------------------------------------
# Allocation of a labelling budget.
# ------------------------------------------------------------------------------------------


def round_allocation(budget, shares, min_per_stratum=2):
  """Integer labels per stratum summing to `budget`, proportional to `shares`.

  Strata whose share falls below `min_per_stratum` are raised to it and the rest of the
  budget is re-split among the others (repeated until stable); the fractional parts then go
  by largest remainder (ties to the lower index). When `budget < min_per_stratum * K`, the
  minimum becomes `budget // K`.
  """
  shares = np.asarray(shares, float)
  if shares.ndim != 1 or np.any(~np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
    raise ValueError(f'shares must be finite, non-negative and not all zero, got {shares}.')
  budget = int(budget)
  if budget < 0:
    raise ValueError(f'budget must be non-negative, got {budget}.')
  k = shares.size
  floor = min(min_per_stratum, budget // k)
  fixed = np.zeros(k, bool)
  while True:
    free = ~fixed
    target = np.zeros(k)
    if shares[free].sum() > 0:
      target[free] = (budget - floor * fixed.sum()) * shares[free] / shares[free].sum()
    newly = free & (target < floor)
    if not newly.any():
      break
    fixed |= newly
  alloc = np.where(fixed, floor, np.floor(target)).astype(int)
  remainder = np.where(fixed, -1.0, target - np.floor(target))
  order = np.argsort(-remainder, kind='stable')
  alloc[order[:budget - alloc.sum()]] += 1
  return alloc


def allocate_proportional(budget, stratum_weights, min_per_stratum=2):
  """Proportional allocation, `n_k ∝ w_k`."""
  return round_allocation(budget, stratum_weights, min_per_stratum)


def allocate_optimal(budget, stratum_weights, residual_sds, min_per_stratum=2):
  """Optimal (Neyman) allocation on the residual, `n_k ∝ w_k sd_k(Y - lam_k f)`
  (minimises the StratPPI variance for a fixed budget when N_k >> n_k)."""
  shares = np.asarray(stratum_weights, float) * np.asarray(residual_sds, float)
  return round_allocation(budget, shares, min_per_stratum)


def allocate_heuristic(budget, Yhat_unlabeled, strata_unlabeled, num_strata,
                       min_per_stratum=2):
  """Allocation before any label exists, from the autorater's confidence.

  [reconstructed] For a binary label and a calibrated score p = P(Y = 1 | x) in [0, 1],
  E[(Y - p)^2 | x] = p (1 - p), so sd_k ≈ sqrt(mean_k p (1 - p)); the budget is then split
  as in `allocate_optimal` with w_k = N_k / N.
  """
  p = np.asarray(Yhat_unlabeled, float)
  s = np.asarray(strata_unlabeled)
  if p.shape != s.shape or np.any((p < 0) | (p > 1)):
    raise ValueError('Yhat_unlabeled must be confidences in [0, 1], one per strata_unlabeled.')
  counts = np.bincount(s, minlength=num_strata)[:num_strata]
  if np.any(counts == 0):
    raise ValueError('every stratum needs at least one unlabelled row.')
  sd = np.sqrt(np.bincount(s, p * (1 - p), minlength=num_strata)[:num_strata] / counts)
  return allocate_optimal(budget, counts / counts.sum(), sd, min_per_stratum)
