"""Parity of stats.glm (OLS, logistic, Poisson PPI++, cross-PPI, classical) with ppi_py."""
import warnings

from absl.testing import absltest, parameterized
import jax
import numpy as np

warnings.simplefilter('ignore')
import ppi_py  # noqa: E402

from stats import glm  # noqa: E402

# float64 parity with ppi_py: the fits agree to the optimiser's tolerance (gtol 1e-12 below,
# ~1e-11 in the coefficients) and O(1) data give O(1) coefficients and endpoints, so this
# absolute tolerance is a 1e-6 relative one.
TOL = 1e-6
# ppi_py's L-BFGS-B stops at a gradient of 1e-5 by default; tighten it so that both solvers
# reach the optimum and the comparison is about the statistics, not the stopping rule.
OPT = {'ftol': 1e-15, 'gtol': 1e-12}


def _flat(ci):
  sides = [np.ravel(np.asarray(x, float)) for x in ci]
  size = max(s.size for s in sides)
  return np.concatenate([np.broadcast_to(s, (size,)) for s in sides])


def _data(family, seed, n, N, d):
  rng = np.random.default_rng(seed)
  X = np.c_[np.ones(n), rng.normal(size=(n, d - 1))]
  Xu = np.c_[np.ones(N), rng.normal(size=(N, d - 1))]
  beta = np.linspace(0.4, -0.6, d)
  if family == 'ols':
    Y = X @ beta + rng.normal(size=n)
    return X, Y, Y + rng.normal(size=n) * 0.7, Xu, Xu @ beta + rng.normal(size=N) * 1.1
  if family == 'logistic':
    p, pu = 1 / (1 + np.exp(-X @ beta)), 1 / (1 + np.exp(-Xu @ beta))
    Y = (rng.uniform(size=n) < p).astype(float)
    noisy = lambda q: np.clip(q + rng.normal(size=q.shape) * 0.1, 0, 1)
    return X, Y, noisy(p), Xu, noisy(pu)
  mu, mu_u = np.exp(0.5 * X @ beta), np.exp(0.5 * Xu @ beta)
  Y = rng.poisson(mu).astype(float)
  return X, Y, mu * np.exp(rng.normal(size=n) * 0.2), Xu, mu_u * np.exp(rng.normal(size=N) * 0.2)


# One labelled/unlabelled size throughout, with an intercept-only (d = 1) and a d = 3 design:
# the jitted fits compile once per (family, shape), so every further shape is a compile
# (seconds), while the parity checked does not depend on n or N.
N_LAB, N_UNL, D = 200, 1000, 3


