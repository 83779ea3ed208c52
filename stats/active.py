"""Cost-optimal allocation of a strong rater over a weak one (arXiv:2506.07949), and the
active-inference baseline (Zrnic & Candès 2024, arXiv:2403.03208). PAPERS.md §10.

Every item t gets a cheap weak rating G_t (cost c_g); the strong rating H_t (cost c_h) is
bought with probability pi(X_t), xi_t ~ Bernoulli(pi(X_t)). The estimator

  theta = (1/T) sum_t [ G_t + (H_t - G_t) xi_t / pi(X_t) ]

is unbiased for E[H] for any policy with pi > 0 wherever H != G. Its per-item variance is
`Var(Delta) = Var(H) - E[(H - G)^2] + E[(H - G)^2 / pi(X)]` and its expected cost per item
`c_g + c_h E[pi]`; the policies minimise the product (cost for a fixed precision):

* random (constant) policy: with M = E[(H - G)^2],
  `pi* = sqrt((c_g / c_h) M / (Var(H) - M))` if `M < c_h / (c_h + c_g) Var(H)`, else 1;
* active policy: with U(x) = sqrt(E[(H - G)^2 | x]), `pi(x) = gamma(tau) U(x)` if
  `U(x) <= tau`, else 1, where
  `gamma(tau) = min(sqrt((c_g / c_h + P(U > tau)) / (Var(H) - E[U^2 1{U <= tau}])), 1 / tau)`
  and tau minimises the cost-variance product over the distinct values of U (a 1-D search,
  vectorised over the sorted U; tau below every U means "always buy the strong label").

U comes from a burn-in sample of strong labels (`estimate_uncertainty`, binned by a feature
and shrunk to the overall mean) or from a model of the weak rater's error (for a calibrated
probability G of a binary H, E[(H - G)^2 | G] = G (1 - G): `binary_uncertainty`).

All functions are jit/vmap-compatible except the budget helper, which returns a Python int.
Validation follows `stats._validation`: strong labels H are read only where xi = 1 (they
may be NaN elsewhere); negative costs, NaN/inf data, a policy rate outside [0, 1] or of 0
where a label is drawn, a non-finite `lam`, alpha outside (0, 1) or a degenerate variance
raise a ValueError naming the argument when concrete, and give NaN outputs (all of them)
when traced inside jit/vmap.
"""
import jax
import jax.numpy as jnp

from stats import _validation as v
from stats._core import z_interval


def _costs(c_g, c_h):
  """Flag: c_g >= 0 and c_h > 0."""
  return v.require((c_g >= 0) & (c_h > 0),
                   f'costs must satisfy c_g >= 0 and c_h > 0, got c_g={c_g}, c_h={c_h}.')


def random_policy_rate(var_h, mse, c_g, c_h):
  """Cost-optimal constant labelling rate pi* for `Var(H) = var_h`, `E[(H-G)^2] = mse` (NaN for
  traced bad costs)."""
  ok = _costs(c_g, c_h)
  var_h, mse = jnp.asarray(var_h, float), jnp.asarray(mse, float)
  interior = mse < c_h / (c_h + c_g) * var_h
  rate = jnp.sqrt((c_g / c_h) * mse / jnp.where(interior, var_h - mse, 1.0))
  return v.nan_unless(ok, jnp.where(interior, jnp.minimum(rate, 1.0), 1.0))


