"""Mixture-of-Recursions: routers against hand computations, capacity warm-up, loss-free
balancing, KV strategies, cached decoding, sharded training, parameter and FLOP counts."""
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from configs import mor_360m, mor_tiny
from configs.repro import mor_isoflop
from model import decode, layers, mor, mor_engine, param_layout, recursive
from model.engine import Request
from model.registry import build_model
from tests import test_train
from tests.utils import (ELEMENTWISE_RTOL, FORWARD_RTOL, assert_close, assert_update_close,
                         mean_loss_tol, tiny_config)
from training import repro_mor
from training import budget, checkpoint as ckpt_lib, train
from training.train import count_params

_SMALL = dict(vocab_size=64, embed_dim=32, num_layers=5, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _cfg(**kw):
  return mor.MoRConfig(**{**_SMALL, **kw})


# Options that change the parameter tree; models differing only in others share parameters.
_STRUCTURE = ('num_layers', 'num_recursions', 'router', 'router_type', 'sampling')


@functools.lru_cache(maxsize=None)
def _params(structure):
  model = mor.MoR(_cfg(**dict(zip(_STRUCTURE, structure))))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((2, 12), jnp.int32))['params']
  return nn.meta.unbox(params)


def _model_and_params(**kw):
  model = mor.MoR(_cfg(**kw))
  return model, _params(tuple(getattr(model.cfg, k) for k in _STRUCTURE))


@functools.lru_cache(maxsize=None)
def _jit_apply(**kw):
  """One jitted ``apply`` per model of ``_model_and_params``: tests that run it on a
  ``(2, 10)`` batch share ``_forward``'s compiled program."""
  model, _ = _model_and_params(**kw)
  return jax.jit(model.apply)


@functools.lru_cache(maxsize=None)
def _forward(**kw):
  """Uncached logits and aux of a model of ``_model_and_params`` on ``_tokens(t=10)``."""
  _, params = _model_and_params(**kw)
  return _jit_apply(**kw)({'params': params}, _tokens(t=10))


@functools.lru_cache(maxsize=None)
def _decoded(**kw):
  """``_cached_logits`` of a model of ``_model_and_params`` on ``_tokens(t=10)``."""
  return _cached_logits(*_model_and_params(**kw), _tokens(t=10))


def _tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, _SMALL['vocab_size'])


class _SpyBlock:
  """Stands in for mor._Block: out = 2 * h; records what each recursion saw."""

  def __init__(self):
    self.calls = []

  def __call__(self, r, h, positions, segment_ids, active):
    self.calls.append((r, np.asarray(positions), np.asarray(active)))
    return 2.0 * h


def _first_feature(h):
  return h[..., :1].astype(jnp.float32)