class GLMParityTest(parameterized.TestCase):

  @parameterized.parameters(
      (family, seed, d, lam, weighted)
      for family in ['ols', 'logistic', 'poisson']
      for seed, d, lam, weighted in [(0, 1, None, False), (1, D, None, True), (2, D, 0.0, False),
                                     (3, D, 1.0, True), (4, D, 0.4, False)])
  def test_ci_and_pointestimate(self, family, seed, d, lam, weighted):
    shape = (N_LAB, N_UNL, d)
    X, Y, Yhat, Xu, Yhat_u = _data(family, seed, *shape)
    rng = np.random.default_rng(1)
    kw = dict(lam=lam)
    if weighted:
      kw.update(w=rng.uniform(0.5, 2, shape[0]), w_unlabeled=rng.uniform(0.5, 2, shape[1]))
    ref_kw = dict(kw, optimizer_options=dict(OPT)) if family != 'ols' else kw
    ours_ci = getattr(glm, f'ppi_{family}_ci')
    ours_pe = getattr(glm, f'ppi_{family}_pointestimate')
    with jax.enable_x64(True):
      np.testing.assert_allclose(
          _flat(ours_ci(X, Y, Yhat, Xu, Yhat_u, alpha=0.05, **kw)),
          _flat(getattr(ppi_py, f'ppi_{family}_ci')(X, Y, Yhat, Xu, Yhat_u, alpha=0.05,
                                                     **ref_kw)), atol=TOL)
      np.testing.assert_allclose(
          ours_pe(X, Y, Yhat, Xu, Yhat_u, **kw),
          getattr(ppi_py, f'ppi_{family}_pointestimate')(X, Y, Yhat, Xu, Yhat_u, **ref_kw),
          atol=TOL)

  def test_ols_coord_and_one_sided(self):
    X, Y, Yhat, Xu, Yhat_u = _data('ols', 5, N_LAB, N_UNL, D)
    with jax.enable_x64(True):
      for alt in ['larger', 'smaller']:
        np.testing.assert_allclose(
            _flat(glm.ppi_ols_ci(X, Y, Yhat, Xu, Yhat_u, alternative=alt, coord=2)),
            _flat(ppi_py.ppi_ols_ci(X, Y, Yhat, Xu, Yhat_u, alternative=alt, coord=2)),
            atol=TOL)

  def test_logistic_pval_and_classical(self):
    X, Y, Yhat, Xu, Yhat_u = _data('logistic', 6, N_LAB, N_UNL, D)
    with jax.enable_x64(True):
      np.testing.assert_allclose(glm.ppi_logistic_pval(X, Y, Yhat, Xu, Yhat_u),
                                 ppi_py.ppi_logistic_pval(X, Y, Yhat, Xu, Yhat_u,
                                                          optimizer_options=dict(OPT)),
                                 atol=TOL)
      np.testing.assert_allclose(_flat(glm.classical_logistic_ci(X, Y)),
                                 _flat(ppi_py.classical_logistic_ci(X, Y)), atol=TOL)
      Xp, Yp, _, _, _ = _data('poisson', 4, 300, 10, 2)
      np.testing.assert_allclose(_flat(glm.classical_poisson_ci(Xp, Yp)),
                                 _flat(ppi_py.classical_poisson_ci(Xp, Yp)), atol=TOL)
      Xo, Yo, _, _, _ = _data('ols', 5, 150, 10, 3)
      w = np.random.default_rng(6).uniform(0.5, 2, 150)
      for kw in [{}, dict(w=w)]:
        np.testing.assert_allclose(_flat(glm.classical_ols_ci(Xo, Yo, **kw)),
                                   _flat(ppi_py.classical_ols_ci(Xo, Yo, **kw)), atol=TOL)

  def test_crossppi(self):
    rng = np.random.default_rng(7)
    X, Y, Yhat, Xu, Yhat_u = _data('ols', 8, N_LAB, N_UNL, D)
    folds = Yhat_u[:, None] + rng.normal(size=(N_UNL, 4)) * 0.1
    Xl, Yl, Yhl, Xlu, Yhlu = _data('logistic', 9, N_LAB, N_UNL, D)
    folds_l = np.clip(Yhlu[:, None] + rng.normal(size=(N_UNL, 4)) * 0.05, 0, 1)
    with jax.enable_x64(True):
      np.testing.assert_allclose(_flat(glm.crossppi_ols_ci(X, Y, Yhat, Xu, folds)),
                                 _flat(ppi_py.crossppi_ols_ci(X, Y, Yhat, Xu, folds)), atol=TOL)
      np.testing.assert_allclose(glm.crossppi_ols_pointestimate(X, Y, Yhat, Xu, folds),
                                 ppi_py.crossppi_ols_pointestimate(X, Y, Yhat, Xu, folds),
                                 atol=TOL)
      np.testing.assert_allclose(
          _flat(glm.crossppi_logistic_ci(Xl, Yl, Yhl, Xlu, folds_l)),
          _flat(ppi_py.crossppi_logistic_ci(Xl, Yl, Yhl, Xlu, folds_l,
                                            optimizer_options=dict(OPT))), atol=TOL)

  def test_validation_and_jit(self):
    X, Y, Yhat, Xu, Yhat_u = _data('logistic', 10, N_LAB, N_UNL, D)
    with self.assertRaisesRegex(ValueError, 'X and X_unlabeled'):
      glm.ppi_logistic_ci(X, Y, Yhat, Xu[:, :1], Yhat_u)
    with self.assertRaisesRegex(ValueError, 'X and Y'):
      glm.ppi_ols_ci(X[:-1], Y, Yhat, Xu, Yhat_u)
    with self.assertRaisesRegex(ValueError, 'Yhat contains NaN'):
      glm.ppi_poisson_ci(X, Y, np.r_[np.nan, Yhat[1:]], Xu, Yhat_u)
    with jax.enable_x64(True):
      fn = jax.jit(glm.ppi_logistic_ci)
      np.testing.assert_allclose(_flat(fn(X, Y, Yhat, Xu, Yhat_u)),
                                 _flat(glm.ppi_logistic_ci(X, Y, Yhat, Xu, Yhat_u)), atol=1e-10)
      self.assertTrue(np.all(np.isnan(_flat(fn(X, Y, np.r_[np.nan, Yhat[1:]], Xu, Yhat_u)))))


if __name__ == '__main__':
  absltest.main()
