"""The pessimism miniature (rl/envs/prefs.py, rl/repro_pessimism.py): the gold reward by
hand, Bradley–Terry labelling against σ(Δgold), REINFORCE with KL against a hand-computed
loss, the adversaries' updates moving scores the pessimistic way, and bad input."""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs.repro import pessimism as pessimism_config
from model.config_errors import ConfigError
from rl import losses, preference
from rl import repro_pessimism as rp
from rl.envs import prefs
from training import trainer as trainer_lib

TASK = prefs.PrefsTask(max_good_len=8, penalty=2.0, mu_max_len=6, mu_tail=0.35, max_len=16)


class GoldTest(absltest.TestCase):

  def test_gold_reward_by_hand(self):
    gold = lambda t: prefs.gold_reward(TASK, t)
    self.assertEqual(gold(''), 0.0)
    self.assertEqual(gold('abcd'), 4.0)  # four good letters
    self.assertEqual(gold('efgh'), 0.0)  # valid, worthless
    self.assertEqual(gold('ab!z'), 0.0)  # 2 good, '!' and 'z' invalid: 2 − 2
    self.assertEqual(gold('a' * 8), 8.0)  # the optimum
    self.assertEqual(gold('a' * 10), 10.0 - 2.0 * 2)  # past max_good_len: −2 per character
    self.assertEqual(gold('e' * 12), -8.0)

  def test_mu_length_distribution(self):
    p = TASK.length_probs()
    self.assertAlmostEqual(p.sum(), 1.0)
    self.assertEqual(p[0], 0.0)
    np.testing.assert_allclose(p[1:7], p[1])  # uniform up to mu_max_len
    np.testing.assert_allclose(p[7:] / p[1], 0.35 ** np.arange(1, 11), rtol=1e-12)

  def test_bradley_terry_labels_match_the_gold_gap(self):
    rng = np.random.default_rng(0)
    n = 4000
    for better, worse in (('aaaa', 'eeee'), ('ab', 'ef'), ('a', 'e')):
      gap = prefs.gold_reward(TASK, better) - prefs.gold_reward(TASK, worse)
      rows = prefs.label_pairs(TASK, [better] * (n // 2) + [worse] * (n // 2),
                               [worse] * (n // 2) + [better] * (n // 2), rng)
      won = np.mean([r['chosen'] == better for r in rows])
      p = 1 / (1 + math.exp(-gap))
      self.assertLess(abs(won - p), 4 * math.sqrt(p * (1 - p) / n), (better, worse, won, p))

  def test_identical_pairs_are_dropped_and_rows_load(self):
    rows = prefs.label_pairs(TASK, ['ab', 'cd', 'ee'], ['ab', 'ef', 'ee'],
                             np.random.default_rng(0))
    self.assertLen(rows, 1)
    path = os.path.join(self.create_tempdir().full_path, 'p.jsonl')
    with open(path, 'w') as f:
      f.write(''.join(json.dumps(r) + '\n' for r in rows))
    self.assertEqual(preference.load_preferences(path)[0][0], '')
    with self.assertRaisesRegex(ValueError, 'same number'):
      prefs.label_pairs(TASK, ['a'], [], np.random.default_rng(0))


class _Table(nn.Module):
  """A stub policy: logits are a parameter table [T, V], the same for every row."""
  length: int
  vocab: int

  @nn.compact
  def __call__(self, tokens, **kwargs):
    del kwargs
    table = self.param('table', nn.initializers.normal(1.0), (self.length, self.vocab))
    return jnp.broadcast_to(table, tokens.shape + (self.vocab,)), {'losses': {}}


class ReinforceKLTest(absltest.TestCase):

  def test_loss_by_hand(self):
    length, vocab = 4, 5  # sequences BOS + up to 3 tokens + a pad column: 4 targets
    model = _Table(length, vocab)
    params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params']
    ref = model.init(jax.random.key(1), jnp.zeros((1, length), jnp.int32))['params']
    seqs = jnp.asarray([[1, 3, 4, 2, 0], [1, 2, 0, 0, 0], [1, 4, 2, 0, 0]], jnp.int32)
    rewards = np.array([1.0, -2.0, 4.0])
    batch = rp.lm_batch(seqs)
    logp_table = jax.nn.log_softmax(params['table'], -1)
    ref_table = jax.nn.log_softmax(ref['table'], -1)
    targets, mask = np.asarray(batch['targets']), np.asarray(batch['loss_mask'])
    logp = np.asarray(logp_table)[np.arange(length), targets]  # [B, T]
    behaviour = (logp * mask)[:, :3]  # as generated: one column short, padded by rl_batch
    batch = rp.rl_batch(seqs, jnp.asarray(behaviour), rewards)
    beta = 0.3
    ctx = trainer_lib.StepContext(jax.random.key(0), 0, jnp.sum(batch['loss_mask']), 1,
                                  {'reference': ref})
    loss, metrics, _ = losses.reinforce_loss(kl_coeff=beta, kl_estimator='k2')(
        model, {'params': params}, batch, ctx)
    # By hand: leave-one-out advantages; on-policy importance weights are 1.
    adv = np.array([1 - (-2 + 4) / 2, -2 - (1 + 4) / 2, 4 - (1 - 2) / 2])
    ref_logp = np.asarray(ref_table)[np.arange(length), targets]
    k2 = 0.5 * (ref_logp - logp) ** 2
    n = mask.sum()  # 3 + 1 + 2 policy tokens (EOS included)
    self.assertEqual(n, 6)
    expected = np.sum(mask * (-adv[:, None] * logp + beta * k2)) / n
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics['kl'], np.sum(mask * k2) / n, rtol=1e-5)
    np.testing.assert_allclose(metrics['ratio'], 1.0, rtol=1e-6)


def _tiny_config():
  config = pessimism_config.get_config()
  config.model.update(embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
  return config


class AdversaryTest(absltest.TestCase):

  def test_adversaries_lower_the_policy_samples_score(self):
    """One side of the game on a tiny instance: from the same start and for the same steps,
    PRPO's reward model (both forms) and P3O's preference model end with the policy's
    samples scored lower relative to the data's than a plain Bradley–Terry fit does (the
    pessimistic direction), while still ordering the pairs."""
    setup = rp.Setup(_tiny_config())
    key = jax.random.key(0)
    params = setup.init_scorer(key, setup.init(key))
    enc = lambda texts: jnp.asarray(rp.encode(setup.tokenizer, texts, setup.length))
    batch = {'policy': enc(['abcdabcdabcdab', 'aaaaaaaaaaaaaa']), 'data': enc(['ab', 'ce']),
             'chosen': enc(['abc', 'ad']), 'rejected': enc(['efg', 'he'])}
    gap = lambda p: float(jnp.mean(setup.score(p, batch['policy'])) -
                          jnp.mean(setup.score(p, batch['data'])))

    def fit(loss_fn):
      optimizer = rp._optimizer(3e-3)
      update = rp.make_update(setup.scorer, loss_fn, optimizer)
      p, state = params, optimizer.init(params)
      for step in range(20):
        p, state, _, _ = update(p, state, batch, None, step)
      return p

    plain = gap(fit(rp.bt_reward_loss()))
    for method, logz in (('prpo', None), ('prpo', 0.5), ('p3o', None)):
      p = fit(rp.adversary_loss(method, 1.0, logz))
      self.assertLess(gap(p), plain - 0.02, (method, logz))
      s_w, s_l = setup.score(p, batch['chosen']), setup.score(p, batch['rejected'])
      self.assertTrue(np.all(np.asarray(s_w) > np.asarray(s_l)), (method, logz))

  def test_prpo_run_starts_at_mu(self):
    """The alternating loop, 2 steps: at step 0 the policy is μ, so KL(π‖μ) is 0."""
    config = _tiny_config()
    config.policy.update(steps=2, batch=8, eval_batch=8, eval_every=1)
    config.adversary.update(K=4)
    setup = rp.Setup(config)
    key = jax.random.key(0)
    mu = setup.init(key)
    proxy = setup.init_scorer(key, mu)
    pairs = [('', 'abc', 'efg'), ('', 'ad', 'h')] * 4
    data = jnp.asarray(rp.encode(setup.tokenizer, ['ab', 'cd', 'ef', 'gh'] * 2, setup.length))
    pool = setup.sample(mu, key, 8)[0]
    curves = rp.train_policy(setup, 'prpo_logz', 0.1, mu, proxy, pairs, data, pool, seed=0)
    self.assertEqual(curves['step'], [0, 1, 2])
    self.assertAlmostEqual(curves['kl'][0], 0.0, places=4)
    self.assertLen(curves['train_reward'], 2)


class BadInputTest(absltest.TestCase):

  def test_config_errors_name_the_field(self):
    for field, value, pattern in (('eta', 0.0, 'config.eta'), ('eta', -1.0, 'config.eta'),
                                  ('adversary.K', 0, 'config.adversary.K'),
                                  ('methods', ('ppo',), 'config.methods')):
      config = pessimism_config.get_config()
      node, name = (config.adversary, 'K') if field == 'adversary.K' else (config, field)
      node[name] = value
      with self.assertRaisesRegex(ConfigError, pattern):
        rp._check(config)
    with self.assertRaisesRegex(ValueError, 'eta'):
      preference.prpo_reward_loss([0.0], [0.0], [1.0], [0.0], eta=0.0)
    with self.assertRaisesRegex(ValueError, 'K=0'):
      preference.log_partition(jnp.zeros((1, 0)), 1.0)
    with self.assertRaisesRegex(ValueError, 'penalty'):
      prefs.PrefsTask(penalty=0.0)
    with self.assertRaisesRegex(ValueError, 'pessimism.py:nope'):
      pessimism_config.get_config('nope')

  def test_malformed_and_identical_rows_name_the_line(self):
    path = os.path.join(self.create_tempdir().full_path, 'prefs.jsonl')
    good = json.dumps({'prompt': '', 'chosen': 'ab', 'rejected': 'ef'})
    for bad, pattern in (('{"prompt": "", "chosen": "ab"', 'not a JSON object'),
                         (json.dumps({'prompt': '', 'chosen': 'ab', 'rejected': 3}),
                          "'rejected'"),
                         (json.dumps({'prompt': '', 'chosen': 'ab', 'rejected': 'ab'}),
                          'identical')):
      with open(path, 'w') as f:
        f.write(f'{good}\n{good}\n{bad}\n')
      with self.assertRaisesRegex(ValueError, f'{path}:3: .*{pattern}'):
        preference.load_preferences(path)


if __name__ == '__main__':
  absltest.main()
