"""Parity of stats.ppi (means, quantiles, cross-PPI, power) with ppi_py, and API behaviour."""
import warnings

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

warnings.simplefilter('ignore')
import ppi_py  # noqa: E402

from stats import power, ppi  # noqa: E402
from tests.utils import F32_EPS, assert_close  # noqa: E402

# float64 parity with ppi_py: both agree to ~1e-13 relative (rounding of sums of <= 3000
# terms); the data are O(1) (unit-scale normals), so estimates and interval endpoints are O(1)
# and this absolute tolerance is a 1e-6 relative one.
TOL = 1e-6


def _flat(ci):
  """`(lower, upper)` as one vector; ppi_py returns a scalar inf for an open side."""
  sides = [np.ravel(np.asarray(x, float)) for x in ci]
  size = max(s.size for s in sides)
  return np.concatenate([np.broadcast_to(s, (size,)) for s in sides])


def _data(seed, n, N, d=None):
  rng = np.random.default_rng(seed)
  shape = (n,) if d is None else (n, d)
  Y = rng.normal(size=shape) + 0.5
  Yhat = Y + rng.normal(size=shape) * 0.8
  Yhat_u = rng.normal(size=(N,) + shape[1:]) * 1.3 + 0.4
  return Y, Yhat, Yhat_u, rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, N)


