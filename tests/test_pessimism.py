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
    batch = jax.jit(rp.rl_batch)(seqs, jnp.asarray(behaviour), rewards)
    beta = 0.3
    ctx = trainer_lib.StepContext(jax.random.key(0), 0, jnp.sum(batch['loss_mask']), 1,
                                  {'reference': ref})
    loss_fn = losses.reinforce_loss(kl_coeff=beta, kl_estimator='k2')
    loss, metrics, _ = jax.jit(lambda p: loss_fn(model, {'params': p}, batch, ctx))(params)
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


class _PositionWeighted(nn.Module):
  """A stub scorer: ``values[b, t] = Σ_{p ≤ t} w[tokens[b, p]] · (p + 1)`` with ``w``
  initialised to ``0.01 · token id``, so a sequence's score (the value at its last real
  token) is ``0.01 Σ_p token_p (p + 1)`` and depends on the order of the tokens."""
  vocab: int = 259

  @nn.compact
  def __call__(self, tokens, **kwargs):
    del kwargs
    w = self.param('w', lambda *_: 0.01 * jnp.arange(self.vocab, dtype=jnp.float32))
    values = jnp.cumsum(w[tokens] * (jnp.arange(tokens.shape[1]) + 1), axis=1)
    return None, {'values': values}


def _by_hand_score(seq):
  seq = np.asarray(seq)
  return 0.01 * float(np.sum(seq * (np.arange(len(seq)) + 1)))


