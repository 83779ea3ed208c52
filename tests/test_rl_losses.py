"""rl.losses and rl.value: analytic values, Monte-Carlo unbiasedness, exact expected
gradients on a one-step bandit, gradient accumulation in the trainer, the value head."""
from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from model import recursive
from model.registry import build_model
from rl import losses, value
from tests.utils import (ELEMENTWISE_RTOL, FORWARD_RTOL, assert_close, assert_update_close,
                         tiny_config)
from training import sharding, trainer


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - special.logsumexp(x, axis=-1, keepdims=True)


class TokenFunctionsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.logits = (3 * rng.normal(size=(2, 5, 11))).astype(np.float32)
    self.ref = (3 * rng.normal(size=(2, 5, 11))).astype(np.float32)
    self.targets = rng.integers(0, 11, (2, 5)).astype(np.int32)

  def test_logprobs_entropy_and_kl_match_numpy(self):
    lp, lq = _log_softmax(self.logits), _log_softmax(self.ref)
    assert_close(losses.token_logprobs(self.logits, self.targets),
                 np.take_along_axis(lp, self.targets[..., None], -1)[..., 0], ELEMENTWISE_RTOL)
    assert_close(losses.entropy(self.logits), special.entr(np.exp(lp)).sum(-1), ELEMENTWISE_RTOL)
    assert_close(losses.exact_kl(self.logits, self.ref),
                 special.rel_entr(np.exp(lp), np.exp(lq)).sum(-1), ELEMENTWISE_RTOL)

  def test_kl_estimators_are_unbiased_and_k3_nonnegative(self):
    """Mean of k1 and k3 over N samples from pi = exact KL(pi || ref) within 5 standard
    errors; k3 >= 0 on every sample."""
    logits, ref = self.logits[0, 0], self.ref[0, 0]
    exact = float(losses.exact_kl(logits, ref))
    n = 200_000
    samples = jax.random.categorical(jax.random.PRNGKey(0), logits, shape=(n,))
    logp = losses.token_logprobs(jnp.broadcast_to(logits, (n, 11)), samples)
    ref_logp = losses.token_logprobs(jnp.broadcast_to(ref, (n, 11)), samples)
    for estimator in ('k1', 'k3'):
      k = np.asarray(losses.kl_estimate(logp, ref_logp, estimator), np.float64)
      if estimator == 'k3':
        self.assertGreaterEqual(k.min(), 0.0)
      self.assertAlmostEqual(k.mean(), exact, delta=5 * k.std() / np.sqrt(n), msg=estimator)

  def test_clipped_surrogate(self):
    ratio = jnp.array([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 1.5])
    adv = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, -2.0, -2.0])
    obj, clipped = losses.clipped_surrogate(ratio, adv, 0.2)
    np.testing.assert_allclose(obj, [0.5, 0.9, 1.0, 1.1, 1.2, -1.6, -3.0], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [0, 0, 0, 0, 1, 1, 0])
    grad = jax.grad(lambda r: losses.clipped_surrogate(r, adv, 0.2)[0].sum())(ratio)
    np.testing.assert_allclose(grad, np.where(clipped, 0.0, adv), rtol=1e-6)