def active_policy(U, var_h, c_g, c_h):
  """Cost-optimal active policy for per-item uncertainties `U` (shape (T,)).

  Returns `(pi, tau, gamma)`: the labelling probability of every item, the threshold above
  which items are always labelled (`-inf`: all items labelled) and the scale gamma(tau).
  Expectations over X are averages over the T items. NaN outputs flag traced bad values.
  """
  ok = _costs(c_g, c_h)
  U = v.as_float(U, 'U', (1,))
  ok &= v.check_finite(U=U)
  T = U.shape[0]
  u = jnp.sort(U)
  below = jnp.cumsum(u) / T                       # E[U 1{U <= u_j}]
  below_sq = jnp.cumsum(u**2) / T                 # E[U^2 1{U <= u_j}]
  p_above = 1.0 - jnp.arange(1, T + 1) / T        # P(U > u_j)
  room = var_h - below_sq
  gamma = jnp.where(room > 0, jnp.sqrt((c_g / c_h + p_above) / jnp.where(room > 0, room, 1.0)),
                    jnp.inf)
  gamma = jnp.minimum(gamma, 1.0 / u)
  objective = (c_h * (gamma * below + p_above) + c_g) * (room + below / gamma)
  distinct = jnp.append(u[:-1] < u[1:], True)     # tau at the last of tied values
  objective = jnp.where(distinct & jnp.isfinite(objective), objective, jnp.inf)
  objective = jnp.concatenate([jnp.asarray([(c_h + c_g) * var_h], u.dtype), objective])
  best = jnp.argmin(objective)
  tau = jnp.where(best == 0, -jnp.inf, u[jnp.maximum(best - 1, 0)])
  gamma = jnp.where(best == 0, 0.0, gamma[jnp.maximum(best - 1, 0)])
  return v.nan_unless(ok, (jnp.where(U <= tau, gamma * U, 1.0), tau, gamma))


def policy_cost_and_variance(pi, U, var_h, c_g, c_h):
  """Expected cost per item `c_g + c_h E[pi]` and `Var(Delta)` (module docstring)."""
  pi, U = jnp.asarray(pi), jnp.asarray(U)
  var_delta = var_h - jnp.mean(U**2) + jnp.mean(jnp.where(U > 0, U**2 / pi, 0.0))
  return c_g + c_h * jnp.mean(pi), var_delta


def binary_uncertainty(G):
  """U(x) for a calibrated probability G of a binary strong label: sqrt(G (1 - G))."""
  G = jnp.asarray(G)
  return jnp.sqrt(jnp.clip(G * (1 - G), 0.0, None))


def estimate_uncertainty(H_burn, G_burn, bins_burn, bins, num_bins, prior_strength=1.0):
  """U per item from a burn-in of strong labels, binned by a discrete feature.

  `U_b = sqrt((sum_{burn-in in b} (H - G)^2 + prior_strength M) / (n_b + prior_strength))`,
  shrinking each bin's mean squared error towards the overall M = mean (H - G)^2 (so an
  empty or lucky bin never gets U = 0). Returns `U_b` for each item's bin in `bins` (NaN if a
  traced input is not finite).
  """
  H_burn, G_burn = v.as_float(H_burn, 'H_burn', (1,)), v.as_float(G_burn, 'G_burn', (1,))
  v.check_same_shape('H_burn', H_burn, 'G_burn', G_burn)
  v.check_rows(H_burn=H_burn)
  ok = v.check_finite(H_burn=H_burn, G_burn=G_burn)
  sq = (H_burn - G_burn)**2
  onehot = jnp.asarray(bins_burn)[:, None] == jnp.arange(num_bins)
  counts = onehot.sum(0)
  mse = (onehot.T @ sq + prior_strength * sq.mean()) / (counts + prior_strength)
  return v.nan_unless(ok, jnp.sqrt(mse)[jnp.asarray(bins)])


