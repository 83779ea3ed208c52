"""Prediction-powered inference for OLS, logistic and Poisson regression, in pure JAX.

PPI++ (Angelopoulos, Duchi & Zrnic, arXiv:2311.01453, §3 and Alg. 1) for M-estimators with
a canonical GLM loss `l(theta; x, y) = b(x.theta) - y x.theta`: the estimate minimises the
rectified loss

  L_lam(theta) = lam/N sum_u w_u l(theta; x_u, yhat_u) - lam/n sum_i w_i l(theta; x_i, yhat_i)
                 + 1/n sum_i w_i l(theta; x_i, y_i),

and its covariance is `H^-1 (n/N Cov(lam g_hat_u) + Cov(g - lam g_hat)) H^-1 / n` with the
per-row gradients `g = w x (b'(x.theta) - y)` and `H` the Hessian of the loss over the pooled
labelled and unlabelled covariates (labelled only when lam = 0). Logistic and Poisson fits use
a fixed number of damped Newton steps under `lax.fori_loop` (jit- and vmap-friendly); OLS is
closed form and, as in ppi_py, is the sum of two weighted least-squares fits,
`wls(X_unlabeled, lam Yhat_unlabeled) + wls(X, Y - lam Yhat)`.

Power tuning follows ppi_py exactly: the point estimate tunes lambda at the lam=1 fit; the
interval re-tunes lambda at that tuned estimate and uses the fit at the new lambda.
Differences from ppi_py 0.2.3: `coord` is honoured for logistic and Poisson regression
(ppi_py ignores it there); the fits are Newton's method to machine precision rather than
L-BFGS-B with its default gradient tolerance; `optimizer_options` takes `{'newton_steps': k}`.
Inputs are validated as described in `stats._validation`: a design `X` or `X_unlabeled`
with collinear columns (singular `X^T X`, so the coefficients are not identified), labels
outside the family's domain (logistic: Y in {0, 1} and predictions in [0, 1]; Poisson: Y and
predictions non-negative), a non-finite `lam`, alpha outside (0, 1), NaN/inf data or negative
weights raise a ValueError naming the argument when concrete; when traced (inside jit/vmap)
they are flagged instead: every output (estimates, interval endpoints, p-values) is NaN.
Separable logistic data have no maximum-likelihood estimate; the Newton iterates then
diverge (as any solver's would).
"""
import functools

import jax
import jax.numpy as jnp

from stats import _core
from stats import _validation as v
from stats._core import z_interval, z_pvalue

# Cumulant b and its first two derivatives for each canonical GLM.
_FAMILIES = {
    'ols': (lambda e: 0.5 * e**2, lambda e: e, jnp.ones_like),
    'logistic': (jax.nn.softplus, jax.nn.sigmoid,
                 lambda e: jax.nn.sigmoid(e) * jax.nn.sigmoid(-e)),
    'poisson': (jnp.exp, jnp.exp, jnp.exp),
}
_NEWTON_STEPS = 30


def _check_domain(family, Y, Yhat, Yhat_unlabeled):
  """Flag: labels and predictions lie where the family's loss has a minimiser."""
  if family == 'logistic':
    ok = v.require((Y == 0) | (Y == 1), 'Y must be binary (0 or 1) for logistic regression.')
    for name, p in [('Yhat', Yhat), ('Yhat_unlabeled', Yhat_unlabeled)]:
      ok &= v.require((p >= 0) & (p <= 1), f'{name} must lie in [0, 1] for logistic regression.')
    return ok
  if family == 'poisson':
    ok = True
    for name, y in [('Y', Y), ('Yhat', Yhat), ('Yhat_unlabeled', Yhat_unlabeled)]:
      ok &= v.require(y >= 0, f'{name} must be non-negative for Poisson regression.')
    return ok
  return True