class PairModelTest(absltest.TestCase):
  """P3O's pairwise preference model: the joint sequence, antisymmetry, and its losses."""

  def test_join_pairs_by_hand(self):
    first = jnp.asarray([[1, 10, 11, 2, 0], [1, 2, 0, 0, 0]])
    second = jnp.asarray([[1, 20, 2, 0, 0], [1, 5, 6, 7, 2]])
    np.testing.assert_array_equal(rp.join_pairs(first, second),
                                  [[1, 10, 11, 2, 20, 2, 0, 0, 0], [1, 2, 5, 6, 7, 2, 0, 0, 0]])

  def test_transformer_pair_model_is_antisymmetric(self):
    """For any parameters (here a random trunk and head): P(y ≻ y′) + P(y′ ≻ y) = 1 and
    P(y ≻ y) = 1/2 (``test_losses_by_hand`` checks the logit is g(y, y′) − g(y′, y))."""
    setup = rp.Setup(_tiny_config())
    key = jax.random.key(0)
    params = setup.init_scorer(key, setup.init(key))
    params['value_head']['kernel'] = 100 * jax.random.normal(
        key, params['value_head']['kernel'].shape)
    enc = lambda texts: jnp.asarray(rp.encode(setup.tokenizer, texts, setup.length))
    a, b = enc(['abcd', 'h', 'aaaaaaaa']), enc(['efg', 'abcdabcd', 'a'])
    ab, ba, aa = (np.asarray(setup.logit(params, x, y, 'pair'))
                  for x, y in ((a, b), (b, a), (a, a)))
    self.assertGreater(np.min(np.abs(ab)), 1e-3)  # a model that tells the pairs apart
    np.testing.assert_allclose(jax.nn.sigmoid(ab) + jax.nn.sigmoid(ba), 1.0, atol=1e-6)
    np.testing.assert_allclose(aa, 0.0, atol=1e-6)

  def test_losses_by_hand(self):
    """The pair model's fit loss and every adversary objective on the stub scorer against
    numpy formulas on hand-computed scores; one gradient step of each adversary moves the
    policy's samples down against the data's, relative to a step on its data fit alone."""
    stub = _PositionWeighted()
    variables = stub.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rows = lambda *r: jnp.asarray(r, jnp.int32)
    batch = {'policy': rows([1, 3, 3, 2, 0], [1, 4, 2, 0, 0]),
             'data': rows([1, 5, 2, 0, 0], [1, 3, 4, 5, 2]),
             'chosen': rows([1, 10, 2, 0, 0], [1, 7, 7, 2, 0]),
             'rejected': rows([1, 20, 2, 0, 0], [1, 2, 0, 0, 0])}
    eta = 2.0
    cases = (('prpo', None, 'difference'), ('prpo', 0.5, 'difference'), ('p3o', None, 'pair'),
             ('p3o', None, 'difference'))

    @jax.jit
    def compute(v):
      out = {kind: rp.preference_fit_loss(kind)(stub, v, batch, None)[0]
             for kind in ('pair', 'difference')}
      step = lambda loss_fn: jax.tree.map(lambda p, d: p - 0.05 * d, v, jax.grad(
          lambda u: loss_fn(stub, u, batch, None)[0])(v))
      for method, logz, kind in cases:
        out[str((method, logz, kind))] = rp.adversary_loss(method, eta, logz, kind)(
            stub, v, batch, None)[0]
        gap = lambda u: jnp.mean(jax.nn.sigmoid(rp.preference_logits(
            stub, u, batch['policy'], batch['data'], kind)))
        out['gap' + str((method, logz, kind))] = (
            gap(step(rp.adversary_loss(method, eta, logz, kind))) -
            gap(step(rp.preference_fit_loss(kind))))
      return out

    out = jax.tree.map(float, compute(variables))
    softplus = lambda z: np.log1p(np.exp(z))
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    # The first pair: join(y_w, y_l) = [1, 10, 2, 20, 2] scores 0.01 (1 + 20 + 6 + 80 + 10)
    # = 1.17 and join(y_l, y_w) = [1, 20, 2, 10, 2] 0.97: logit 0.2. The second: joins
    # [1, 7, 7, 2, 2] -> 0.01 (1 + 14 + 21 + 8 + 10) = 0.54 and [1, 2, 7, 7, 2] -> 0.64.
    pair_logit = np.array([0.2, -0.1])
    np.testing.assert_allclose(out['pair'], np.mean(softplus(-pair_logit)), rtol=1e-5)
    score = {k: np.array([_by_hand_score(r) for r in v]) for k, v in batch.items()}
    diff_logit = score['chosen'] - score['rejected']
    np.testing.assert_allclose(out['difference'], np.mean(softplus(-diff_logit)), rtol=1e-5)

    def joint(x, y):  # [BOS y EOS] + [y′ EOS], by hand
      x, y = np.asarray(x), np.asarray(y)
      return np.concatenate([x[x != 0], y[y != 0][1:]])
    pair_score = lambda xs, ys: np.array([_by_hand_score(joint(x, y)) for x, y in zip(xs, ys)])
    pol_logit = (pair_score(batch['policy'], batch['data']) -
                 pair_score(batch['data'], batch['policy']))
    bt = lambda logit: np.mean(softplus(-logit)) / eta
    logz = 0.5 * np.log(np.mean(np.exp(score['policy'] / 0.5)))
    expected = {
        ('prpo', None, 'difference'): np.mean(score['policy']) - np.mean(score['data']) +
                                      bt(diff_logit),
        ('prpo', 0.5, 'difference'): logz - np.mean(score['data']) + bt(diff_logit),
        ('p3o', None, 'pair'): np.mean(sigmoid(pol_logit)) + bt(pair_logit),
        ('p3o', None, 'difference'): np.mean(sigmoid(score['policy'] - score['data'])) +
                                     bt(diff_logit)}
    for case in cases:
      np.testing.assert_allclose(out[str(case)], expected[case], rtol=1e-5, err_msg=str(case))
      self.assertLess(out['gap' + str(case)], -1e-4, case)


