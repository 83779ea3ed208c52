"""Preference losses (rl/preference.py) against hand-computed values, their gradients' signs,
and the preference-file loader's errors."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from rl import preference

# Two pairs: policy and reference sequence log-probs of the chosen and rejected responses.
LOGP_W, LOGP_L = np.array([-1.0, -2.0]), np.array([-3.0, -1.0])
REF_W, REF_L = np.array([-1.5, -2.0]), np.array([-2.0, -1.5])
MARGINS = (1.5, -0.5)  # (−1 + 1.5) − (−3 + 2); (−2 + 2) − (−1 + 1.5)
softplus = lambda z: math.log1p(math.exp(z))  # −log σ(−z)


class LossTest(absltest.TestCase):

  def test_dpo_and_ipo_by_hand(self):
    np.testing.assert_allclose(preference.implicit_margin(LOGP_W, LOGP_L, REF_W, REF_L), MARGINS)
    beta = 0.5
    dpo = np.mean([softplus(-beta * h) for h in MARGINS])
    np.testing.assert_allclose(preference.dpo_loss(LOGP_W, LOGP_L, REF_W, REF_L, beta), dpo,
                               rtol=1e-6)
    ipo = np.mean([(h - 1 / (2 * beta)) ** 2 for h in MARGINS])  # (0.25 + 2.25) / 2
    np.testing.assert_allclose(preference.ipo_loss(LOGP_W, LOGP_L, REF_W, REF_L, beta), 1.25)
    np.testing.assert_allclose(ipo, 1.25)

  def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected(self):
    grad_w, grad_l = jax.grad(lambda w, l: preference.dpo_loss(w, l, REF_W, REF_L, 0.5),
                              argnums=(0, 1))(jnp.asarray(LOGP_W), jnp.asarray(LOGP_L))
    self.assertTrue(np.all(grad_w < 0) and np.all(grad_l > 0))

  def test_bt_and_log_partition_by_hand(self):
    np.testing.assert_allclose(preference.bt_nll([2.0, 0.0], [0.0, 0.0]),
                               (softplus(-2.0) + math.log(2)) / 2, rtol=1e-6)
    # β log mean(e^{0}, e^{log 3}) = log 2 at β = 1; β -> 0 tends to the max.
    np.testing.assert_allclose(preference.log_partition([[0.0, math.log(3)]], 1.0), [math.log(2)],
                               rtol=1e-6)
    np.testing.assert_allclose(preference.log_partition([[0.0, 1.0]], 1e-3), [1.0], atol=1e-2)

  def test_pessimistic_objectives_by_hand(self):
    eta = 2.0
    loss = preference.prpo_reward_loss([1.0, 3.0], [0.0, 2.0], [1.0], [1.0], eta)
    np.testing.assert_allclose(loss, 2.0 - 1.0 + math.log(2) / eta, rtol=1e-6)
    # The adversary lowers the policy's samples' reward, raises the data's, fits the pairs.
    grads = jax.grad(lambda p, d, w: preference.prpo_reward_loss(p, d, w, jnp.zeros(1), eta),
                     argnums=(0, 1, 2))(jnp.ones(2), jnp.ones(2), jnp.zeros(1))
    self.assertTrue(np.all(grads[0] > 0) and np.all(grads[1] < 0) and np.all(grads[2] < 0))
    closed = preference.prpo_reward_loss([[0.0, math.log(3)]], [0.0], [0.0], [0.0], 1.0,
                                         log_partition_beta=1.0)
    np.testing.assert_allclose(closed, math.log(2) + math.log(2), rtol=1e-6)
    np.testing.assert_allclose(preference.p3o_preference_loss([0.2, 0.4], [0.0], 1.0),
                               0.3 + math.log(2), rtol=1e-6)

  def test_bad_arguments(self):
    for fn, name in [(lambda: preference.prpo_reward_loss([0.0], [0.0], [0.0], [0.0], 0.0), 'eta'),
                     (lambda: preference.p3o_preference_loss([0.5], [0.0], -1.0), 'eta'),
                     (lambda: preference.dpo_loss(LOGP_W, LOGP_L, REF_W, REF_L, 0.0), 'beta'),
                     (lambda: preference.log_partition(np.zeros((2, 0)), 1.0), 'K=0')]:
      with self.assertRaisesRegex(ValueError, name):
        fn()


class LoadTest(absltest.TestCase):

  def _file(self, lines):
    path = os.path.join(self.create_tempdir().full_path, 'prefs.jsonl')
    with open(path, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    return path

  def test_loads_pairs_and_names_bad_lines(self):
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    self.assertEqual(preference.load_preferences(self._file([good, '', good])),
                     [('p', 'a', 'b')] * 2)
    for bad, message in [('{"prompt": "p", "chosen": "a"', 'not a JSON object'),
                         ('{"prompt": "p", "chosen": "a", "rejected": 3}', "'rejected'"),
                         ('{"prompt": "p", "chosen": "a", "rejected": "a"}', 'identical'),
                         ('[1, 2]', 'expected a JSON object')]:
      with self.assertRaisesRegex(ValueError, rf'prefs.jsonl:2: .*{message}'):
        preference.load_preferences(self._file([good, bad]))
    with self.assertRaisesRegex(ValueError, 'no preference pairs'):
      preference.load_preferences(self._file(['']))


if __name__ == '__main__':
  absltest.main()
