"""StratPPI (formulas, allocation) and the cost-optimal active policies (optimality, budget)."""
from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from stats import active, ppi, stratified


def _strata_data(seed, n=300, N=3000, K=3):
  rng = np.random.default_rng(seed)
  s, su = rng.integers(0, K, n), rng.integers(0, K, N)
  scale = np.array([0.3, 1.0, 3.0])[:K]
  Y = rng.normal(size=n) + s
  Yu_true = rng.normal(size=N) + su
  return (Y, Y + scale[s] * rng.normal(size=n), Yu_true + scale[su] * rng.normal(size=N), s,
          su)


def _numpy_stratppi(Y, f, fu, s, su, K, lam=None):
  """PAPERS.md §9 written out directly."""
  est, var = 0.0, 0.0
  N = len(fu)
  for k in range(K):
    y, fk, fuk = Y[s == k], f[s == k], fu[su == k]
    n_k, N_k = len(y), len(fuk)
    if lam is None:
      lk = np.mean((y - y.mean()) * (fk - fk.mean())) / (
          (1 + n_k / N_k) * np.var(np.r_[fk, fuk], ddof=1))
      lk = np.clip(lk, 0, 1)
    else:
      lk = lam
    w = N_k / N
    est += w * (y.mean() + lk * (fuk.mean() - fk.mean()))
    var += w**2 * (np.var(y - lk * fk) / n_k + lk**2 * np.var(fuk) / N_k)
  return est, np.sqrt(var)