class LoopTest(absltest.TestCase):

  def test_runs_start_at_mu(self):
    """The alternating loop, 1 step of PRPO (log-partition form) and of P3O (pairwise model):
    at step 0 the policy is μ, so KL(π‖μ) is 0."""
    config = _tiny_config()
    config.policy.update(steps=1, batch=8, eval_batch=8, eval_every=1)
    config.adversary.update(K=4)
    config.preference_model.update(comparisons=2)
    setup = rp.Setup(config)
    key = jax.random.key(0)
    mu = setup.init(key)
    proxy = setup.init_scorer(key, mu)
    pairs = [('', 'abc', 'efg'), ('', 'ad', 'h')] * 4
    data = jnp.asarray(rp.encode(setup.tokenizer, ['ab', 'cd', 'ef', 'gh'] * 2, setup.length))
    pool = setup.sample(mu, key, 8)[0]
    for method in ('prpo_logz', 'p3o'):
      curves = rp.train_policy(setup, method, 0.1, 1.0, mu, proxy, proxy, pairs, data, pool,
                               seed=0)
      self.assertEqual(curves['step'], [0, 1], method)
      self.assertAlmostEqual(curves['kl'][0], 0.0, places=4)
      self.assertLen(curves['train_reward'], 1)
      self.assertTrue(np.isfinite(curves['gold']).all())


def _fake_run(method, coeff, eta, gold, proxy):
  """A saved run (one policy seed) with curves at steps 0, 10, 20."""
  curves = {'step': [0, 10, 20], 'gold': gold, 'proxy': proxy, 'kl': [0.0, 1.0, 2.0],
            'length': [4.0, 5.0, 6.0]}
  return [{'method': method, 'coeff': coeff, 'eta': eta, 'seed': 0, 'seconds': 1.0,
           'curves': curves}]


class StageSeedSummaryTest(absltest.TestCase):

  def test_summary_by_hand(self):
    """Three stage seeds with hand-chosen curves: ``analyse`` per seed, then ``summarise``
    against hand-computed means, sds (ddof 1) and counts of the done-when checks."""
    setup = type('FakeSetup', (), {'task': TASK})()
    # (REINFORCE gold, its proxy, DPO gold, PRPO gold, proxy held-out accuracy) per seed:
    # seed 0 hacked (gold 3 -> 0 while the proxy rises), PRPO 3.5 -> 3.4 beats DPO's 2;
    # seed 1 not hacked, PRPO collapses (3 -> 2) below DPO's 4; seed 2 not hacked (the
    # proxy falls after the peak), PRPO flat at 4 but below REINFORCE's peak 5.
    draws = {0: ([1, 3, 0], [1, 2, 3], [1, 2, 2], [1, 3.5, 3.4], 0.7),
             1: ([1, 2, 2.5], [1, 2, 3], [1, 4, 4], [1, 3, 2], 0.8),
             2: ([2, 5, 1], [1, 3, 2], [2, 2, 2], [2, 4, 4], 0.75)}
    per_seed = {}
    for seed, (rf, rf_proxy, dpo, prpo, acc) in draws.items():
      runs = {'reinforce_kl0.01': _fake_run('reinforce', 0.01, None, rf, rf_proxy),
              'dpo': _fake_run('dpo', 0.1, None, dpo, [0, 0, 0]),
              'prpo_kl0.01': _fake_run('prpo', 0.01, 1.0, prpo, [0, 0, 0])}
      stats = {'heldout_accuracy_vs_labels': acc, 'heldout_accuracy_vs_gold_order': acc}
      per_seed[seed] = dict(rp.analyse(setup, {'rm': stats}, runs), stage_seed=seed)
    self.assertEqual([per_seed[s]['best_baseline_run'] for s in draws],
                     ['reinforce_kl0.01', 'dpo', 'reinforce_kl0.01'])
    summary = rp.summarise(per_seed)
    close = lambda x, mean, sd: np.testing.assert_allclose([x['mean'], x['sd']], [mean, sd],
                                                           rtol=1e-6)
    close(summary['stages']['proxy_heldout_accuracy'], 0.75, 0.05)
    close(summary['stages']['mu_gold'], 4 / 3, math.sqrt(1 / 3))
    close(summary['stages']['best_baseline_peak'], 4.0, 1.0)
    prpo = summary['runs']['prpo_kl0.01']
    close(prpo['gold_peak'], 3.5, 0.5)
    close(prpo['gold_final'], 9.4 / 3, np.std([3.4, 2, 4], ddof=1))
    self.assertEqual(prpo['stage_seeds'], [0, 1, 2])
    tally = lambda k: {'holds': k, 'of': 3}
    self.assertEqual((prpo['final_ge_95pct_of_peak'], prpo['best_ge_best_baseline_best'],
                      prpo['both']), (tally(2), tally(1), tally(1)))
    self.assertNotIn('both', summary['runs']['dpo'])
    self.assertEqual(summary['criteria'], {'low_kl_baseline_hacked': tally(1),
                                           'some_pessimistic_run_passes_both': tally(1)})
    text = rp.stage_seed_report({'per_stage_seed': per_seed, 'summary': summary,
                                 'total_s': 60.0, 'timings_s': {'stage seed 0': 60.0}})
    self.assertIn('| prpo_kl0.01 | 3.50 / 3.40 | 3.00 / 2.00 | 4.00 / 4.00 | 3.50 ± 0.50 |',
                  text)