def items_for_budget(budget, c_g, c_h, mean_rate):
  """How many items a budget covers at expected cost `c_g + c_h mean_rate` per item."""
  _costs(c_g, c_h)
  if float(budget) < c_g + c_h:
    raise ValueError(f'budget={budget} is too small for one strong label '
                     f'(c_g + c_h = {c_g + c_h}).')
  return int(float(budget) // (c_g + c_h * float(mean_rate)))


def realised_cost(xi, c_g, c_h):
  """Cost actually spent: every item's weak rating plus the strong labels drawn."""
  xi = jnp.asarray(xi)
  return xi.shape[0] * c_g + c_h * jnp.sum(xi)


def sample_labels(key, pi):
  """Draws xi_t ~ Bernoulli(pi_t): which items get a strong label."""
  return jax.random.uniform(key, jnp.shape(pi)) < pi


def _ipw_inputs(H, G, xi, pi):
  """Validated arrays and the flag of the value checks."""
  H, G = v.as_float(H, 'H', (1,)), v.as_float(G, 'G', (1,))
  pi = v.as_float(pi, 'pi', (1,))
  xi = jnp.asarray(xi).astype(bool)
  for name, x in [('G', G), ('xi', xi), ('pi', pi)]:
    v.check_same_shape('H', H, name, x)
  v.check_rows(H=H)
  ok = v.check_finite(G=G, pi=pi, H_where_labelled=jnp.where(xi, H, 0.0))
  ok &= v.require((pi >= 0) & (pi <= 1) & ~(xi & (pi <= 0)),
                  'pi must lie in [0, 1] and be positive wherever xi = 1.')
  return (H, G, xi, pi), ok


def _ipw_terms(H, G, xi, pi, lam):
  """Per-item terms `lam G + (H - lam G) xi / pi` (H unread where xi = 0)."""
  weight = jnp.where(xi, 1.0 / jnp.where(pi > 0, pi, jnp.nan), 0.0)
  return lam * G + jnp.where(xi, H - lam * G, 0.0) * weight


def _ipw_ci(terms, alpha, alternative, ok):
  """`(estimate, (lower, upper))`, all NaN unless the flag `ok` holds."""
  se = v.positive_se(jnp.std(terms, ddof=1) / jnp.sqrt(terms.shape[0]))
  return v.nan_unless(ok, (terms.mean(), z_interval(terms.mean(), se, alpha, alternative)))


def cost_optimal_mean_ci(H, G, xi, pi, alpha=0.1, alternative='two-sided'):
  """The unbiased estimate of E[H] and its z interval: `(estimate, (lower, upper))`, with the
  standard error from the sample variance of the per-item terms (NaN if a traced value is
  bad, module docstring)."""
  (H, G, xi, pi), ok = _ipw_inputs(H, G, xi, pi)
  return _ipw_ci(_ipw_terms(H, G, xi, pi, 1.0), alpha, alternative, ok)


def active_inference_rates(u, budget_fraction, mix=0.0):
  """Zrnic & Candès's sampling rule `pi = clip((1 - mix) eta u + mix b, 0, 1)` with
  `eta = b / mean(u)`: labels spread in proportion to the uncertainty u, mixed with uniform
  sampling at the expected labelled fraction b. NaN for a traced b outside (0, 1]."""
  u = jnp.asarray(u)
  ok = v.require((0 < budget_fraction) & (budget_fraction <= 1),
                 f'budget_fraction must lie in (0, 1], got {budget_fraction}.')
  eta = budget_fraction / jnp.mean(u)
  return v.nan_unless(ok, jnp.clip((1 - mix) * eta * u + mix * budget_fraction, 0.0, 1.0))


def active_inference_mean_ci(Y, Yhat, xi, pi, alpha=0.1, alternative='two-sided', lam=None):
  """Active inference (Zrnic & Candès 2024): `mean(lam Yhat + (Y - lam Yhat) xi / pi)` and its
  z interval. `lam=None` plugs in the variance-minimising `lam = -Cov(a, b) / Var(b)` for the
  terms `a + lam b` (a = Y xi / pi, b = Yhat (1 - xi / pi)), clipped to [0, 1]. Bad values
  raise when concrete; traced ones give NaN outputs (module docstring)."""
  (Y, Yhat, xi, pi), ok = _ipw_inputs(Y, Yhat, xi, pi)
  ok &= v.check_lam(lam)
  if lam is None:
    a, b = _ipw_terms(Y, Yhat, xi, pi, 0.0), _ipw_terms(Y, Yhat, xi, pi, 1.0) - _ipw_terms(
        Y, Yhat, xi, pi, 0.0)
    var_b = jnp.var(b)
    lam = jnp.clip(-jnp.mean((a - a.mean()) * (b - b.mean())) / jnp.where(var_b > 0, var_b, 1.0),
                   0.0, 1.0)
  return _ipw_ci(_ipw_terms(Y, Yhat, xi, pi, lam), alpha, alternative, ok)
