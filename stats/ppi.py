"""Prediction-powered inference for means and quantiles, in pure JAX.

A flat functional API with the names and signatures of `ppi_py` (Angelopoulos et al.,
"Prediction-powered inference", Science 2023; "PPI++", arXiv:2311.01453): every function
takes arrays and returns arrays, so `jax.jit` and `jax.vmap` apply directly (pass `alpha`,
`alternative`, `lam_optim_mode`, `exact_grid` and `coord` as static arguments under jit).
A confidence interval is a tuple `(lower, upper)`; a 1-D input gives scalars, an `(n, d)`
input gives `(d,)` arrays (ppi_py returns shape `(1,)` for 1-D inputs).

Notation: `Y` gold labels (n,), `Yhat` predictions on the labelled rows (n,),
`Yhat_unlabeled` predictions on N unlabelled rows; `lam` is the PPI++ power-tuning
parameter (`lam=1` is plain PPI, `lam=0` the classical estimator, `None` estimates the
variance-optimal value, clipped to [0, 1]); `w`, `w_unlabeled` are sample weights,
normalised to sum to n and N. Standard errors use ddof=0 and intervals are z intervals,
as in ppi_py. Input validation follows the policy in `stats._validation`: a bad value
(NaN/inf data, `alpha` or `q` outside (0, 1), a non-finite `lam`, negative weights, zero
variance) raises a ValueError naming the argument when it is concrete; when it is traced
(inside jit/vmap) the function cannot raise and flags it instead by returning NaN for every
output (both interval endpoints, the estimate, the p-value).

Deliberate differences from ppi_py 0.2.3 (each is tested):
* `ppi_mean_ci(..., lam=None, alternative='larger'|'smaller')` is one-sided; ppi_py drops
  `alternative` after tuning lambda and returns the two-sided interval.
* `ppi_mean_pval(..., lam=None)` clips the tuned lambda to [0, 1], like the interval, so the
  p-value and the interval agree; ppi_py leaves it unclipped there.
* `coord` is honoured for the mean (ppi_py ignores it): lambda minimises that coordinate's
  variance.
* Quantiles accept `lam` (PPI++ power tuning for quantiles, which ppi_py lacks); the default
  `lam=None` tunes it. `lam=1` reproduces ppi_py.
* `ppboot` draws from an explicit `key` and returns `(lower, inf)` for
  `alternative='larger'` (ppi_py returns `(-inf, max of the bootstrap draws)`).
"""
import functools

import jax
import jax.numpy as jnp

from stats import _core
from stats import _validation as v
from stats._core import z_interval, z_pvalue

# ------------------------------------------------------------------------------------------
# Mean (PPI++ Eq. (4): theta = mean(lam * Yhat_unlabeled) + mean(Y - lam * Yhat)).
# ------------------------------------------------------------------------------------------


def _mean_inputs(Y, Yhat, Yhat_unlabeled, w, w_unlabeled):
  """Validated 2-D float arrays, weight columns, whether the input was 1-D, and the flag of
  the value checks (`stats._validation`)."""
  Y, Yhat = v.as_float(Y, 'Y'), v.as_float(Yhat, 'Yhat')
  Yhat_unlabeled = v.as_float(Yhat_unlabeled, 'Yhat_unlabeled')
  v.check_same_shape('Y', Y, 'Yhat', Yhat)
  if Yhat_unlabeled.shape[1:] != Y.shape[1:]:
    raise ValueError(f'Yhat_unlabeled must have shape (N,) + {Y.shape[1:]}, got '
                     f'{Yhat_unlabeled.shape}.')
  v.check_rows(Y=Y, Yhat_unlabeled=Yhat_unlabeled)
  ok = v.check_finite(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_unlabeled)
  squeeze = Y.ndim == 1
  as2d = lambda x: x[:, None] if x.ndim == 1 else x
  w, ok_w = v.weights(w, Y.shape[0], 'w')
  w_unlabeled, ok_wu = v.weights(w_unlabeled, Yhat_unlabeled.shape[0], 'w_unlabeled')
  return (as2d(Y), as2d(Yhat), as2d(Yhat_unlabeled), w[:, None], w_unlabeled[:, None], squeeze,
          ok & ok_w & ok_wu)