def _inputs(family, X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled, lam):
  """Validated arrays `(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled)` and the
  flag of the value checks (module docstring)."""
  X, X_unlabeled = v.as_float(X, 'X', (2,)), v.as_float(X_unlabeled, 'X_unlabeled', (2,))
  Y, Yhat = v.as_float(Y, 'Y', (1,)), v.as_float(Yhat, 'Yhat', (1,))
  Yhat_unlabeled = v.as_float(Yhat_unlabeled, 'Yhat_unlabeled', (1,))
  v.check_same_shape('X', X, 'Y', Y, axis=0)
  v.check_same_shape('Y', Y, 'Yhat', Yhat)
  v.check_same_shape('X_unlabeled', X_unlabeled, 'Yhat_unlabeled', Yhat_unlabeled, axis=0)
  v.check_same_shape('X', X, 'X_unlabeled', X_unlabeled, axis=1)
  v.check_rows(Y=Y, Yhat_unlabeled=Yhat_unlabeled)
  ok = v.check_finite(X=X, Y=Y, Yhat=Yhat, X_unlabeled=X_unlabeled,
                      Yhat_unlabeled=Yhat_unlabeled)
  w, ok_w = v.weights(w, Y.shape[0], 'w')
  w_unlabeled, ok_wu = v.weights(w_unlabeled, Yhat_unlabeled.shape[0], 'w_unlabeled')
  ok &= ok_w & ok_wu & v.check_lam(lam) & _check_domain(family, Y, Yhat, Yhat_unlabeled)
  ok &= v.check_full_rank(X, w, 'X') & v.check_full_rank(X_unlabeled, w_unlabeled,
                                                          'X_unlabeled')
  return (X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled), ok


def _wls(X, y, w):
  xw = X * w[:, None]
  return jnp.linalg.solve(xw.T @ X, xw.T @ y)


def _newton(loss, theta, steps):
  """`steps` Newton iterations, each taking the best of the step sizes 1, 1/2, ..., 1/32."""
  grad, hess = jax.grad(loss), jax.hessian(loss)
  sizes = 0.5**jnp.arange(6)

  def body(_, th):
    cands = th - sizes[:, None] * jnp.linalg.solve(hess(th), grad(th))
    losses = jax.vmap(loss)(cands)
    return cands[jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))]

  return jax.lax.fori_loop(0, steps, body, theta)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _fit(family, data, lam, steps):
  """Minimiser of the rectified loss L_lam (module docstring)."""
  X, Y, Yhat, Xu, Yhu, w, wu = data
  if family == 'ols':
    return _wls(Xu, lam * Yhu, wu) + _wls(X, Y - lam * Yhat, w)
  b = _FAMILIES[family][0]
  n, N = Y.shape[0], Yhu.shape[0]
  nll = lambda th, x, y, wt: jnp.sum(wt * (b(x @ th) - y * (x @ th)))
  loss = lambda th: (lam / N * nll(th, Xu, Yhu, wu) - lam / n * nll(th, X, Yhat, w) +
                     nll(th, X, Y, w) / n)
  return _newton(loss, jnp.zeros(X.shape[1], X.dtype), steps)


@functools.partial(jax.jit, static_argnums=0)
def _stats(family, theta, data, use_unlabeled):
  """Per-row gradients on labels, on predictions (labelled/unlabelled), and H^-1."""
  X, Y, Yhat, Xu, Yhu, w, wu = data
  _, mean, dmean = _FAMILIES[family]
  n, N = Y.shape[0], Yhu.shape[0]
  mu, mu_u = mean(X @ theta), mean(Xu @ theta)
  h_lab = (X * (w * dmean(X @ theta))[:, None]).T @ X
  h_unl = (Xu * (wu * dmean(Xu @ theta))[:, None]).T @ Xu
  hessian = jnp.where(use_unlabeled, (h_lab + h_unl) / (n + N), h_lab / n)
  grads = X * (w * (mu - Y))[:, None]
  grads_hat = X * (w * (mu - Yhat))[:, None]
  grads_hat_u = Xu * (wu * (mu_u - Yhu))[:, None]
  return grads, grads_hat, grads_hat_u, jnp.linalg.inv(hessian)


