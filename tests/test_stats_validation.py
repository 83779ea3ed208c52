"""Bad input never gives a finite interval (stats._validation): concrete values raise a
ValueError naming the argument; traced values (jit/vmap) flag the result with NaN."""
from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from stats import active, glm, ppi, stratified
from tests.utils import assert_close

N_LAB, N_UNL = 40, 200
# float64, the same computation traced and eager: agreement to rounding (eps64 2e-16 times sums
# of <= 200 terms and a well-conditioned fit), far inside 1e-9 of the interval's size.
RTOL = 1e-9


def _mean_data(seed=0):
  rng = np.random.default_rng(seed)
  Y = rng.normal(size=N_LAB)
  return Y, Y + 0.5 * rng.normal(size=N_LAB), rng.normal(size=N_UNL)


def _design(rng, n, collinear=False):
  """Intercept and two normal columns, plus a third that is (collinear) a combination of
  them, or independent."""
  x = rng.normal(size=(n, 3))
  last = 0.1 * x[:, 1] + 0.3 * x[:, 2] if collinear else x[:, 0]
  return np.c_[np.ones(n), x[:, 1:], last]


def _glm_data(seed=0, collinear=False):
  rng = np.random.default_rng(seed)
  X, Xu = _design(rng, N_LAB, collinear), _design(rng, N_UNL, collinear)
  p, pu = 1 / (1 + np.exp(-X[:, 1])), 1 / (1 + np.exp(-Xu[:, 1]))
  Y = (rng.uniform(size=N_LAB) < p).astype(float)
  return X, Y, p, Xu, pu


def _strat_data(seed=0):
  Y, Yhat, Yhat_u = _mean_data(seed)
  return Y, Yhat, Yhat_u, np.arange(N_LAB) % 2, np.arange(N_UNL) % 2


def _active_data(seed=0):
  Y, Yhat, _ = _mean_data(seed)
  pi = np.full(N_LAB, 0.5)
  return Y, Yhat, np.arange(N_LAB) % 2 == 0, pi


# Each estimator as `fn(alpha, lam)` on fixed valid data, returning `(lower, upper)`.
ESTIMATORS = {
    'ppi_mean_ci': lambda a, l: ppi.ppi_mean_ci(*_mean_data(), alpha=a, lam=l),
    'ppi_quantile_ci': lambda a, l: ppi.ppi_quantile_ci(*_mean_data(), 0.5, alpha=a, lam=l),
    'ppi_ols_ci': lambda a, l: glm.ppi_ols_ci(*_glm_data(), alpha=a, lam=l),
    'ppi_logistic_ci': lambda a, l: glm.ppi_logistic_ci(*_glm_data(), alpha=a, lam=l),
    'stratppi_mean_ci': lambda a, l: stratified.stratppi_mean_ci(*_strat_data(), 2, alpha=a,
                                                                 lam=l),
    'active_inference_mean_ci': lambda a, l: active.active_inference_mean_ci(
        *_active_data(), alpha=a, lam=l)[1],
    'ppboot': lambda a, l: ppi.ppboot(jnp.mean, *_mean_data(), lam=l, n_resamples=200,
                                      alpha=a),
}


def _flat(ci):
  return np.concatenate([np.ravel(np.asarray(x, float)) for x in ci])


class ValidationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def assert_flagged(self, ci):
    self.assertTrue(np.all(np.isnan(_flat(ci))), f'expected NaN endpoints, got {ci}')

  @parameterized.parameters(*ESTIMATORS)
  def test_alpha_and_lam(self, name):
    fn = ESTIMATORS[name]
    for alpha in [1.0, np.nan]:
      with self.subTest(alpha=alpha), self.assertRaisesRegex(ValueError, 'alpha must lie'):
        fn(alpha, 0.5)
    for lam in [np.nan, np.inf]:
      with self.subTest(lam=lam), self.assertRaisesRegex(ValueError, 'lam must be finite'):
        fn(0.1, lam)
    # Traced alpha and lam: one jit over a batch; the valid pair matches the eager result.
    alpha = jnp.asarray([0.1, 0.0, 1.0, 1.5, -0.2, jnp.nan, 0.1, 0.1])
    lam = jnp.asarray([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, jnp.nan, -jnp.inf])
    lo, hi = jax.jit(jax.vmap(fn))(alpha, lam)
    assert_close(_flat((lo[0], hi[0])), _flat(fn(0.1, 0.5)), RTOL)
    self.assertTrue(np.all(np.isfinite(_flat((lo[0], hi[0])))))
    self.assert_flagged((lo[1:], hi[1:]))

  def test_collinear_design(self):
    good, bad = _glm_data(1), _glm_data(1, collinear=True)
    mixed = good[:3] + bad[3:]  # only X_unlabeled is collinear
    for data, name in [(bad, 'X has collinear'), (mixed, 'X_unlabeled has collinear')]:
      for fn in [glm.ppi_ols_ci, glm.ppi_ols_pointestimate, glm.ppi_logistic_ci]:
        with self.subTest(fn.__name__, name=name), self.assertRaisesRegex(ValueError, name):
          fn(*data)
    with self.assertRaisesRegex(ValueError, 'X has collinear'):
      glm.classical_ols_ci(bad[0], bad[1])
    with self.assertRaisesRegex(ValueError, 'X has 2 rows for 4 columns'):
      glm.classical_ols_ci(good[0][:2], good[1][:2])
    # Traced: a batch of one full-rank and two collinear designs under jit(vmap).
    batch = [np.stack(arrays) for arrays in zip(good, bad, mixed)]
    lo, hi = jax.jit(jax.vmap(glm.ppi_ols_ci))(*batch)
    assert_close(_flat((lo[0], hi[0])), _flat(glm.ppi_ols_ci(*good)), RTOL)
    self.assert_flagged((lo[1:], hi[1:]))
    self.assert_flagged(jax.jit(glm.classical_ols_ci)(bad[0], bad[1]))
    self.assert_flagged(jax.jit(glm.ppi_ols_pointestimate)(*bad))

  def test_collinear_design_float32(self):
    with jax.enable_x64(False):
      bad = _glm_data(2, collinear=True)
      with self.assertRaisesRegex(ValueError, 'X has collinear'):
        glm.ppi_ols_ci(*bad)
      self.assert_flagged(jax.jit(glm.ppi_ols_ci)(*bad))

  def test_logistic_labels_must_be_binary(self):
    X, Y, Yhat, Xu, Yhat_u = _glm_data(3)
    half, two = np.r_[0.5, Y[1:]], np.r_[2.0, Y[1:]]
    for bad in [half, two]:
      with self.assertRaisesRegex(ValueError, 'Y must be binary'):
        glm.ppi_logistic_ci(X, bad, Yhat, Xu, Yhat_u)
      with self.assertRaisesRegex(ValueError, 'Y must be binary'):
        glm.classical_logistic_ci(X, bad)
    with self.assertRaisesRegex(ValueError, r'Yhat_unlabeled must lie in \[0, 1\]'):
      glm.ppi_logistic_pointestimate(X, Y, Yhat, Xu, np.r_[1.2, Yhat_u[1:]])
    with self.assertRaisesRegex(ValueError, 'Y must be non-negative'):
      glm.ppi_poisson_ci(X, Y - 1, Yhat, Xu, Yhat_u)
    lo, hi = jax.jit(jax.vmap(glm.ppi_logistic_ci, (None, 0, None, None, None)))(
        X, np.stack([Y, half, two]), Yhat, Xu, Yhat_u)
    assert_close(_flat((lo[0], hi[0])), _flat(glm.ppi_logistic_ci(X, Y, Yhat, Xu, Yhat_u)), RTOL)
    self.assert_flagged((lo[1:], hi[1:]))
    pval = jax.jit(glm.ppi_logistic_pval)(X, half, Yhat, Xu, Yhat_u)
    self.assertTrue(np.all(np.isnan(pval)))

  def test_traced_bad_values_in_other_checks(self):
    """Checks that used to be skipped under jit now flag: q, weights, strata ids, pi."""
    Y, Yhat, Yhat_u = _mean_data(4)
    point = jax.jit(ppi.ppi_quantile_pointestimate)
    self.assertTrue(np.isfinite(point(Y, Yhat, Yhat_u, 0.5)))
    self.assertTrue(np.isnan(point(Y, Yhat, Yhat_u, 1.5)))
    w = np.r_[-1.0, np.ones(N_LAB - 1)]
    self.assert_flagged(jax.jit(ppi.ppi_mean_ci)(Y, Yhat, Yhat_u, w=w))
    self.assert_flagged(jax.jit(ppi.classical_quantile_ci)(Y, 0.5, 1.2))
    Y, Yhat, Yhat_u, s, s_u = _strat_data(4)
    strat = jax.jit(stratified.stratppi_mean_ci, static_argnums=5)
    self.assert_flagged(strat(Y, Yhat, Yhat_u, np.r_[5, s[1:]], s_u, 2))
    Y, Yhat, xi, pi = _active_data(4)
    self.assert_flagged(jax.jit(active.cost_optimal_mean_ci)(Y, Yhat, xi, np.r_[1.5, pi[1:]]))


if __name__ == '__main__':
  absltest.main()