def _mean_estimate(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, lam):
  return (w_unlabeled * lam * Yhat_unlabeled).mean(0) + (w * (Y - lam * Yhat)).mean(0)


def _mean_lam(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, coord, clip, optim_mode):
  """PPI++ lambda for the mean: gradients `w (Y - theta)` at the lam=1 estimate, H = I."""
  theta = _mean_estimate(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, 1.0)
  return _core.power_tuning_lam(w * (Y - theta), w * (Yhat - theta),
                                w_unlabeled * (Yhat_unlabeled - theta),
                                jnp.eye(Y.shape[1], dtype=Y.dtype), coord=coord, clip=clip,
                                optim_mode=optim_mode)


def _mean_fit(Y, Yhat, Yhat_unlabeled, lam, coord, w, w_unlabeled, lam_optim_mode):
  """Point estimate and standard error (PPI++ Eq. (5)), the squeeze flag and the flag of
  the value checks."""
  Y, Yhat, Yhat_unlabeled, w, w_unlabeled, squeeze, ok = _mean_inputs(
      Y, Yhat, Yhat_unlabeled, w, w_unlabeled)
  ok &= v.check_lam(lam)
  if lam is None:
    lam = _mean_lam(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, coord, True, lam_optim_mode)
  n, N = Y.shape[0], Yhat_unlabeled.shape[0]
  estimate = _mean_estimate(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, lam)
  se = jnp.sqrt(_core.column_var(w_unlabeled * lam * Yhat_unlabeled) / N +
                _core.column_var(w * (Y - lam * Yhat)) / n)
  return estimate, se, squeeze, ok


def _out(x, squeeze, ok):
  """`x` (an array or tuple of arrays) as returned: scalars for 1-D input, NaN if flagged."""
  return v.nan_unless(ok, jax.tree_util.tree_map(lambda a: a[0] if squeeze else a, x))


def ppi_mean_lam(Y, Yhat, Yhat_unlabeled, coord=None, w=None, w_unlabeled=None,
                 lam_optim_mode='overall', clip=True):
  """The variance-optimal PPI++ lambda for the mean (scalar, or per coordinate).

  `lam = Cov(Y, Yhat) / ((1 + n/N) Var(Yhat_all))` in 1-D (PAPERS.md §9); `clip` restricts it
  to [0, 1]. `lam_optim_mode='element'` tunes each coordinate separately. NaN if a traced
  input is bad (module docstring).
  """
  Y, Yhat, Yhat_unlabeled, w, w_unlabeled, _, ok = _mean_inputs(Y, Yhat, Yhat_unlabeled, w,
                                                                w_unlabeled)
  return v.nan_unless(ok, _mean_lam(Y, Yhat, Yhat_unlabeled, w, w_unlabeled, coord, clip,
                                    lam_optim_mode))


def ppi_mean_pointestimate(Y, Yhat, Yhat_unlabeled, lam=None, coord=None, w=None,
                           w_unlabeled=None, lam_optim_mode='overall'):
  """Prediction-powered point estimate of the mean of Y (NaN if a traced input is bad)."""
  estimate, _, squeeze, ok = _mean_fit(Y, Yhat, Yhat_unlabeled, lam, coord, w, w_unlabeled,
                                       lam_optim_mode)
  return _out(estimate, squeeze, ok)


def ppi_mean_ci(Y, Yhat, Yhat_unlabeled, alpha=0.1, alternative='two-sided', lam=None,
                coord=None, w=None, w_unlabeled=None, lam_optim_mode='overall'):
  """Prediction-powered (1 - alpha) confidence interval `(lower, upper)` for the mean.

  Bad values raise a ValueError when concrete; traced ones give NaN endpoints (module
  docstring)."""
  estimate, se, squeeze, ok = _mean_fit(Y, Yhat, Yhat_unlabeled, lam, coord, w, w_unlabeled,
                                        lam_optim_mode)
  return _out(z_interval(estimate, v.positive_se(se), alpha, alternative), squeeze, ok)