class MeanParityTest(parameterized.TestCase):

  @parameterized.parameters(
      (shape, lam, weighted) for shape in [(50, 400, None), (200, 1000, None), (120, 900, 3)]
      for lam, weighted in [(None, False), (None, True), (0.0, True), (1.0, False), (0.37, True)])
  def test_ci_pointestimate_pval(self, shape, lam, weighted):
    Y, Yhat, Yhat_u, w, w_u = _data(0, *shape)
    kw = dict(lam=lam, **(dict(w=w, w_unlabeled=w_u) if weighted else {}))
    with jax.enable_x64(True):
      np.testing.assert_allclose(_flat(ppi.ppi_mean_ci(Y, Yhat, Yhat_u, alpha=0.05, **kw)),
                                 _flat(ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u, alpha=0.05, **kw)),
                                 atol=TOL)
      np.testing.assert_allclose(np.ravel(ppi.ppi_mean_pointestimate(Y, Yhat, Yhat_u, **kw)),
                                 np.ravel(ppi_py.ppi_mean_pointestimate(Y, Yhat, Yhat_u, **kw)),
                                 atol=TOL)
      if lam is not None:
        for alt in ['two-sided', 'larger', 'smaller']:
          np.testing.assert_allclose(
              np.ravel(ppi.ppi_mean_pval(Y, Yhat, Yhat_u, 0.3, alt, **kw)),
              np.ravel(ppi_py.ppi_mean_pval(Y, Yhat, Yhat_u, 0.3, alt, **kw)), atol=TOL)
          np.testing.assert_allclose(_flat(ppi.ppi_mean_ci(Y, Yhat, Yhat_u, 0.1, alt, **kw)),
                                     _flat(ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u, 0.1, alt, **kw)),
                                     atol=TOL)

  def test_element_mode(self):
    Y, Yhat, Yhat_u, _, _ = _data(1, 150, 700, 4)
    with jax.enable_x64(True):
      ours = ppi.ppi_mean_ci(Y, Yhat, Yhat_u, lam_optim_mode='element')
      lam = ppi.ppi_mean_lam(Y, Yhat, Yhat_u, lam_optim_mode='element')
    self.assertEqual(lam.shape, (4,))
    np.testing.assert_allclose(
        _flat(ours), _flat(ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u, lam_optim_mode='element')),
        atol=TOL)

  def test_one_sided_with_tuning_differs_from_ppi_py(self):
    """ppi_py drops `alternative` after tuning lambda; ours stays one-sided."""
    Y, Yhat, Yhat_u, _, _ = _data(2, 100, 500)
    with jax.enable_x64(True):
      lam = float(ppi.ppi_mean_lam(Y, Yhat, Yhat_u))
      lo, hi = ppi.ppi_mean_ci(Y, Yhat, Yhat_u, alternative='larger')
    ref = ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u, alternative='larger', lam=lam)
    np.testing.assert_allclose([lo, hi], _flat(ref), atol=TOL)
    self.assertEqual(hi, np.inf)
    self.assertTrue(np.isfinite(_flat(ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u,
                                                          alternative='larger'))[1]))

  def test_pval_clips_lambda(self):
    """ppi_py's p-value leaves the tuned lambda unclipped; ours clips it like the CI."""
    rng = np.random.default_rng(3)
    Y = rng.normal(size=80)
    Yhat = 3 * Y + rng.normal(size=80) * 0.1  # unclipped lambda would be about 1/3 ...
    Yhat = -Yhat                              # ... negative here, so clipping to 0 matters
    Yhat_u = rng.normal(size=400) * 3
    with jax.enable_x64(True):
      self.assertEqual(float(ppi.ppi_mean_lam(Y, Yhat, Yhat_u)), 0.0)
      self.assertLess(float(ppi.ppi_mean_lam(Y, Yhat, Yhat_u, clip=False)), 0.0)
      ours = ppi.ppi_mean_pval(Y, Yhat, Yhat_u, null=0.1)
    np.testing.assert_allclose(ours, ppi_py.ppi_mean_pval(Y, Yhat, Yhat_u, null=0.1, lam=0.0),
                               atol=TOL)
    unclipped = np.ravel(ppi_py.ppi_mean_pval(Y, Yhat, Yhat_u, null=0.1))[0]
    self.assertGreater(abs(float(ours) - unclipped), 1e-3)

  def test_coord_tunes_that_coordinate(self):
    """ppi_py ignores coord for the mean; ours tunes lambda for that coordinate, so that
    coordinate's interval equals the 1-D interval on that column."""
    Y, Yhat, Yhat_u, _, _ = _data(4, 100, 600, 3)
    with jax.enable_x64(True):
      lo, hi = ppi.ppi_mean_ci(Y, Yhat, Yhat_u, coord=1)
    ref = ppi_py.ppi_mean_ci(Y[:, 1], Yhat[:, 1], Yhat_u[:, 1])
    np.testing.assert_allclose([lo[1], hi[1]], _flat(ref), atol=TOL)

  def test_classical_mean(self):
    Y, _, _, w, _ = _data(5, 90, 10)
    with jax.enable_x64(True):
      for alt in ['two-sided', 'larger', 'smaller']:
        np.testing.assert_allclose(_flat(ppi.classical_mean_ci(Y, w=w, alternative=alt)),
                                   _flat(ppi_py.classical_mean_ci(Y, w=w, alternative=alt)),
                                   atol=TOL)

  def test_lam_zero_is_classical_and_lam_formula(self):
    Y, Yhat, Yhat_u, _, _ = _data(6, 100, 300)
    with jax.enable_x64(True):
      np.testing.assert_allclose(_flat(ppi.ppi_mean_ci(Y, Yhat, Yhat_u, lam=0.0)),
                                 _flat(ppi.classical_mean_ci(Y)), atol=1e-12)
      lam = float(ppi.ppi_mean_lam(Y, Yhat, Yhat_u))
    n, N = len(Y), len(Yhat_u)
    expected = (np.mean((Y - Y.mean()) * (Yhat - Yhat.mean())) /
                ((1 + n / N) * np.var(np.r_[Yhat, Yhat_u], ddof=1)))
    self.assertAlmostEqual(lam, expected, places=10)