class ConfigTest(absltest.TestCase):

  def test_default_capacity_and_top_k(self):
    cfg = _cfg(num_recursions=3)
    np.testing.assert_allclose(cfg.capacities, (1.0, 2 / 3, 1 / 3))
    self.assertEqual(cfg.top_ks(2048), (2048, 1365, 682))
    # max(1, int(c * T))
    self.assertEqual(_cfg(num_recursions=2, capacity=(1.0, 0.01)).top_ks(10), (10, 1))

  def test_bad_options_name_the_field(self):
    with self.assertRaisesRegex(ValueError, 'model.capacity'):
      _cfg(capacity=(0.5, 1.0, 0.2))
    with self.assertRaisesRegex(ValueError, 'model.router_func'):
      _cfg(router='token_choice', router_func='tanh')
    with self.assertRaisesRegex(ValueError, 'Unknown config field'):
      mor.MoRConfig.from_config(dict(_SMALL, mor_type='expert'))

  def test_360m_unique_parameters(self):
    model = build_model(mor_360m.get_config().model)
    self.assertEqual((model.cfg.num_ends, model.cfg.base_depth), (1, 10))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    _, non_emb = count_params(params['params'])
    self.assertAlmostEqual(non_emb / 1e6, 118.0, delta=0.5)  # paper: 118M

  def test_scanned_shared_layers_equal_the_loop(self):
    """scan_layers: the same function of the same parameters (stacked under ``shared``) in
    training (top-k routing: outputs, losses, gradients) and in cached decoding."""
    # KV sharing: recursion 1 computes each layer's keys (fresh, explicit visibility) and the
    # later recursions read them (shared); the engine test covers the scanned cached path
    # without sharing, and token choice runs the same _Block. causal_routing changes neither
    # training (top-k) nor decoding, only uncached evaluation (mor.MoR.__call__): the loop's
    # cached logits are DecodeTest's 'expert_kv_sharing' ones.
    kw = dict(causal_routing=True, kv_sharing=True)
    model, params = _model_and_params(**kw)
    scanned = mor.MoR(dataclasses.replace(model.cfg, scan_layers=True))
    stacked = param_layout.stack_layers(params, 'shared')
    self.assertEqual(jax.tree.structure(nn.meta.unbox(jax.eval_shape(
        scanned.init, jax.random.PRNGKey(0), _tokens())['params'])), jax.tree.structure(stacked))
    tokens = _tokens(t=10)

    def loss(m, p):
      logits, aux = m.apply({'params': p}, tokens, train=True)
      return jnp.mean(logits ** 2) + sum(aux['losses'].values(), 0.0), logits

    (l0, out0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)
    (l1, out1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(stacked)
    assert_close(out1, out0, FORWARD_RTOL)
    assert_close(l1, l0, FORWARD_RTOL)
    g1 = param_layout.unstack_layers(g1, model.cfg.base_depth, 'shared')
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    assert_close(flat(g1), flat(g0), FORWARD_RTOL)
    assert_close(_cached_logits(scanned, stacked, tokens)[0], _decoded(**kw)[0], FORWARD_RTOL)

  def test_one_parameter_set_per_shared_layer(self):
    model = mor.MoR(_cfg(num_layers=6, num_recursions=2))  # 1 + 2 + 1 layers
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), _tokens())['params'])
    self.assertEqual(sorted(k for k in params if k.startswith('shared')),
                     ['shared_0', 'shared_1'])
    # DecoderBlock's tree, one kernel per projection: no per-recursion copies.
    self.assertEqual(jax.tree.structure(params['shared_0']),
                     jax.tree.structure(params['first']))
    for name in ('q', 'k', 'v', 'o'):
      self.assertEqual(params['shared_0']['attn'][name]['kernel'].ndim, 3)
    per_layer, _ = count_params(params['first'])
    _, non_emb = count_params(params)
    routers = 2 * model.cfg.embed_dim
    self.assertEqual(non_emb, 4 * per_layer + model.cfg.embed_dim + routers)