def ppi_mean_pval(Y, Yhat, Yhat_unlabeled, null=0, alternative='two-sided', lam=None,
                  coord=None, w=None, w_unlabeled=None, lam_optim_mode='overall'):
  """Prediction-powered p-value for H0: mean = null (z test); NaN if a traced input is bad."""
  estimate, se, squeeze, ok = _mean_fit(Y, Yhat, Yhat_unlabeled, lam, coord, w, w_unlabeled,
                                        lam_optim_mode)
  return _out(z_pvalue(estimate, v.positive_se(se), null, alternative), squeeze, ok)


def classical_mean_ci(Y, w=None, alpha=0.1, alternative='two-sided'):
  """Classical CLT interval for the mean from the labels alone (ddof=0 standard error).

  Bad values raise when concrete; traced ones give NaN endpoints (module docstring)."""
  Y = v.as_float(Y, 'Y')
  v.check_rows(Y=Y)
  ok = v.check_finite(Y=Y)
  w, ok_w = v.weights(w, Y.shape[0], 'w')
  wy = w.reshape((-1,) + (1,) * (Y.ndim - 1)) * Y
  se = v.positive_se(jnp.std(wy, axis=0) / jnp.sqrt(Y.shape[0]))
  return v.nan_unless(ok & ok_w, z_interval(wy.mean(0), se, alpha, alternative))


# ------------------------------------------------------------------------------------------
# Quantiles: invert the rectified CDF (PPI, Science 2023, Alg. 3), with PPI++ tuning.
# ------------------------------------------------------------------------------------------


def _cdf_sums(x, wx, grid):
  """`(sum_i wx_i 1{x_i <= t}, sum_i wx_i^2 1{x_i <= t})` for every t in grid, in O(n log n)."""
  order = jnp.argsort(x)
  zero = jnp.zeros((1,), wx.dtype)
  s1 = jnp.concatenate([zero, jnp.cumsum(wx[order])])
  s2 = jnp.concatenate([zero, jnp.cumsum(wx[order]**2)])
  idx = jnp.searchsorted(x[order], grid, side='right')
  return s1[idx], s2[idx]


def _rectified_cdf(Y, Yhat, unl_cdf, unl_var, w, grid, lam):
  """Rectified CDF `lam F_unl + F_Y - lam F_Yhat` and its variance on `grid`.

  `unl_cdf`/`unl_var` are the unlabelled CDF and the variance of its estimate; the
  rectifier's variance uses 1{Y<=t} 1{Yhat<=t} = 1{max(Y, Yhat) <= t}.
  """
  n = Y.shape[0]
  fy, sy = _cdf_sums(Y, w, grid)
  fh, sh = _cdf_sums(Yhat, w, grid)
  _, sm = _cdf_sums(jnp.maximum(Y, Yhat), w, grid)
  rect = (fy - lam * fh) / n
  rect_var = jnp.maximum((sy + lam**2 * sh - 2 * lam * sm) / n - rect**2, 0.0) / n
  return lam * unl_cdf + rect, lam**2 * unl_var + rect_var


def _quantile_grid(values, exact_grid):
  return jnp.sort(values) if exact_grid else jnp.linspace(values.min(), values.max(), 5000)


def _quantile_inputs(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled, unlabeled_ndim=(1,)):
  Y, Yhat = v.as_float(Y, 'Y', ndim=(1,)), v.as_float(Yhat, 'Yhat', ndim=(1,))
  Yhat_unlabeled = v.as_float(Yhat_unlabeled, 'Yhat_unlabeled', ndim=unlabeled_ndim)
  v.check_same_shape('Y', Y, 'Yhat', Yhat)
  v.check_rows(Y=Y, Yhat_unlabeled=Yhat_unlabeled)
  ok = v.check_finite(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_unlabeled) & v.check_alpha(q, 'q')
  w, ok_w = v.weights(w, Y.shape[0], 'w')
  w_unlabeled, ok_wu = v.weights(w_unlabeled, Yhat_unlabeled.shape[0], 'w_unlabeled')
  return (Y, Yhat, Yhat_unlabeled, w, w_unlabeled), ok & ok_w & ok_wu