class QuantileParityTest(parameterized.TestCase):

  @parameterized.product(q=[0.1, 0.83], exact_grid=[False, True], weighted=[False, True])
  def test_quantile(self, q, exact_grid, weighted):
    Y, Yhat, Yhat_u, w, w_u = _data(7, 150, 800)
    kw = dict(w=w, w_unlabeled=w_u) if weighted else {}
    with jax.enable_x64(True):
      ours = ppi.ppi_quantile_ci(Y, Yhat, Yhat_u, q, exact_grid=exact_grid, lam=1.0, **kw)
      est = ppi.ppi_quantile_pointestimate(Y, Yhat, Yhat_u, q, exact_grid=exact_grid, lam=1.0,
                                           **kw)
    np.testing.assert_allclose(_flat(ours),
                               _flat(ppi_py.ppi_quantile_ci(Y, Yhat, Yhat_u, q,
                                                            exact_grid=exact_grid, **kw)),
                               atol=TOL)
    self.assertAlmostEqual(float(est), float(ppi_py.ppi_quantile_pointestimate(
        Y, Yhat, Yhat_u, q, exact_grid=exact_grid, **kw)), delta=TOL)

  def test_classical_quantile(self):
    Y = _data(8, 333, 10)[0]
    with jax.enable_x64(True):
      for q in [0.05, 0.5, 0.9]:
        np.testing.assert_allclose(_flat(ppi.classical_quantile_ci(Y, q)),
                                   _flat(ppi_py.classical_quantile_ci(Y, q)), atol=TOL)

  def test_power_tuning(self):
    """An uninformative Yhat tunes lambda to about 0 (close to the lam=0 interval); a perfect
    one to about 1/(1 + n/N); tuning never widens the interval much beyond the better end."""
    rng = np.random.default_rng(9)
    Y = rng.normal(size=300)
    Yu = rng.normal(size=3000)
    noise, noise_u = rng.normal(size=300), rng.normal(size=3000)
    with jax.enable_x64(True):
      lam = float(ppi._quantile_lam(jnp.asarray(Y), jnp.asarray(Y), jnp.asarray(Yu), 0.5,
                                    jnp.ones(300), jnp.ones(3000), 0.0))
      self.assertAlmostEqual(lam, 1 / (1 + 300 / 3000), delta=0.03)
      width = lambda ci: float(ci[1] - ci[0])
      tuned = width(ppi.ppi_quantile_ci(Y, noise, noise_u, 0.5))
      plain = width(ppi.ppi_quantile_ci(Y, noise, noise_u, 0.5, lam=1.0))
      classical = width(ppi.ppi_quantile_ci(Y, noise, noise_u, 0.5, lam=0.0))
    self.assertLess(tuned, 0.8 * plain)
    self.assertLess(tuned, 1.1 * classical)


class CrossPPITest(parameterized.TestCase):

  def test_mean_and_quantile(self):
    rng = np.random.default_rng(10)
    Y = rng.normal(size=200)
    Yhat = Y + rng.normal(size=200)
    Yhat_u = rng.normal(size=(1500, 1)) + rng.normal(size=(1500, 5)) * 0.3
    with jax.enable_x64(True):
      np.testing.assert_allclose(_flat(ppi.crossppi_mean_ci(Y, Yhat, Yhat_u)),
                                 _flat(ppi_py.crossppi_mean_ci(Y, Yhat, Yhat_u)), atol=TOL)
      self.assertAlmostEqual(float(ppi.crossppi_mean_pointestimate(Y, Yhat, Yhat_u)),
                             float(np.ravel(ppi_py.crossppi_mean_pointestimate(
                                 Y, Yhat, Yhat_u))[0]), delta=TOL)
      for q in [0.2, 0.7]:
        np.testing.assert_allclose(_flat(ppi.crossppi_quantile_ci(Y, Yhat, Yhat_u, q)),
                                   _flat(ppi_py.crossppi_quantile_ci(Y, Yhat, Yhat_u, q)),
                                   atol=TOL)
        self.assertAlmostEqual(float(ppi.crossppi_quantile_pointestimate(Y, Yhat, Yhat_u, q)),
                               float(ppi_py.crossppi_quantile_pointestimate(Y, Yhat, Yhat_u, q)),
                               delta=TOL)
    with self.assertRaisesRegex(ValueError, 'Yhat_unlabeled'):
      ppi.crossppi_mean_ci(Y, Yhat, Yhat_u[:, 0])