class ExpertChoiceTest(absltest.TestCase):

  def _route(self, x, step=None, **kw):
    cfg = _cfg(num_recursions=2, capacity=(1.0, 0.5), **kw)
    block = _SpyBlock()
    t = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
    out = mor.expert_choice_topk(cfg, x, positions, jnp.ones(x.shape[:2], jnp.int32),
                                 [_first_feature] * 2, [_first_feature] * 2, block, step)
    return cfg, block, out

  def test_capacity_hierarchy_causal_order_and_weighted_gating(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    cfg, block, (y, depth, losses) = self._route(x)
    # Hand computation: g = 0.1 sigmoid(first feature), f(h) = 2h.
    sig = lambda z: 1 / (1 + np.exp(-z))
    x0 = np.asarray(x)
    x1 = x0 + 0.1 * sig(x0[..., :1]) * 2 * x0  # recursion 1: capacity 1, every token
    top = np.sort(np.argsort(-x1[..., 0], axis=1)[:, :3], axis=1)
    x2 = x1.copy()
    for b in range(2):
      x2[b, top[b]] += 0.1 * sig(x1[b, top[b], :1]) * 2 * x1[b, top[b]]
    assert_close(y, x2, ELEMENTWISE_RTOL)
    expected_depth = np.ones((2, 6), int)
    np.put_along_axis(expected_depth, top, 2, axis=1)
    np.testing.assert_array_equal(depth, expected_depth)
    # Recursion 2 saw exactly k = 3 tokens per row, in causal order, at original positions.
    np.testing.assert_array_equal(block.calls[1][1], top)
    bce = lambda z, t: np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    target = np.zeros((2, 6))
    np.put_along_axis(target, top, 1.0, axis=1)
    expected = bce(x0[..., 0], 1.0).sum() / 12 + bce(x1[..., 0], target).sum() / 12
    np.testing.assert_allclose(losses['mor_sampling'], 0.001 * expected, rtol=1e-5)

  def test_hierarchical_filtering_keeps_only_previous_survivors(self):
    cfg = _cfg(num_recursions=3, capacity=(0.5, 0.5, 0.25))
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 3))
    block = _SpyBlock()
    # Router scores favour late tokens at recursion 1 but early ones afterwards.
    routers = [lambda h: h[..., :1] * 0 + jnp.arange(h.shape[1])[None, :, None]] + [
        lambda h: -jnp.arange(h.shape[1], dtype=jnp.float32)[None, :, None]] * 2
    mor.expert_choice_topk(cfg, x, jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32), routers,
                           None, block)
    self.assertEqual([c[1].tolist() for c in block.calls],
                     [[[4, 5, 6, 7]], [[4, 5, 6, 7]], [[4, 5]]])

  def test_additive_gating_and_z_loss(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2))
    cfg = _cfg(num_recursions=1, capacity=(1.0,), gating='additive', z_loss=True)
    y, _, losses = mor.expert_choice_topk(cfg, x, jnp.arange(4)[None], jnp.ones((1, 4), int),
                                          [_first_feature], None, _SpyBlock())
    np.testing.assert_allclose(y, 3 * x, rtol=1e-6)  # H + f(H) with f(H) = 2H
    np.testing.assert_allclose(losses['mor_z'], 0.001 * np.mean(np.square(x[..., 0])),
                               rtol=1e-5)

  def test_capacity_warmup_cosine_from_one_to_target(self):
    cfg = _cfg(num_recursions=3, cap_warmup_step=10)
    ks = lambda step: [int(k) for k in cfg.warmup_top_ks(12, jnp.int32(step))]
    self.assertEqual(ks(0), [12, 12, 12])
    decay = (1 + np.cos(np.pi * 0.3)) / 2
    self.assertEqual(ks(3), [int((c + (1 - c) * decay) * 12) for c in cfg.capacities])
    self.assertEqual(ks(10), list(cfg.top_ks(12)))
    self.assertEqual(ks(1000), list(cfg.top_ks(12)))

  def test_warmup_masks_extra_tokens_and_ends_at_the_static_path(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    _, _, static = self._route(x)
    _, block, (y0, depth0, _) = self._route(x, cap_warmup_step=4, step=jnp.int32(0))
    np.testing.assert_array_equal(depth0, 2)  # step 0: every token, every recursion
    np.testing.assert_array_equal(block.calls[1][2], True)
    _, block, warm = self._route(x, cap_warmup_step=4, step=jnp.int32(4))
    self.assertEqual(block.calls[1][2].shape, (2, 6))  # static k_max = T, 3 of 6 masked
    np.testing.assert_array_equal(block.calls[1][2].sum(1), [3, 3])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), warm, static)

  def test_causal_routing_thresholds_router_logits(self):
    x = jnp.array([[[1.0, 1.0], [-1.0, 1.0], [0.5, -3.0]]])  # router logits 1, -1, 0.5
    # Capacity 1 at recursion 1 (the default): every token runs it, as top-k keeps all T.
    for capacity, depths in (((1.0, 0.5), [2, 1, 2]), ((0.5, 0.5), [2, 0, 2])):
      block = _SpyBlock()
      _, depth, _ = mor.expert_choice_causal(
          _cfg(num_recursions=2, capacity=capacity), x, jnp.arange(3)[None],
          jnp.ones((1, 3), int), [_first_feature] * 2, None, block)
      np.testing.assert_array_equal(depth, [depths])
      np.testing.assert_array_equal(block.calls[0][2], [np.array(depths) > 0])
      np.testing.assert_array_equal(block.calls[1][2], [np.array(depths) > 1])

  def test_padding_never_takes_capacity(self):
    """Padding (segment 0) ranks below every real token: the k_2 = 3 places go to the best
    real tokens even though padding scores highest; a row with 2 real tokens keeps 2. Padding
    is never updated nor counted in the BCE."""
    x = np.zeros((2, 6, 2), np.float32)
    x[..., 0] = [[0.3, -0.2, 0.9, 0.1, 5.0, 4.0], [0.2, -0.4, 6.0, 7.0, 8.0, 9.0]]
    x[..., 1] = 1.0
    seg = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    cfg = _cfg(num_recursions=2, capacity=(1.0, 0.5))
    block = _SpyBlock()
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    y, depth, losses = mor.expert_choice_topk(cfg, jnp.asarray(x), positions, jnp.asarray(seg),
                                              [_first_feature] * 2, None, block)
    real = seg > 0
    kept2 = np.array([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)  # top 3 real tokens
    np.testing.assert_array_equal(depth, real.astype(int) + kept2)
    selected = np.take_along_axis(kept2, np.asarray(block.calls[1][1]), axis=1)
    np.testing.assert_array_equal(block.calls[1][2], selected)
    # Hand computation: g = 0.1 sigmoid(first feature), f(h) = 2h, on kept tokens only.
    sig = lambda z: 1 / (1 + np.exp(-z))
    x1 = np.where(real[..., None], x + 0.2 * sig(x[..., :1]) * x, x)
    x2 = np.where(kept2[..., None], x1 + 0.2 * sig(x1[..., :1]) * x1, x1)
    np.testing.assert_allclose(y, x2, rtol=1e-5, atol=1e-6)
    bce = lambda z, t: np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    expected = (np.where(real, bce(x[..., 0], 1.0), 0).sum() +
                np.where(real, bce(x1[..., 0], kept2), 0).sum()) / 12  # batch * candidates
    np.testing.assert_allclose(losses['mor_sampling'], 0.001 * expected, rtol=1e-5)


class TokenChoiceTest(absltest.TestCase):

  def _route(self, x, bias=None, **kw):
    cfg = _cfg(num_recursions=3, router='token_choice', router_func='softmax', **kw)
    block = _SpyBlock()
    b, t, _ = x.shape
    out = mor.token_choice(cfg, x, jnp.broadcast_to(jnp.arange(t), (b, t)),
                           jnp.ones((b, t), int), lambda h: h, block, bias)
    return block, out

  def test_depths_update_and_losses_by_hand(self):
    alpha = 0.5  # != 1, so that the balancing formulas differ by N_r * alpha, not N_r
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3))
    block, (y, depth, losses) = self._route(x, alpha=alpha, z_loss=True)
    logits = np.asarray(x)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    d = probs.argmax(-1) + 1
    np.testing.assert_array_equal(depth, d)
    g = alpha * probs.max(-1, keepdims=True)
    np.testing.assert_allclose(y, logits + g * (2.0 ** d[..., None]) * logits, rtol=1e-5)
    for r, _, active in block.calls:  # attention mask: tokens with depth > r
      np.testing.assert_array_equal(active, d > r)
    # The authors' balancing loss: f_i = N_r count_i / (B T), P_i = mean of alpha * g_i.
    f = np.stack([3 * (d == i + 1).sum() / 10 for i in range(3)])
    p = np.stack([(alpha * probs[..., i]).sum() / 10 for i in range(3)])
    np.testing.assert_allclose(losses['mor_balance'], 0.1 * np.sum(f * p), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(losses['mor_z'], 0.001 * np.mean(lse ** 2), rtol=1e-5)
    # The plain form: the same loss divided by N_r * alpha.
    _, (_, _, plain) = self._route(x, alpha=alpha, balance_formula='plain')
    np.testing.assert_allclose(plain['mor_balance'], 0.1 * np.sum(f * p) / (3 * alpha),
                               rtol=1e-5)

  def test_loss_free_bias_is_added_to_the_scaled_probabilities(self):
    probs = np.array([0.6, 0.3, 0.1])
    bias = jnp.array([0.0, 0.05, 0.0])  # argmax(0.1 g + b) = depth 2; argmax(g + b) = 1
    x = jnp.asarray(np.log(probs), jnp.float32)[None, None]  # softmax(x) = probs
    _, (y, depth, _) = self._route(x, bias=bias, alpha=0.1, balancing='loss_free')
    np.testing.assert_array_equal(depth, [[2]])
    np.testing.assert_allclose(y, x + 0.1 * 0.3 * 4 * x, rtol=1e-5)  # gate alpha g_2, f^2 = 4x


class _SpyLayer:
  """Stands in for a shared DecoderBlock: records (layer_kv, its KVContext), returns (h, a
  fresh kv tag)."""

  def __init__(self, log):
    self.log = log

  def __call__(self, h, layer_kv, ctx):
    tag = ('kv', len(self.log))
    self.log.append((layer_kv, ctx[2], tag))
    return h, tag


class KVStrategyTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_uncached_keys_per_recursion(self, kv_sharing):
    cfg = _cfg(num_recursions=3, kv_sharing=kv_sharing)
    log = []
    block = mor._Block(cfg, [_SpyLayer(log)])
    pos, seg = jnp.arange(4)[None], jnp.ones((1, 4), int)
    for r, active in enumerate([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0]]):
      block(r, jnp.zeros((1, 4, 2)), pos, seg, jnp.array([active], bool))
    first_kv, first_ctx = log[0][2], log[0][1]
    for r in (1, 2):
      layer_kv, ctx, _ = log[r]
      if kv_sharing:  # recursion 1's keys, visibility and segments
        self.assertEqual(layer_kv, first_kv)
        np.testing.assert_array_equal(ctx.kv_pos, first_ctx.kv_pos)
      else:  # its own tokens, inactive ones hidden
        self.assertIsNone(layer_kv)
        np.testing.assert_array_equal(ctx.kv_pos, [[0, -1, 2, -1]] if r == 1 else [[-1, -1, 2, -1]])

  def test_cache_layers(self):
    self.assertEqual(_cfg(num_layers=8, num_recursions=3).num_cache_layers, 2 + 2 * 3)
    self.assertEqual(_cfg(num_layers=8, num_recursions=3, kv_sharing=True).num_cache_layers, 4)

  def test_kv_sharing_changes_the_function(self):  # same parameters, see _STRUCTURE
    outs = [_forward(causal_routing=True, kv_sharing=s)[0] for s in (False, True)]
    self.assertGreater(float(jnp.abs(outs[0] - outs[1]).max()), 1e-4)