def _quantile_lam(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled, theta):
  """PPI++ lambda for the quantile at a pilot estimate theta.

  The quantile solves E[1{Y <= theta} - q] = 0, so the gradients are `w (1{Y<=theta} - q)`;
  the Hessian (the density at theta) is a scalar and cancels from lambda. [Our extension:
  ppi_py has no power tuning for quantiles.]
  """
  g = lambda x, wx: (wx * ((x <= theta) - q))[:, None]
  return _core.power_tuning_lam(g(Y, w), g(Yhat, w), g(Yhat_unlabeled, w_unlabeled),
                                jnp.ones((1, 1), Y.dtype))


def _quantile_curve(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled, exact_grid, lam):
  """Grid, rectified CDF and its variance, with lambda tuned at the lam=1 estimate if None."""
  N = Yhat_unlabeled.shape[0]
  grid = _quantile_grid(jnp.concatenate([Y, Yhat, Yhat_unlabeled]), exact_grid)
  fu, su = _cdf_sums(Yhat_unlabeled, w_unlabeled, grid)
  unl_cdf, unl_var = fu / N, jnp.maximum(su / N - (fu / N)**2, 0.0) / N
  curve = functools.partial(_rectified_cdf, Y, Yhat, unl_cdf, unl_var, w, grid)
  if lam is None:
    pilot = grid[jnp.argmin(jnp.abs(curve(1.0)[0] - q))]
    lam = _quantile_lam(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled, pilot)
  return (grid,) + curve(lam)


def _invert_cdf_ci(grid, cdf, var, q, alpha, alternative):
  """Grid points whose rectified p-value for H0: F(t) = q exceeds alpha: `(first, last)`."""
  ok = v.check_alpha(alpha)
  keep = z_pvalue(cdf, jnp.maximum(jnp.sqrt(var), 1e-16), q, alternative) > alpha
  ok &= v.require(jnp.any(keep), 'no grid point is compatible with the quantile at this alpha.')
  first = grid[jnp.argmax(keep)]
  last = grid[grid.shape[0] - 1 - jnp.argmax(keep[::-1])]
  return v.nan_unless(ok, (first, last))


def ppi_quantile_pointestimate(Y, Yhat, Yhat_unlabeled, q, exact_grid=False, w=None,
                               w_unlabeled=None, lam=None):
  """Prediction-powered estimate of the q-quantile: the grid point where the rectified CDF
  is closest to q (a 5000-point linear grid, or every data point with `exact_grid`).
  Traced bad values (e.g. q outside (0, 1)) give NaN (module docstring)."""
  args, ok = _quantile_inputs(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled)
  ok &= v.check_lam(lam)
  grid, cdf, _ = _quantile_curve(*args[:3], q, *args[3:], exact_grid, lam)
  return v.nan_unless(ok, grid[jnp.argmin(jnp.abs(cdf - q))])


def ppi_quantile_ci(Y, Yhat, Yhat_unlabeled, q, alpha=0.1, exact_grid=False, w=None,
                    w_unlabeled=None, lam=None):
  """Prediction-powered (1 - alpha) interval for the q-quantile (two-sided).

  Bad values raise when concrete; traced ones give NaN endpoints (module docstring)."""
  args, ok = _quantile_inputs(Y, Yhat, Yhat_unlabeled, q, w, w_unlabeled)
  ok &= v.check_lam(lam)
  grid, cdf, var = _quantile_curve(*args[:3], q, *args[3:], exact_grid, lam)
  return v.nan_unless(ok, _invert_cdf_ci(grid, cdf, var, q, alpha, 'two-sided'))


def classical_quantile_ci(Y, q, alpha=0.1):
  """Order-statistic interval for the q-quantile (normal approximation to the binomial).

  Bad values raise when concrete; traced ones give NaN endpoints (module docstring)."""
  Y = v.as_float(Y, 'Y', ndim=(1,))
  v.check_rows(Y=Y)
  ok = v.check_finite(Y=Y) & v.check_alpha(q, 'q') & v.check_alpha(alpha)
  n = Y.shape[0]
  lo, hi = z_interval(q * n, jnp.sqrt(q * (1 - q) * n), alpha)
  sorted_y = jnp.sort(Y)
  index = lambda x: jnp.clip(jnp.trunc(x).astype(jnp.int32), 0, n - 1)
  return v.nan_unless(ok, (sorted_y[index(lo)], sorted_y[index(hi)]))