class BootstrapTest(absltest.TestCase):

  def test_ppboot_matches_clt_interval(self):
    Y, Yhat, Yhat_u, _, _ = _data(11, 300, 1000)
    with jax.enable_x64(True):
      boot = _flat(ppi.ppboot(jnp.mean, Y, Yhat, Yhat_u, lam=0.5, n_resamples=1000))
      clt = _flat(ppi.ppi_mean_ci(Y, Yhat, Yhat_u, lam=0.5))
      tuned = ppi.ppboot(jnp.mean, Y, Yhat, Yhat_u, n_resamples=200, alternative='larger')
      classical = _flat(ppi.classical_bootstrap_ci(jnp.mean, Y, n_resamples=1000))
    width = clt[1] - clt[0]
    np.testing.assert_allclose(boot, clt, atol=0.1 * width)
    np.testing.assert_allclose(classical, _flat(ppi.classical_mean_ci(Y)), atol=0.1 * width)
    self.assertEqual(float(tuned[1]), np.inf)

  def test_ppboot_regression_with_covariates(self):
    rng = np.random.default_rng(12)
    X, Xu = rng.normal(size=(200, 2)), rng.normal(size=(2000, 2))
    Y = X @ np.array([1.0, -2.0]) + rng.normal(size=200)
    Yhat = Y + rng.normal(size=200) * 0.5
    Yhat_u = Xu @ np.array([1.0, -2.0]) + rng.normal(size=2000) * 1.1
    ols = lambda x, y: jnp.linalg.lstsq(x, y)[0]
    with jax.enable_x64(True):
      lo, hi = ppi.ppboot(ols, Y, Yhat, Yhat_u, X=X, X_unlabeled=Xu, n_resamples=300)
    self.assertEqual(lo.shape, (2,))
    self.assertTrue(np.all(lo < np.array([1.0, -2.0]) + 0.3))
    self.assertTrue(np.all(hi > np.array([1.0, -2.0]) - 0.3))


class PowerTest(parameterized.TestCase):

  @parameterized.product(rho=[0.0, 0.4, 0.9, -0.6], costs=[(0.0, 1.0, 0.1), (0.1, 1.0, 0.01)],
                         target=[dict(budget=1000.0), dict(effective_n=300),
                                 dict(budget=1000.0, n_max=400), dict(effective_n=300, n_max=500),
                                 dict(effective_n=300, n_max=250)])
  def test_ppi_power(self, rho, costs, target):
    ours, ref = power.ppi_power(rho, *costs, **target), ppi_py.ppi_power(rho, *costs, **target)
    for k in ['n', 'N', 'effective_n']:
      self.assertEqual(ours[k], ref[k], k)
    self.assertAlmostEqual(ours['cost'], ref['cost'], places=9)

  def test_ppi_mean_power(self):
    Y, Yhat, _, w, _ = _data(13, 120, 10)
    with jax.enable_x64(True):
      ours = power.ppi_mean_power(Y, Yhat, 1.0, 0.05, budget=400.0, w=w)
    ref = ppi_py.ppi_mean_power(Y, Yhat, 1.0, 0.05, budget=400.0, w=w)
    self.assertEqual((ours['n'], ours['N']), (ref['n'], ref['N']))
    self.assertAlmostEqual(ours['ppi_corr'], ref['ppi_corr'], places=9)
    with self.assertRaisesRegex(ValueError, 'budget'):
      power.ppi_power(0.5, 0, 1, 0.1)