def _cached_logits(model, params, tokens):
  """Logits of cached decoding (a 4-token prefill, then one token per call) and the cache."""
  step = jax.jit(lambda toks, pos, cache: model.apply({'params': params}, toks,
                                                     positions=pos, cache=cache))
  b, t = tokens.shape
  logits, aux = step(tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (b, 4)),
                     model.init_cache(b, 16))
  outs = [logits]
  for i in range(4, t):
    logits, aux = step(tokens[:, i:i + 1], jnp.full((b, 1), i), aux['cache'])
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), aux['cache']


class EvalVariantsTest(absltest.TestCase):

  def test_only_top_k_expert_choice_has_a_causal_variant(self):
    model, _ = _model_and_params()
    (name, variant), = model.eval_variants().items()
    self.assertEqual(name, 'causal_routing')
    self.assertEqual(variant.cfg, dataclasses.replace(model.cfg, causal_routing=True))
    self.assertEqual(mor.MoR(_cfg(causal_routing=True)).eval_variants(), {})
    self.assertEqual(mor.MoR(_cfg(**mor_tiny.token_choice())).eval_variants(), {})

  def test_trainer_logs_the_causal_routing_loss(self):
    config = tiny_config()
    # One shared layer, twice (cycle): the trainer's eval-variant machinery does not depend
    # on the depth, and each block application costs compile time.
    config.model = mor_tiny.mor_model(**{**config.model.to_dict(), 'num_layers': 2,
                                         'num_recursions': 2, 'sharing': 'cycle'})
    config.train.update(steps=1, eval_every=1, eval_batches=1)
    workdir = self.create_tempdir().full_path
    summary = train.train_and_evaluate(config, workdir)
    self.assertEqual(summary['eval_step'], 1)
    self.assertTrue(np.isfinite(summary['eval/loss_causal_routing']))
    self.assertNotEqual(summary['eval/loss_causal_routing'], summary['eval/loss'])

  def test_causal_variant_ignores_later_tokens_and_equals_cached_decoding(self):
    model, params = _model_and_params()
    variant = model.eval_variants()['causal_routing']
    # Two packed documents per row; rows differ only in their last token (all 64 values).
    tokens = jnp.broadcast_to(_tokens(b=1, t=10), (64, 10)).at[:, -1].set(jnp.arange(64))
    seg = jnp.broadcast_to(jnp.array([1] * 5 + [2] * 5), tokens.shape)
    pos = jnp.broadcast_to(jnp.array(list(range(5)) * 2), tokens.shape)

    def spread(m):
      earlier = jax.jit(m.apply)({'params': params}, tokens, positions=pos,
                                 segment_ids=seg)[0][:, :-1]
      return float(jnp.abs(earlier - earlier[:1]).max() / jnp.abs(earlier).max())

    # Relative to the logits' size: top-k moves earlier logits (by 1.7% here, both documents)
    # far above float32 rounding; causal routing moves none (a few ulps allowed).
    self.assertGreater(spread(model), 1e-3)
    self.assertLess(spread(variant), 1e-6)
    # One document per row (_tokens(t=10)), as cached decoding sees it.
    self.assertEqual(_model_and_params(causal_routing=True)[0].cfg, variant.cfg)
    np.testing.assert_allclose(_forward(causal_routing=True)[0], _decoded()[0], atol=2e-5,
                               rtol=1e-4)


class DecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('expert', dict(causal_routing=True)),
      ('expert_kv_sharing', dict(causal_routing=True, kv_sharing=True)),
      ('expert_aux_router', dict(causal_routing=True, sampling='aux_router')),
      ('token_choice', dict(router='token_choice', router_func='softmax', alpha=1.0)),
  )
  def test_cached_decoding_equals_forward(self, kw):
    full, aux = _forward(**kw)
    depth = np.asarray(aux['depth'])
    self.assertGreater(len(np.unique(depth)), 1)  # routing really varies per token
    logits, cache = _decoded(**kw)
    assert_close(logits, full, FORWARD_RTOL)
    np.testing.assert_array_equal(cache['depth'][:, :10], depth)

  def test_generate_matches_forward_argmax(self):
    model, params = _model_and_params(causal_routing=True)
    prompts = _tokens(t=5)
    out = decode.generate(model, params, prompts, 5, decode.SamplingConfig(greedy=True),
                          jax.random.PRNGKey(0))
    seq = jnp.concatenate([prompts, out.tokens], axis=1)  # (2, 10): _forward's program
    logits, _ = _jit_apply(causal_routing=True)({'params': params}, seq)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(logits[:, 4:9], -1))

  def test_generate_with_loss_free_router_state(self):
    model, params = _model_and_params(**mor_tiny.token_choice(balancing='loss_free'))
    variables = {'params': params, 'router_state': {'bias': jnp.array([0.0, 5.0, 0.0])}}
    prompts = _tokens(t=5)
    out = decode.generate(model, variables, prompts, 4, decode.SamplingConfig(greedy=True),
                          jax.random.PRNGKey(0))
    seq = jnp.concatenate([prompts, out.tokens], axis=1)
    logits, aux = jax.jit(model.apply)(variables, seq)
    np.testing.assert_array_equal(aux['depth'], 2)  # the bias sends every token to depth 2
    np.testing.assert_array_equal(out.tokens, jnp.argmax(logits[:, 4:8], -1))


class TrainingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('expert_aux_router_mlp', dict(sampling='aux_router', router_type='mlp', z_loss=True)),
      ('token_choice', mor_tiny.token_choice()),
  )
  def test_gradients_reach_every_router(self, kw):
    model, params = _model_and_params(**kw)
    tokens = _tokens()

    def loss(p):
      logits, aux = model.apply({'params': p}, tokens[:, :-1], train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      return ce + sum(aux['losses'].values())

    grads = jax.jit(jax.grad(loss))(params)
    routers = [k for k in grads if 'router' in k]
    self.assertNotEmpty(routers)
    for name in routers:
      self.assertGreater(float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))), 0,
                         name)

  def test_capacity_warmup_follows_the_training_step(self):
    model, params = _model_and_params(num_recursions=3, cap_warmup_step=10)
    apply = jax.jit(lambda step: model.apply({'params': params}, _tokens(), train=True,
                                             step=step)[1]['depth'])
    np.testing.assert_array_equal(apply(0), 3)  # every token at every recursion
    for r, k in enumerate(model.cfg.top_ks(12)):  # targets after warm-up
      np.testing.assert_array_equal((apply(10) > r).sum(1), [k, k])

  def test_loss_free_bias_follows_the_load_and_gets_no_gradient(self):
    model, params = _model_and_params(**mor_tiny.token_choice(balancing='loss_free',
                                                              bias_update_rate=0.05))
    params = dict(params, router={'proj': {'kernel': 100 * params['router']['proj']['kernel']}})
    tokens = _tokens()

    @jax.jit
    def step(bias):
      (_, aux), new = model.apply({'params': params, 'router_state': {'bias': bias}}, tokens,
                                  train=True, mutable=['router_state'])
      return aux, new['router_state']['bias']

    bias = jnp.array([0.3, 0.0, 0.0])  # skewed towards one recursion
    loads = []
    for _ in range(6):
      aux, new_bias = step(bias)
      load = np.bincount(np.asarray(aux['depth']).ravel() - 1, minlength=3) / tokens.size
      assert_close(new_bias, bias + 0.05 * np.sign(1 / 3 - load), ELEMENTWISE_RTOL)
      self.assertNotIn('mor_balance', aux['losses'])
      loads.append(load.max())
      bias = new_bias
    self.assertGreater(loads[0], 0.9)
    self.assertLess(np.mean(loads[-3:]), 0.7)

    def ce(bias):
      logits, _ = model.apply({'params': params, 'router_state': {'bias': bias}},
                              tokens[:, :-1], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    np.testing.assert_array_equal(jax.jit(jax.grad(ce))(bias), 0.0)

  def test_sharded_train_step_matches_single_device(self):
    config = tiny_config()
    # One shared layer, twice (cycle; the ends are vanilla DecoderBlocks, whose sharding
    # test_train.ShardingTest covers): routers, shared layer, z-loss and warm-up on a mesh.
    config.model = mor_tiny.mor_model(**{**config.model.to_dict(), 'num_layers': 2,
                                         'num_recursions': 2, 'sharing': 'cycle',
                                         'z_loss': True,
                                         'cap_warmup_step': 3})  # steps 0, 1: warming up
    batch = test_train._random_batch(config)
    p1, m1, _, before = test_train._one_step(config, (1, 1, 1), batch)
    p8, m8, _, _ = test_train._one_step(config, (2, 2, 2), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m8['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    self.assertIn('train/aux/mor_sampling', m8)
    self.assertIn('train/aux/mor_z', m8)
    assert_update_close(p8, p1, before)


class FlopsTest(absltest.TestCase):

  def _tree(self, model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
        'params']

  def test_recursive_counts_shared_layers_once_per_loop(self):
    cfg = recursive.RecursiveConfig(**{**_SMALL, 'num_layers': 4}, num_loops=2, lora_rank=2)
    tree = self._tree(recursive.Recursive(cfg))
    _, non_emb = count_params(tree)  # unique: 2 layers, 4 LoRAs, final norm
    self.assertEqual(layers.decoder_block_params(cfg), count_params(tree['layers_0'])[0])
    applied = non_emb + 2 * layers.decoder_block_params(cfg)  # second loop of each layer
    attn = 4 * 12 * 4 * 8 * 16
    self.assertEqual(budget.analytic_flops_per_token(cfg, non_emb, 16),
                     6 * (applied + 64 * 32) + attn)

  def test_mor_counts_expected_applications(self):
    cfg = _cfg(num_layers=4, num_recursions=2, capacity=(1.0, 0.5))  # 1 + 1 + 1 layers
    block = count_params(self._tree(mor.MoR(cfg))['first'])[0]
    applied = (2 + 1.5) * block + 32 + 2 * 32  # ends, 1 + 1/2 recursion, final norm, routers
    attn = (2 + 1 + 0.25) * 12 * 4 * 8 * 16  # recursion-wise caching: capacity squared
    self.assertEqual(budget.analytic_flops_per_token(cfg, None, 16),
                     6 * (applied + 64 * 32) + attn)

  def test_llama_formula_unchanged(self):
    cfg = layers.ModelConfig(**_SMALL)
    self.assertEqual(budget.analytic_flops_per_token(cfg, 1000, 16),
                     6 * (1000 + 64 * 32) + 5 * 12 * 4 * 8 * 16)


class ReproTest(absltest.TestCase):

  def test_tiny_isoflop_run_writes_table_and_plot(self):
    config = mor_isoflop.get_config()
    config.base.data.update(seq_len=32, batch_size=8, max_docs=20, shuffle_buffer=4)
    config.base.train.eval_batches = 1
    shape = dict(embed_dim=16, num_layers=3, num_heads=2, num_kv_heads=1, mlp_dim=32)
    config.variants = {'vanilla': config.variants.vanilla, 'mor_token_3':
                       config.variants.mor_token_3}
    for model in config.variants.values():
      model.update(shape)
    # + its router_state in the state; one shared layer applied up to 3 times (cycle).
    config.variants.mor_token_3.update(balancing='loss_free', sharing='cycle')
    config.flop_budget = 2 * repro_mor.train_flops_per_token(
        build_model(config.variants.vanilla), 32) * 8 * 32
    workdir = self.create_tempdir().full_path
    rows = {r['model']: r for r in repro_mor.run(config, workdir)}
    self.assertEqual(sorted(rows), ['mor_token_3', 'vanilla'])
    self.assertEqual(rows['vanilla']['steps'], 2)
    self.assertGreaterEqual(rows['mor_token_3']['steps'], 2)  # fewer FLOPs per token
    self.assertLess(rows['mor_token_3']['unique_params_non_embedding'],
                    rows['vanilla']['unique_params_non_embedding'])
    # A trained workdir loads with its router state and serves on the depth-wise engine.
    model, variables = ckpt_lib.load_model(os.path.join(workdir, 'mor_token_3'))
    self.assertIsInstance(model, mor.MoR)
    self.assertEqual(variables['router_state']['bias'].shape, (3,))
    prompts = [[5, 6, 7], [8, 9, 10]]
    outputs, _ = mor_engine.MoREngine(model.cfg, variables, 1, 8).run(
        [Request(p, 4) for p in prompts])
    solo = decode.generate(model, variables, jnp.asarray(prompts), 4,
                           decode.SamplingConfig(greedy=True), jax.random.PRNGKey(0))
    self.assertEqual(outputs, np.asarray(solo.tokens).tolist())
    for name in ('mor_isoflop.md', 'mor_isoflop.json', 'mor_isoflop.png'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)


if __name__ == '__main__':
  absltest.main()