# ------------------------------------------------------------------------------------------
# Cross-prediction-powered inference (Zrnic & Candès 2024): K fold models, Yhat_unlabeled
# has shape (N, K), Yhat holds each labelled row's prediction from the model not trained on it.
# ------------------------------------------------------------------------------------------


def _check_cross(Yhat_unlabeled):
  if jnp.ndim(Yhat_unlabeled) != 2:
    raise ValueError('Yhat_unlabeled must be a 2-dimensional array with shape (N, K), '
                     f'got shape {jnp.shape(Yhat_unlabeled)}.')
  return jnp.asarray(Yhat_unlabeled).mean(1)


def crossppi_mean_pointestimate(Y, Yhat, Yhat_unlabeled):
  """Cross-PPI estimate of the mean: PPI (lam=1) with the fold-averaged unlabelled prediction."""
  return ppi_mean_pointestimate(Y, Yhat, _check_cross(Yhat_unlabeled), lam=1.0)


def crossppi_mean_ci(Y, Yhat, Yhat_unlabeled, alpha=0.1, alternative='two-sided'):
  """Cross-PPI interval for the mean (ppi_py's default, without `bootstrap_data`)."""
  return ppi_mean_ci(Y, Yhat, _check_cross(Yhat_unlabeled), alpha, alternative, lam=1.0)


def _crossppi_quantile_curve(Y, Yhat, Yhat_unlabeled, q, exact_grid):
  _check_cross(Yhat_unlabeled)
  (Y, Yhat, Yhat_unlabeled, w, _), ok = _quantile_inputs(Y, Yhat, Yhat_unlabeled, q, None, None,
                                                         unlabeled_ndim=(2,))
  N = Yhat_unlabeled.shape[0]
  grid = _quantile_grid(jnp.concatenate([Y, Yhat, Yhat_unlabeled.ravel()]), exact_grid)
  # CDF: average of the K fold CDFs; its variance: that of 1{mean_k Yhat_ik <= t} (ppi_py).
  f_all, _ = _cdf_sums(Yhat_unlabeled.ravel(), jnp.ones((Yhat_unlabeled.size,), Y.dtype), grid)
  f_mean, _ = _cdf_sums(Yhat_unlabeled.mean(1), jnp.ones((N,), Y.dtype), grid)
  unl_var = (f_mean / N) * (1 - f_mean / N) / N
  cdf, var = _rectified_cdf(Y, Yhat, f_all / Yhat_unlabeled.size, unl_var, w, grid, 1.0)
  return grid, cdf, var, ok


def crossppi_quantile_pointestimate(Y, Yhat, Yhat_unlabeled, q, exact_grid=False):
  """Cross-PPI estimate of the q-quantile."""
  grid, cdf, _, ok = _crossppi_quantile_curve(Y, Yhat, Yhat_unlabeled, q, exact_grid)
  return v.nan_unless(ok, grid[jnp.argmin(jnp.abs(cdf - q))])


def crossppi_quantile_ci(Y, Yhat, Yhat_unlabeled, q, alpha=0.1, alternative='two-sided',
                         exact_grid=False):
  """Cross-PPI interval for the q-quantile."""
  grid, cdf, var, ok = _crossppi_quantile_curve(Y, Yhat, Yhat_unlabeled, q, exact_grid)
  return v.nan_unless(ok, _invert_cdf_ci(grid, cdf, var, q, alpha, alternative))


# ------------------------------------------------------------------------------------------
# Bootstrap (Zrnic 2024, "A note on the prediction-powered bootstrap", Alg. 1).
# ------------------------------------------------------------------------------------------


def _resample(key, n_resamples, arrays):
  """`n_resamples` paired resamples (with replacement) of arrays sharing their rows."""
  n = arrays[0].shape[0]
  idx = jax.random.randint(key, (n_resamples, n), 0, n)
  return [x[idx] for x in arrays]