class BaselineTest(absltest.TestCase):

  def test_group_baselines_match_a_loop(self):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=10).astype(np.float32)
    groups = np.array([3, 1, 3, 7, 1, 3, 5, 1, 3, 7])  # group 5 is a singleton
    for loo in (False, True):
      want = []
      for i, g in enumerate(groups):
        others = [rewards[j] for j in range(10) if groups[j] == g and (j != i or not loo)]
        want.append(np.mean(others) if others else 0.0)
      assert_close(losses.group_mean_baseline(rewards, groups, loo), want, ELEMENTWISE_RTOL)
    adv = losses.group_advantages(rewards, groups, normalize=True, eps=0.0)
    want = [(rewards[i] - rewards[groups == g].mean()) / (rewards[groups == g].std() or 1.0)
            for i, g in enumerate(groups)]
    assert_close(adv, want, ELEMENTWISE_RTOL)
    mask = np.array([[0, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(
        losses.sequence_advantages_to_tokens(jnp.array([2.0, -1.0]), mask),
        [[0, 2, 2], [-1, -1, 0]])


class Bandit(nn.Module):
  """A categorical policy over K actions parameterised by its logits, shaped like a
  family's output: every position of every row gets the same logits."""
  k: int

  @nn.compact
  def __call__(self, tokens, **_):
    logits = self.param('logits', nn.initializers.normal(1.0), (self.k,))
    return jnp.broadcast_to(logits, tokens.shape + (self.k,)), {'losses': {}}


K = 5
REWARDS = np.array([1.0, -0.5, 2.0, 0.3, 0.0], np.float32)


def _bandit_batch(actions, behaviour_logprobs, advantages):
  n = len(actions)
  ones = np.ones((n, 1), np.int32)
  return {'tokens': 0 * ones, 'targets': np.asarray(actions, np.int32)[:, None],
          'positions': 0 * ones, 'segment_ids': ones, 'loss_mask': ones,
          'behaviour_logprobs': np.asarray(behaviour_logprobs, np.float32)[:, None],
          'advantages': np.asarray(advantages, np.float32)[:, None]}


class BanditTest(absltest.TestCase):
  """Expected gradients by enumeration: sum_a pi(a) grad loss(a)."""

  def setUp(self):
    super().setUp()
    self.model = Bandit(K)
    self.theta = jnp.array([0.3, -1.0, 0.5, 1.2, -0.2])
    self.ref = jnp.array([-0.4, 0.2, 0.9, 0.0, 0.1])
    self.logp = jax.nn.log_softmax(self.theta)

  def _grad(self, loss_fn, batch):
    n = batch['targets'].size
    ctx = trainer.StepContext(jax.random.PRNGKey(0), jnp.int32(0), jnp.float32(n), 1,
                              {'reference': {'logits': self.ref}})
    f = lambda th: loss_fn(self.model, {'params': {'logits': th}}, batch, ctx)[:2]
    (_, metrics), g = jax.value_and_grad(f, has_aux=True)(self.theta)
    return np.asarray(g, np.float64), metrics

  def _expected_grad(self, loss_fn, advantages):
    p = np.exp(np.asarray(self.logp, np.float64))
    total = 0.0
    for a in range(K):
      g, metrics = self._grad(loss_fn, _bandit_batch([a], [self.logp[a]], [advantages[a]]))
      self.assertAlmostEqual(float(metrics['ratio']), 1.0, places=6)  # behaviour = policy
      total = total + p[a] * g
    return total

  def test_reinforce_with_baseline_is_unbiased(self):
    want = jax.grad(lambda th: -jnp.sum(jax.nn.softmax(th) * REWARDS))(self.theta)
    for baseline in (0.0, 0.7, float(REWARDS.mean())):
      got = self._expected_grad(losses.reinforce_loss(), REWARDS - baseline)
      assert_close(got, want, 1e-5)
    # Importance weighting from a uniform behaviour policy over all actions in one batch.
    g, metrics = self._grad(losses.reinforce_loss(clip_ratio=100.0), _bandit_batch(
        range(K), [-np.log(K)] * K, REWARDS - 0.7))
    assert_close(g, want, 1e-5)  # mean over K tokens of K pi(a) x the per-sample gradient
    self.assertEqual(float(metrics['clip_frac']), 0.0)

  def test_kl_estimator_gradients(self):
    """k2's expected gradient is grad KL(pi || ref), k3's grad KL(ref || pi), k1's zero."""
    kl = lambda a, b: jnp.sum(jax.nn.softmax(a) * (jax.nn.log_softmax(a) - jax.nn.log_softmax(b)))
    wants = {'k1': jnp.zeros(K), 'k2': jax.grad(lambda th: kl(th, self.ref))(self.theta),
             'k3': jax.grad(lambda th: kl(self.ref, th))(self.theta)}
    for estimator, want in wants.items():
      got = self._expected_grad(losses.reinforce_loss(kl_coeff=1.0, kl_estimator=estimator),
                                np.zeros(K))
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=estimator)

  def test_entropy_bonus_gradient(self):
    got = self._expected_grad(losses.reinforce_loss(entropy_coeff=0.3), np.zeros(K))
    ent = lambda th: -jnp.sum(jax.nn.softmax(th) * jax.nn.log_softmax(th))
    assert_close(got, -0.3 * jax.grad(ent)(self.theta), 1e-5)

  def test_missing_fields_are_named(self):
    batch = _bandit_batch([0], [0.0], [1.0])
    del batch['advantages']
    with self.assertRaisesRegex(ValueError, "'advantages'"):
      self._grad(losses.reinforce_loss(), batch)
    with self.assertRaisesRegex(ValueError, 'kl_estimator'):
      losses.reinforce_loss(kl_estimator='k4')


class CriticBandit(nn.Module):
  """``Bandit`` with a value head: a learned scalar per position, in ``aux['values']``."""
  k: int

  @nn.compact
  def __call__(self, tokens, **_):
    logits = self.param('logits', nn.initializers.normal(1.0), (self.k,))
    value = self.param('value', nn.initializers.zeros, ())
    return (jnp.broadcast_to(logits, tokens.shape + (self.k,)),
            {'losses': {}, 'values': jnp.broadcast_to(value, tokens.shape)})


class PPOTest(absltest.TestCase):
  """GAE and PPO's terms against hand-computed examples, and ppo_loss's wiring."""

  def test_gae_by_hand(self):
    rewards, values = np.array([[0.0, 0.0, 1.0]]), np.array([[0.5, 0.6, 0.8]])
    # lam = 0.5: A2 = 1 - 0.8 = 0.2; A1 = 0.8 - 0.6 + 0.5 A2 = 0.3; A0 = 0.1 + 0.5 A1 = 0.25.
    adv, ret = losses.gae(rewards, values, np.ones((1, 3)), gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [[0.25, 0.3, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.75, 0.9, 1.0]], rtol=1e-6)
    # Token 1 is another role's: skipped. A2 = 0.2; A0 = 0.8 - 0.5 + 0.5 A2 = 0.4.
    adv, ret = losses.gae(rewards, values, np.array([[1, 0, 1]]), gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [[0.4, 0.0, 0.2]], rtol=1e-6)
    # gamma discounts the next value and advantage: A0 = 0 + 0.9 * 0.6 - 0.5 + 0.9 * A1 ...
    adv, _ = losses.gae(rewards, values, np.ones((1, 3)), gamma=0.9, lam=1.0)
    a2 = 0.2
    a1 = 0.9 * 0.8 - 0.6 + 0.9 * a2
    np.testing.assert_allclose(adv, [[0.9 * 0.6 - 0.5 + 0.9 * a1, a1, a2]], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'lam'):
      losses.gae(rewards, values, np.ones((1, 3)), lam=1.5)

  def test_ppo_terms_by_hand(self):
    ratio, adv = np.array([1.5, 0.5, 1.0]), np.array([2.0, 2.0, -1.0])
    values, returns = jnp.array([0.5, 0.0, 1.0]), jnp.array([1.0, 0.0, 0.0])
    terms = losses.ppo_terms(jnp.log(ratio), jnp.zeros(3), adv, values, returns, 0.2)
    # min(rho A, clip(rho, 0.8, 1.2) A): min(3, 2.4), min(1, 1.6), min(-1, -1).
    np.testing.assert_allclose(terms['pg'], [-2.4, -1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(terms['clipped'], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(terms['value'], [0.125, 0.0, 0.5], rtol=1e-6)
    # Clipped value: V_old + clip(V - V_old, +-0.2) = 0.4, 0, 0.7; the larger loss is kept.
    terms = losses.ppo_terms(jnp.log(ratio), jnp.zeros(3), adv, values, returns, 0.2,
                             old_values=jnp.array([0.2, 0.0, 0.5]), value_clip=0.2)
    np.testing.assert_allclose(terms['value'], [0.18, 0.0, 0.5], rtol=1e-6)

  def test_ppo_loss_sums_the_terms(self):
    model = CriticBandit(K)
    params = {'logits': jnp.array([0.3, -1.0, 0.5, 1.2, -0.2]), 'value': jnp.float32(0.4)}
    logp = jax.nn.log_softmax(params['logits'])
    actions, behaviour = [0, 2, 3], [-1.0, -2.0, -0.5]
    batch = _bandit_batch(actions, behaviour, [1.0, -0.5, 2.0])
    batch['returns'] = np.array([[1.0], [0.0], [0.5]], np.float32)
    ctx = trainer.StepContext(jax.random.PRNGKey(0), jnp.int32(0), jnp.float32(3), 1, None)
    loss, metrics, _ = losses.ppo_loss(clip_eps=0.2, value_coeff=0.5)(
        model, {'params': params}, batch, ctx)
    terms = losses.ppo_terms(logp[np.array(actions)], jnp.array(behaviour),
                             jnp.array([1.0, -0.5, 2.0]), jnp.full(3, 0.4),
                             jnp.array([1.0, 0.0, 0.5]), 0.2)
    expected = float(jnp.mean(terms['pg']) + 0.5 * jnp.mean(terms['value']))
    self.assertAlmostEqual(float(loss), expected, places=5)
    self.assertAlmostEqual(float(metrics['clip_frac']), float(jnp.mean(terms['clipped'])))
    del batch['returns']
    with self.assertRaisesRegex(ValueError, "ppo_loss: the batch has no 'returns'"):
      losses.ppo_loss()(model, {'params': params}, batch, ctx)

  def test_ppo_loss_by_hand(self):
    """pi = (1/4, 3/4), ref = behaviour = (1/2, 1/2), tokens 1 then 0 (Plantain's PPO,
    issue 16): ratios 1.5 and 0.5, A = 1: pg = -(min(1.5, 1.2) + min(0.5, 0.8)) / 2 = -0.85
    (the first clipped); V = 0.4 against returns 1 and 0: value = (0.18 + 0.08) / 2 = 0.13;
    k3 = exp(r) - r - 1 with r = log(ref / pi): (2/3 - 1 - log(2/3) + 2 - 1 - log 2) / 2."""
    model = CriticBandit(2)
    params = {'logits': jnp.array([0.0, np.log(3.0)]), 'value': jnp.float32(0.4)}
    batch = _bandit_batch([1, 0], [np.log(0.5)] * 2, [1.0, 1.0])
    batch['returns'] = np.array([[1.0], [0.0]], np.float32)
    ctx = trainer.StepContext(jax.random.PRNGKey(0), jnp.int32(0), jnp.float32(2), 1,
                              {'reference': {'logits': jnp.zeros(2), 'value': jnp.float32(0)}})
    loss, metrics, _ = losses.ppo_loss(clip_eps=0.2, value_coeff=0.5, kl_coeff=0.1)(
        model, {'params': params}, batch, ctx)
    kl = (2 / 3 - 1 - np.log(2 / 3) + 1 - np.log(2)) / 2
    self.assertAlmostEqual(float(metrics['pg_loss']), -0.85, places=5)
    self.assertAlmostEqual(float(metrics['value_loss']), 0.13, places=5)
    self.assertAlmostEqual(float(metrics['kl']), kl, places=5)
    self.assertAlmostEqual(float(metrics['clip_frac']), 0.5, places=6)
    self.assertAlmostEqual(float(loss), -0.85 + 0.5 * 0.13 + 0.1 * kl, places=5)


def _rl_batch(config, seed=0):
  b, t, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, v, (b, t + 1)).astype(np.int32)
  mask = np.zeros((b, t), np.int32)
  mask[:, t // 4:] = 1  # the policy generated the last 3/4 of each row
  rewards = rng.normal(size=b).astype(np.float32)
  groups = np.arange(b) // 2
  adv = losses.group_advantages(rewards, groups, normalize=True)
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.arange(t, dtype=np.int32)[None].repeat(b, 0),
          'segment_ids': np.ones((b, t), np.int32), 'loss_mask': mask,
          'behaviour_logprobs': (-np.log(v) + 0.3 * rng.normal(size=(b, t))).astype(np.float32),
          'advantages': np.asarray(losses.sequence_advantages_to_tokens(adv, mask)),
          'rewards': rewards, 'group_ids': groups.astype(np.int32)}


class TrainerTest(absltest.TestCase):

  def test_grad_accumulation_matches_one_batch(self):
    """Value baseline, KL to a reference passed as a step argument, entropy bonus and
    truncated importance weights: grad_accum=2 gives grad_accum=1's update."""
    config = tiny_config(num_layers=1)
    config.data.update(seq_len=16, batch_size=4)
    batch = _rl_batch(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    base = build_model(config.model)
    model = value.WithValueHead(base)
    loss_fn = losses.reinforce_loss(kl_coeff=0.1, entropy_coeff=0.01, clip_ratio=1.2,
                                    baseline='value', value_coeff=0.5)
    _, tx, schedule, _, _, init, rules = trainer.build_state_fns(config, mesh, model)
    results = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = init(jax.random.PRNGKey(0))
      before = jax.device_get(state['params'])
      reference = jax.tree.map(lambda x: 0.9 * x, before['base'])
      for accum in (1, 2):
        config.train.grad_accum = accum
        step = jax.jit(trainer.make_train_step(model, tx, schedule, config.train, loss_fn))
        new_state, metrics = step(state, sharding.shard_batch(batch, mesh),
                                  {'reference': reference})
        results.append((jax.device_get(new_state['params']), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    for name in ('pg_loss', 'kl', 'entropy', 'ratio', 'clip_frac', 'reward', 'value_loss',
                 'total_loss'):
      self.assertAlmostEqual(float(m1[f'train/{name}']), float(m2[f'train/{name}']),
                             delta=1e-4 * max(1.0, abs(float(m1[f'train/{name}']))), msg=name)
    self.assertGreater(float(m1['train/kl']), 1e-4)
    self.assertGreater(float(m1['train/clip_frac']), 0.0)
    assert_update_close(p2, p1, before)


def _head_from_lm_column(params, j):
  """Value-head params that make values equal logits[..., j] (both linear in the hidden)."""
  emb = params['embedder']
  kernel = emb['lm_head']['kernel'][:, j] if 'lm_head' in emb else emb['embed']['embedding'][j]
  return {'kernel': kernel[:, None], 'bias': jnp.zeros((1,))}


class ValueHeadTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('llama_tied', 'llama'),
      ('recursive_early_exit', 'recursive'))
  def test_logits_unchanged_and_values_read_the_final_hidden_state(self, family):
    """Logits are the base's; with the head set to the LM head's column j, values equal
    logits[..., j], so they read the hidden state the logits come from (recursive
    early-exit training calls final_norm once per loop). The KV-cached apply that
    ``model.decode.generate`` runs gives the same logits and values and passes the base's
    cache through (``init_cache`` delegates)."""
    if family == 'llama':
      base = build_model(tiny_config(vocab_size=64, num_layers=1).model)
    else:
      base = recursive.Recursive(recursive.RecursiveConfig(
          vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=32,
          tie_embeddings=False, name='recursive', num_loops=2, early_exit='aggressive'))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 64)
    model = value.WithValueHead(base)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params'])
    self.assertEqual(sorted(params), ['base', 'value_head'])
    params = value.wrap_params(params['base'], _head_from_lm_column(params['base'], 5))
    kwargs = dict(train=True, targets=tokens, loss_mask=jnp.ones(tokens.shape))
    logits, aux = model.apply({'params': params}, tokens, **kwargs)
    base_logits, _ = base.apply({'params': params['base']}, tokens, **kwargs)
    cached, cached_aux = model.apply({'params': params}, tokens, cache=model.init_cache(2, 8))
    assert_close(logits, base_logits, FORWARD_RTOL)
    self.assertEqual(aux['values'].shape, (2, 7))
    assert_close(aux['values'], logits[..., 5], FORWARD_RTOL)
    assert_close(cached, logits, FORWARD_RTOL)
    assert_close(cached_aux['values'], aux['values'], FORWARD_RTOL)
    self.assertIn('cache', cached_aux)


if __name__ == '__main__':
  absltest.main()