def _tuned_lam(family, theta, data, coord):
  return _core.power_tuning_lam(*_stats(family, theta, data, True), coord=coord)


def _pointestimate(family, data, lam, coord, steps):
  if lam is None:
    lam = _tuned_lam(family, _fit(family, data, 1.0, steps), data, coord)
  return _fit(family, data, lam, steps)


def _estimate_and_se(family, data, lam, coord, steps, ddof=1):
  """Estimate and standard errors; with lam=None, lambda is re-tuned at the tuned estimate."""
  if lam is None:
    lam = _tuned_lam(family, _pointestimate(family, data, None, coord, steps), data, coord)
  theta = _fit(family, data, lam, steps)
  grads, grads_hat, grads_hat_u, inv_h = _stats(family, theta, data, lam != 0)
  n, N = grads.shape[0], grads_hat_u.shape[0]
  var = (n / N * _core.cov_matrix(lam * grads_hat_u, ddof) +
         _core.cov_matrix(grads - lam * grads_hat, ddof))
  se = jnp.sqrt(jnp.diag(inv_h @ var @ inv_h) / n)
  return theta, v.positive_se(se)


def _steps(optimizer_options):
  return (optimizer_options or {}).get('newton_steps', _NEWTON_STEPS)


def _ppi_api(family):
  """The point-estimate and interval functions of one family, with ppi_py's signatures."""

  def pointestimate(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, lam=None, coord=None,
                    optimizer_options=None, w=None, w_unlabeled=None):
    data, ok = _inputs(family, X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled, lam)
    return v.nan_unless(ok, _pointestimate(family, data, lam, coord, _steps(optimizer_options)))

  def ci(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, alpha=0.1, alternative='two-sided',
         lam=None, coord=None, optimizer_options=None, w=None, w_unlabeled=None):
    data, ok = _inputs(family, X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled, lam)
    ok &= v.check_alpha(alpha)  # before the fit, so that a concrete bad alpha raises at once
    theta, se = _estimate_and_se(family, data, lam, coord, _steps(optimizer_options))
    return v.nan_unless(ok, z_interval(theta, se, alpha, alternative))

  args = ('`X`, `Y`, `Yhat` (labelled rows), `X_unlabeled`, `Yhat_unlabeled`; `lam` (None '
          'tunes it, 1 is PPI, 0 classical), `coord` (tune lambda for that coordinate), '
          '`w`, `w_unlabeled` (sample weights)')
  for fn, kind, what in [(pointestimate, 'pointestimate', 'point estimate'),
                         (ci, 'ci', '(1 - alpha) interval `(lower, upper)`')]:
    fn.__name__ = fn.__qualname__ = f'ppi_{family}_{kind}'
    fn.__doc__ = (f'Prediction-powered {what} of the {family} coefficients (PPI++, module '
                  f'docstring).\n\n  Arguments as in ppi_py: {args}. Bad values raise a '
                  'ValueError when concrete; traced ones give NaN outputs (module docstring).'
                  '\n  ')
  return pointestimate, ci


ppi_ols_pointestimate, ppi_ols_ci = _ppi_api('ols')
ppi_logistic_pointestimate, ppi_logistic_ci = _ppi_api('logistic')
ppi_poisson_pointestimate, ppi_poisson_ci = _ppi_api('poisson')


def ppi_logistic_pval(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, lam=None, coord=None,
                      optimizer_options=None, w=None, w_unlabeled=None,
                      alternative='two-sided'):
  """Prediction-powered p-values for H0: coefficient_j = 0, per coordinate (NaN if a traced
  value is bad, module docstring)."""
  data, ok = _inputs('logistic', X, Y, Yhat, X_unlabeled, Yhat_unlabeled, w, w_unlabeled, lam)
  theta, se = _estimate_and_se('logistic', data, lam, coord, _steps(optimizer_options))
  return v.nan_unless(ok, z_pvalue(theta, se, 0.0, alternative))