def _bootstrap_bounds(draws, estimate, alpha, alternative, method):
  """Percentile or basic bootstrap bounds; NaN for a traced alpha outside (0, 1)."""
  ok = v.check_alpha(alpha)
  v.check_alternative(alternative)
  if method not in ('percentile', 'basic'):
    raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}.")
  a_lo = {'two-sided': alpha / 2, 'larger': alpha, 'smaller': 0.0}[alternative]
  a_hi = {'two-sided': alpha / 2, 'larger': 0.0, 'smaller': alpha}[alternative]
  if method == 'percentile':
    lo, hi = jnp.quantile(draws, a_lo, axis=0), jnp.quantile(draws, 1 - a_hi, axis=0)
  else:
    lo = 2 * estimate - jnp.quantile(draws, 1 - a_lo, axis=0)
    hi = 2 * estimate - jnp.quantile(draws, a_hi, axis=0)
  inf = jnp.full_like(lo, jnp.inf)
  return v.nan_unless(ok, {'two-sided': (lo, hi), 'larger': (lo, inf),
                           'smaller': (-inf, hi)}[alternative])


def ppboot(estimator, Y, Yhat, Yhat_unlabeled, X=None, X_unlabeled=None, lam=None,
           n_resamples=1000, n_resamples_lam=50, alpha=0.1, alternative='two-sided',
           method='percentile', key=None):
  """Prediction-powered bootstrap interval for `estimator` (a JAX-traceable function of
  `Y` or of `(X, Y)`). Labelled rows are resampled in pairs, unlabelled rows independently.

  `lam=None` estimates `lam = sum_j Cov(est(Y*), est(Yhat*))_j / sum_j (Var est(Yhat*)_j +
  Var est(Yhat_unlabeled*)_j)` from `n_resamples_lam` resamples; `key` (default `key(0)`)
  makes the draws reproducible. A traced non-finite `lam` or alpha outside (0, 1) gives NaN
  endpoints (module docstring).
  """
  if (X is None) != (X_unlabeled is None):
    raise ValueError('X and X_unlabeled must be both None or both given.')
  key = jax.random.key(0) if key is None else key
  k_lam_l, k_lam_u, k_l, k_u = jax.random.split(key, 4)
  labelled = [jnp.asarray(Y), jnp.asarray(Yhat)]
  unlabelled = [jnp.asarray(Yhat_unlabeled)]
  if X is not None:
    labelled, unlabelled = [jnp.asarray(X)] + labelled, [jnp.asarray(X_unlabeled)] + unlabelled
  v.check_rows(Y=labelled[-2], Yhat_unlabeled=unlabelled[-1])
  v.check_same_shape('Y', labelled[-2], 'Yhat', labelled[-1], axis=0)

  def parts(lab, unl):  # estimator on (Y, Yhat, Yhat_unlabeled), each as a flat vector
    xs, xu = lab[:-2], unl[:-1]
    return estimator(*xs, lab[-2]), estimator(*xs, lab[-1]), estimator(*xu, unl[-1])

  boot = lambda k_l, k_u, m: jax.vmap(parts)(_resample(k_l, m, labelled),
                                             _resample(k_u, m, unlabelled))
  ok = v.check_lam(lam) & v.check_alpha(alpha)  # before resampling: raise at once
  if lam is None:
    ey, eh, eu = boot(k_lam_l, k_lam_u, n_resamples_lam)
    cov = jnp.sum(((ey - ey.mean(0)) * (eh - eh.mean(0))).sum(0) / (n_resamples_lam - 1))
    lam = cov / jnp.sum(jnp.var(eh, axis=0) + jnp.var(eu, axis=0))
  ey, eh, eu = parts(labelled, unlabelled)
  estimate = lam * eu + ey - lam * eh
  by, bh, bu = boot(k_l, k_u, n_resamples)
  return v.nan_unless(ok, _bootstrap_bounds(lam * bu + by - lam * bh, estimate, alpha,
                                            alternative, method))


def classical_bootstrap_ci(estimator, Y, X=None, n_resamples=1000, alpha=0.1,
                           alternative='two-sided', method='percentile', key=None):
  """Classical bootstrap interval for `estimator(Y)` or `estimator(X, Y)` (rows paired); a
  traced alpha outside (0, 1) gives NaN endpoints."""
  key = jax.random.key(0) if key is None else key
  data = [jnp.asarray(Y)] if X is None else [jnp.asarray(X), jnp.asarray(Y)]
  v.check_rows(Y=data[-1])
  estimate = estimator(*data)
  draws = jax.vmap(estimator)(*_resample(key, n_resamples, data))
  return _bootstrap_bounds(draws, estimate, alpha, alternative, method)