class JobTest(absltest.TestCase):

  def test_two_stage_seeds_tiny(self):
    """The job at a tiny size with stage seeds (3, 5): each draws its own μ, D and models in
    its own directory, the η sweep runs on the first only, and the summary covers both."""
    config = _tiny_config()
    config.stage_seeds = (3, 5)
    config.methods = ('reinforce', 'prpo')
    config.kl_coeffs = config.pessimistic_kl_coeffs = (0.1,)
    config.eta_sweep.update(etas=(10.0,), kl_coeffs=(0.1,), methods=('prpo',))
    config.sft.update(steps=2, batch=8)
    config.data.update(pairs=12)
    config.reward_model.update(steps=2, batch=8)
    config.policy.update(steps=2, batch=8, eval_batch=8, eval_every=1)
    config.adversary.update(K=4, pool=8)
    workdir = self.create_tempdir().full_path
    results = rp.run(config, workdir)
    per_seed = results['per_stage_seed']
    self.assertEqual(list(per_seed), ['3', '5'])
    self.assertEqual(set(per_seed['3']['runs']), {'reinforce_kl0.1', 'prpo_kl0.1',
                                                   'prpo_kl0.1_eta10'})
    self.assertEqual(set(per_seed['5']['runs']), {'reinforce_kl0.1', 'prpo_kl0.1'})
    datasets = [open(os.path.join(workdir, f'stage{s}', 'prefs.jsonl')).read() for s in (3, 5)]
    self.assertNotEqual(*datasets)
    summary = results['summary']
    self.assertEqual(summary['runs']['prpo_kl0.1']['stage_seeds'], [3, 5])
    self.assertEqual(summary['runs']['prpo_kl0.1_eta10']['both']['of'], 1)
    self.assertEqual(summary['criteria']['low_kl_baseline_hacked']['of'], 2)
    for name in ('results.md', 'results.json', 'pessimism_stage_seeds.png',
                 'stage5/pessimism.png'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)


class BadInputTest(absltest.TestCase):

  def test_config_errors_name_the_field(self):
    for field, value, pattern in (
        ('eta', 0.0, 'config.eta'), ('eta', -1.0, 'config.eta'),
        ('eta_sweep.etas', (10.0, 0.0), r'config.eta_sweep.etas holds 0.0'),
        ('eta_sweep.methods', ('dpo',), 'config.eta_sweep.methods'),
        ('adversary.K', 0, 'config.adversary.K'), ('methods', ('ppo',), 'config.methods'),
        ('stage_seeds', (), r'config.stage_seeds=\(\)'),
        ('stage_seeds', (0, 1, 0), r'config.stage_seeds=\(0, 1, 0\)'),
        ('seeds', (1, 1), r'config.seeds=\(1, 1\)'),
        ('preference_model.kind', 'joint', 'config.preference_model.kind'),
        ('preference_model.comparisons', 0, 'config.preference_model.comparisons')):
      config = pessimism_config.get_config()
      *parents, name = field.split('.')
      node = config[parents[0]] if parents else config
      node[name] = value
      with self.assertRaisesRegex(ConfigError, pattern):
        rp._check(config)
    with self.assertRaisesRegex(ValueError, "kind='joint'"):
      rp.preference_logits(None, None, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32),
                           'joint')
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