class StratPPITest(parameterized.TestCase):

  @parameterized.parameters(None, 0.0, 1.0, 0.6)
  def test_matches_formulas(self, lam):
    Y, f, fu, s, su = _strata_data(0)
    with jax.enable_x64(True):
      lo, hi = stratified.stratppi_mean_ci(Y, f, fu, s, su, 3, alpha=0.1, lam=lam)
      est = stratified.stratppi_mean_pointestimate(Y, f, fu, s, su, 3, lam=lam)
    ref_est, ref_se = _numpy_stratppi(Y, f, fu, s, su, 3, lam)
    self.assertAlmostEqual(float(est), ref_est, places=10)
    self.assertAlmostEqual(float(hi - lo), 2 * 1.6448536269514722 * ref_se, places=10)

  def test_one_stratum_is_ppi_mean(self):
    Y, f, fu, _, _ = _strata_data(1)
    with jax.enable_x64(True):
      for lam in [None, 0.3]:
        ours = stratified.stratppi_mean_ci(Y, f, fu, np.zeros(300, int), np.zeros(3000, int),
                                           lam=lam)
        np.testing.assert_allclose(ours, ppi.ppi_mean_ci(Y, f, fu, lam=lam), atol=1e-12)

  def test_stratum_weights_and_per_stratum_lambda(self):
    Y, f, fu, s, su = _strata_data(2)
    with jax.enable_x64(True):
      lam = stratified.stratppi_lam(Y, f, fu, s, su, 3)
      # Noisier strata get smaller lambda.
      self.assertTrue(bool(jnp.all(jnp.diff(lam) < 0)))
      est = stratified.stratppi_mean_pointestimate(Y, f, fu, s, su, 3, lam=0.0,
                                                   stratum_weights=[1, 0, 0])
    self.assertAlmostEqual(float(est), Y[s == 0].mean(), places=10)

  def test_validation_and_jit(self):
    Y, f, fu, s, su = _strata_data(3)
    s_bad = s.copy()
    s_bad[s == 2] = 0
    s_bad[np.flatnonzero(s == 2)[0]] = 2
    with self.assertRaisesRegex(ValueError, r'strata: strata \[2\] have fewer than 2'):
      stratified.stratppi_mean_ci(Y, f, fu, s_bad, su, 3)
    with self.assertRaisesRegex(ValueError, 'ids in'):
      stratified.stratppi_mean_ci(Y, f, fu, s, su, 2)
    fn = jax.jit(stratified.stratppi_mean_ci, static_argnums=5)
    self.assertTrue(np.all(np.isnan(np.asarray(fn(Y, f, fu, s_bad, su, 3)))))
    np.testing.assert_allclose(fn(Y, f, fu, s, su, 3),
                               stratified.stratppi_mean_ci(Y, f, fu, s, su, 3), rtol=1e-5)

  @parameterized.parameters((100, [0.5, 0.5]), (1000, [0.2, 0.3, 0.5]), (7, [1, 1, 1]),
                            (57, [0.001, 0.3, 0.699]), (5, [1, 1, 1]), (40, [0.0, 1.0]))
  def test_round_allocation(self, budget, shares):
    alloc = stratified.round_allocation(budget, shares)
    self.assertEqual(alloc.sum(), budget)
    floor = min(2, budget // len(shares))
    self.assertTrue(np.all(alloc >= floor))
    free = alloc > floor
    target = budget * np.asarray(shares) / np.sum(shares)
    # Strata not held at the minimum are within one label of their (re-scaled) share.
    if free.any():
      rescaled = (budget - floor * (~free).sum()) * np.asarray(shares)[free] / np.sum(
          np.asarray(shares)[free])
      self.assertTrue(np.all(np.abs(alloc[free] - rescaled) < 1))
    self.assertLessEqual(np.abs(alloc - target).max(), max(floor, 1) + 1)

  def test_allocations(self):
    sd = np.array([0.25, 4.0]) / np.sqrt(1 + np.array([0.25, 4.0])**2)
    np.testing.assert_array_equal(stratified.allocate_optimal(100, [0.5, 0.5], sd), [20, 80])
    np.testing.assert_array_equal(stratified.allocate_proportional(1000, [0.5, 0.5]), [500, 500])
    conf = np.r_[np.full(500, 0.02), np.full(500, 0.5)]
    np.testing.assert_array_equal(
        stratified.allocate_heuristic(100, conf, np.r_[np.zeros(500, int), np.ones(500, int)], 2),
        [22, 78])  # sd ∝ sqrt(.02 .98) : .5
    with self.assertRaisesRegex(ValueError, 'confidences'):
      stratified.allocate_heuristic(10, np.full(4, 2.0), np.zeros(4, int), 1)


def _objective(pi, U, var_h, c_g, c_h):
  cost, var_delta = active.policy_cost_and_variance(pi, U, var_h, c_g, c_h)
  return float(cost * var_delta)


class ActivePolicyTest(parameterized.TestCase):

  @parameterized.parameters((0.01, 1.0), (0.1, 1.0), (0.5, 1.0), (2.0, 1.0))
  def test_random_rate_minimises_objective(self, c_g, c_h):
    var_h, mse = 0.25, 0.08
    rate = float(active.random_policy_rate(var_h, mse, c_g, c_h))
    grid = np.linspace(0.001, 1, 5000)
    values = (c_g + c_h * grid) * (var_h - mse + mse / grid)
    self.assertAlmostEqual(rate, grid[np.argmin(values)], delta=1e-3)

  @parameterized.parameters((0.01, 1.0, 0.3), (0.1, 1.0, 0.3), (0.3, 1.0, 1.0), (0.05, 1.0, 4.0))
  def test_active_policy_beats_brute_force(self, c_g, c_h, a):
    """No threshold/scale on a grid (nor the random policy) has a lower cost-variance product."""
    with jax.enable_x64(True):
      G = jax.random.beta(jax.random.key(0), a, a, (400,))
      U = active.binary_uncertainty(jnp.round(G, 2))  # ties exercise the distinct-U search
      var_h = float(jnp.mean(G) * (1 - jnp.mean(G)))
      pi, tau, gamma = active.active_policy(U, var_h, c_g, c_h)
      best = _objective(pi, U, var_h, c_g, c_h)
      self.assertTrue(bool(jnp.all((pi >= 0) & (pi <= 1))))
      rate = active.random_policy_rate(var_h, float(jnp.mean(U**2)), c_g, c_h)
      self.assertLessEqual(best, _objective(jnp.full(400, rate), U, var_h, c_g, c_h) + 1e-12)
      brute = np.inf
      for t in np.unique(np.asarray(U))[::4]:
        for g in np.linspace(0.01, 1 / max(t, 1e-3), 60):
          cand = jnp.where(U <= t, jnp.minimum(g * U, 1.0), 1.0)
          brute = min(brute, _objective(cand, U, var_h, c_g, c_h))
      self.assertLessEqual(best, brute + 1e-9)

  def test_budget_and_uncertainty(self):
    self.assertEqual(active.items_for_budget(100.0, 0.1, 1.0, 0.4), 200)
    with self.assertRaisesRegex(ValueError, 'too small for one strong label'):
      active.items_for_budget(1.0, 0.1, 1.0, 0.4)
    with self.assertRaisesRegex(ValueError, 'costs'):
      active.random_policy_rate(0.25, 0.1, 0.1, 0.0)
    self.assertAlmostEqual(float(active.realised_cost(jnp.array([1, 0, 1, 0]), 0.1, 1.0)), 2.4, places=5)
    H = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    G = jnp.array([1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    U = active.estimate_uncertainty(H, G, jnp.array([0, 0, 1, 1, 1, 1]), jnp.array([0, 1, 2]), 3,
                                    prior_strength=1.0)
    m = 1.0 / 6  # mean squared error overall
    np.testing.assert_allclose(U, np.sqrt([m / 3, (1 + m) / 5, m]), rtol=1e-6)
    rates = active.active_inference_rates(jnp.array([0.1, 0.2, 0.3]), 0.2)
    self.assertAlmostEqual(float(rates.mean()), 0.2, places=6)

  def test_estimator_validation(self):
    H = jnp.array([1.0, jnp.nan, 0.0, 1.0])
    xi = jnp.array([True, False, True, True])
    est, (lo, hi) = active.cost_optimal_mean_ci(H, jnp.full(4, 0.5), xi, jnp.full(4, 0.5))
    self.assertTrue(np.isfinite(est))  # H is never read where xi = 0
    with self.assertRaisesRegex(ValueError, 'positive wherever xi'):
      active.cost_optimal_mean_ci(H, jnp.full(4, 0.5), xi, jnp.array([0.5, 0.5, 0.0, 0.5]))
    with self.assertRaisesRegex(ValueError, 'H_where_labelled'):
      active.cost_optimal_mean_ci(H, jnp.full(4, 0.5), jnp.ones(4, bool), jnp.full(4, 0.5))


if __name__ == '__main__':
  absltest.main()