def _classical(family, X, Y, alpha, alternative, w, ddof):
  """Classical interval: the lam=0 fit with the labelled rows standing in for the unlabelled
  ones. Bad values raise when concrete; traced ones give NaN endpoints."""
  data, ok = _inputs(family, X, Y, Y, X, Y, w, None, 0.0)
  ok &= v.check_alpha(alpha)
  theta, se = _estimate_and_se(family, data, 0.0, None, _NEWTON_STEPS, ddof)
  return v.nan_unless(ok, z_interval(theta, se, alpha, alternative))


def classical_ols_ci(X, Y, w=None, alpha=0.1, alternative='two-sided'):
  """Classical OLS interval with HC0 (sandwich) standard errors, as statsmodels/ppi_py (NaN
  endpoints if a traced input is bad, e.g. collinear X)."""
  return _classical('ols', X, Y, alpha, alternative, w, ddof=0)


def classical_logistic_ci(X, Y, alpha=0.1, alternative='two-sided', w=None):
  """Classical logistic-regression interval with sandwich standard errors (ddof=1); NaN
  endpoints if a traced input is bad (e.g. non-binary Y)."""
  return _classical('logistic', X, Y, alpha, alternative, w, ddof=1)


def classical_poisson_ci(X, Y, alpha=0.1, alternative='two-sided', w=None):
  """Classical Poisson-regression interval with sandwich standard errors (ddof=1); NaN
  endpoints if a traced input is bad."""
  return _classical('poisson', X, Y, alpha, alternative, w, ddof=1)


def _cross(X, Y, Yhat, X_unlabeled, Yhat_unlabeled):
  if jnp.ndim(Yhat_unlabeled) != 2:
    raise ValueError('Yhat_unlabeled must be a 2-dimensional array with shape (N, K), '
                     f'got shape {jnp.shape(Yhat_unlabeled)}.')
  return X, Y, Yhat, X_unlabeled, jnp.asarray(Yhat_unlabeled).mean(1)


def crossppi_ols_pointestimate(X, Y, Yhat, X_unlabeled, Yhat_unlabeled):
  """Cross-PPI OLS estimate (Zrnic & Candès 2024): PPI at lam=1 on the fold-averaged
  unlabelled predictions `Yhat_unlabeled` of shape (N, K)."""
  return ppi_ols_pointestimate(*_cross(X, Y, Yhat, X_unlabeled, Yhat_unlabeled), lam=1.0)


def crossppi_ols_ci(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, alpha=0.1,
                    alternative='two-sided'):
  """Cross-PPI OLS interval: identical to PPI's at lam=1 on the fold-averaged predictions
  (the gradient difference `g - g_hat = x (Yhat - Y)` is ppi_py's `grads_diff`)."""
  return ppi_ols_ci(*_cross(X, Y, Yhat, X_unlabeled, Yhat_unlabeled), alpha, alternative,
                    lam=1.0)


def crossppi_logistic_pointestimate(X, Y, Yhat, X_unlabeled, Yhat_unlabeled,
                                    optimizer_options=None):
  """Cross-PPI logistic-regression estimate."""
  return ppi_logistic_pointestimate(*_cross(X, Y, Yhat, X_unlabeled, Yhat_unlabeled),
                                    lam=1.0, optimizer_options=optimizer_options)


def crossppi_logistic_ci(X, Y, Yhat, X_unlabeled, Yhat_unlabeled, alpha=0.1,
                         alternative='two-sided', optimizer_options=None):
  """Cross-PPI logistic-regression interval."""
  return ppi_logistic_ci(*_cross(X, Y, Yhat, X_unlabeled, Yhat_unlabeled), alpha, alternative,
                         lam=1.0, optimizer_options=optimizer_options)