class ValidationAndTracingTest(parameterized.TestCase):

  def test_errors_name_the_argument(self):
    Y, Yhat, Yhat_u, _, _ = _data(14, 30, 100)
    cases = [
        (dict(Y=Y, Yhat=Yhat[:-1], Yhat_unlabeled=Yhat_u), 'Y and Yhat'),
        (dict(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_u.reshape(50, 2)), 'Yhat_unlabeled'),
        (dict(Y=np.where(np.arange(30) == 3, np.nan, Y), Yhat=Yhat, Yhat_unlabeled=Yhat_u),
         'Y contains NaN'),
        (dict(Y=Y, Yhat=Yhat, Yhat_unlabeled=np.r_[Yhat_u[:-1], np.inf]), 'Yhat_unlabeled contains'),
        (dict(Y=Y[:1], Yhat=Yhat[:1], Yhat_unlabeled=Yhat_u), 'Y needs at least 2'),
        (dict(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_u, alpha=1.5), 'alpha'),
        (dict(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_u, alternative='bigger'), 'alternative'),
        (dict(Y=np.ones(30), Yhat=np.ones(30), Yhat_unlabeled=np.ones(100)), 'zero variance'),
        (dict(Y=Y, Yhat=Yhat, Yhat_unlabeled=Yhat_u, w=np.ones(29)), 'w must have 30'),
    ]
    for kwargs, message in cases:
      with self.subTest(message), self.assertRaisesRegex(ValueError, message):
        ppi.ppi_mean_ci(**kwargs)
    with self.assertRaisesRegex(ValueError, 'q must lie'):
      ppi.ppi_quantile_ci(Y, Yhat, Yhat_u, 1.0)

  def test_jit_vmap_and_degenerate_inputs_give_nan(self):
    Y, Yhat, Yhat_u, _, _ = _data(15, 40, 200)
    fn = jax.jit(ppi.ppi_mean_ci, static_argnames=('alpha', 'alternative'))
    with jax.enable_x64(True):
      np.testing.assert_allclose(_flat(fn(Y, Yhat, Yhat_u)), _flat(ppi.ppi_mean_ci(Y, Yhat, Yhat_u)),
                                 atol=1e-12)
      batch = np.stack([Y, Y + 1, -Y])
      # Under jit: one compile of the batched program; an eager vmap compiles each primitive.
      lo, hi = jax.jit(jax.vmap(ppi.ppi_mean_ci, (0, None, None)))(batch, Yhat, Yhat_u)
      for i in range(3):
        np.testing.assert_allclose([lo[i], hi[i]], _flat(ppi.ppi_mean_ci(batch[i], Yhat, Yhat_u)),
                                   atol=1e-12)
      const = fn(jnp.ones(40), jnp.ones(40), jnp.ones(200))
      self.assertTrue(np.all(np.isnan(_flat(const))))
      nan_in = fn(Y, np.where(np.arange(40) == 0, np.nan, Yhat), Yhat_u)
      self.assertTrue(np.all(np.isnan(_flat(nan_in))))
      # Constant predictions alone are fine: lambda = 0 and the classical interval.
      np.testing.assert_allclose(_flat(fn(Y, jnp.zeros(40), jnp.zeros(200))),
                                 _flat(ppi.classical_mean_ci(Y)), atol=1e-12)
      q = jax.jit(ppi.ppi_quantile_ci, static_argnames=('alpha', 'exact_grid'))
      np.testing.assert_allclose(_flat(q(Y, Yhat, Yhat_u, 0.5)),
                                 _flat(ppi.ppi_quantile_ci(Y, Yhat, Yhat_u, 0.5)), atol=1e-12)

  def test_float32_without_x64(self):
    Y, Yhat, Yhat_u, _, _ = _data(16, 40, 200)
    lo, hi = ppi.ppi_mean_ci(Y, Yhat, Yhat_u)
    self.assertIn(lo.dtype, (jnp.float32, jnp.float64))
    # float32 sums of up to N = 200 terms: K eps relative to the interval's size.
    assert_close([lo, hi], _flat(ppi_py.ppi_mean_ci(Y, Yhat, Yhat_u)), F32_EPS * len(Yhat_u))


if __name__ == '__main__':
  absltest.main()
