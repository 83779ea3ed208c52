"""Recursive / Relaxed Recursive Transformers: sharing, conversion, LoRA, cache, early exit."""
import dataclasses
import json
import os
import shutil
import tempfile

from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model import conversion, decode, recursive
from model.layers import ModelConfig
from model.llama import Llama
from model.registry import build_model
from training import optim
from training import uptrain
from training.train import count_params
from configs import base, recursive_tiny
from tests.utils import F32_EPS, FORWARD_RTOL, assert_close, tiny_config

VANILLA = ModelConfig(vocab_size=64, embed_dim=16, num_layers=6, num_heads=2, num_kv_heads=1,
                      mlp_dim=32, tie_embeddings=False)
FULL_RANK = 32  # >= min(in, out) of every projection above.


def _rec_cfg(**fields):
  values = dict(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                mlp_dim=32, tie_embeddings=False)
  values.update(fields)
  return recursive.RecursiveConfig(**values)


def _vanilla_params(cfg=VANILLA, seed=0):
  params = Llama(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))['params']
  # Distinct norm scales per layer, so that shared vs per-loop norms matter.
  params = nn.meta.unbox(params)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
      if 'norm' in jax.tree_util.keystr(p) else x, params)


def _tokens(batch=2, length=7, seed=3):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 64)


class SharingTest(parameterized.TestCase):

  @parameterized.parameters(
      ('cycle', 9, [0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2]),
      ('sequence', 9, [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2, 0, 1, 2]),
      ('middle_cycle', 11, [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4],
       [None, 0, 0, 0, 1, 1, 1, 2, 2, 2, None]),
      ('middle_sequence', 11, [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4],
       [None, 0, 1, 2, 0, 1, 2, 0, 1, 2, None]),
  )
  def test_layer_plan(self, sharing, num_layers, unique, loops):
    cfg = _rec_cfg(num_layers=num_layers, num_loops=3, sharing=sharing)
    plan = recursive.layer_plan(cfg)
    self.assertEqual([p[0] for p in plan], unique)
    self.assertEqual([p[1] for p in plan], loops)
    self.assertEqual(cfg.num_unique_layers, max(unique) + 1)

  def test_exit_layers(self):
    self.assertEqual(recursive.exit_layers(_rec_cfg(num_layers=9, num_loops=3)), [2, 5, 8])
    self.assertEqual(recursive.exit_layers(
        _rec_cfg(num_layers=8, num_loops=3, sharing='middle_cycle')), [2, 4, 7])

  def test_bad_configs_raise(self):
    with self.assertRaisesRegex(ValueError, 'not divisible'):
      _rec_cfg(num_layers=9, num_loops=2)
    with self.assertRaisesRegex(ValueError, 'sharing'):
      _rec_cfg(sharing='zigzag')
    with self.assertRaisesRegex(ValueError, 'lora_ranks'):
      _rec_cfg(lora_ranks={'qq': 2})

  @parameterized.parameters(
      dict(sharing='middle_cycle', num_layers=8, lora_rank=2, ln_share=False,
           early_exit='weighted', exit_distill=0.5),
      dict(sharing='sequence', num_layers=6, early_exit='aggressive'))
  def test_scanned_loops_equal_unrolled(self, **fields):
    """scan_layers compiles the loops as one lax.scan: same parameters, outputs, exits,
    losses and gradients as the unrolled layers."""
    cfg = _rec_cfg(num_loops=3, init_std=0.2, **fields)
    tokens = _tokens()

    def run(scan):
      model = recursive.Recursive(dataclasses.replace(cfg, scan_layers=scan))
      def f(p):
        logits, aux = model.apply(p, tokens, targets=tokens, loss_mask=jnp.ones_like(tokens),
                                  return_exits=True)
        return sum(aux['losses'].values()) + 1e-2 * jnp.sum(aux['exit_logits'] ** 2), aux
      return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    params = recursive.Recursive(cfg).init(jax.random.PRNGKey(0), tokens)
    (loss0, aux0), grads0 = run(False)
    (loss1, aux1), grads1 = run(True)
    assert_close(aux1['exit_logits'], aux0['exit_logits'], FORWARD_RTOL)
    assert_close(loss1, loss0, FORWARD_RTOL)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    assert_close(flat(grads1), flat(grads0), FORWARD_RTOL)

  def test_unique_parameters_only(self):
    """Params, optimizer state (checkpointed state) hold L/B layers, not L."""
    cfg = _rec_cfg(num_layers=6, num_loops=3)
    params = nn.meta.unbox(recursive.Recursive(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])
    two_layer = nn.meta.unbox(Llama(ModelConfig(**{**VANILLA.__dict__, 'num_layers': 2})).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])
    self.assertEqual(sorted(params), ['embedder', 'final_norm', 'layers_0', 'layers_1'])
    self.assertEqual(count_params(params), count_params(two_layer))
    tx, _ = optim.make_optimizer(base.train_config())
    opt_leaves = sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim)
    self.assertEqual(opt_leaves, 2 * count_params(params)[0])

  def test_registry_and_per_module_ranks(self):
    model_cfg = ml_collections.ConfigDict(dict(
        name='recursive', vocab_size=64, embed_dim=16, num_layers=4, num_heads=2,
        num_kv_heads=1, mlp_dim=32, lora_rank=2, lora_ranks={'down': 0, 'q': 3}))
    model = build_model(model_cfg)
    self.assertIsInstance(model, recursive.Recursive)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
    lora = nn.meta.unbox(params['lora_0'])
    self.assertNotIn('down', lora)
    self.assertEqual(lora['q']['a'].shape, (16, 3))
    self.assertEqual(lora['o']['a'].shape, (2, 8, 2))


class ConversionTest(parameterized.TestCase):

  @parameterized.parameters(
      ('stepwise', 'ends', [[0], [4], [8]]),
      ('stepwise', 'start', [[0], [3], [6]]),
      ('lower', 'ends', [[0], [1], [2]]),
      ('upper', 'ends', [[6], [7], [8]]),
      ('average', 'ends', [[0, 3, 6], [1, 4, 7], [2, 5, 8]]),
      ('random', 'ends', [[], [], []]),
  )
  def test_sources_cycle_l9_b3(self, init, stepwise, expected):
    cfg = _rec_cfg(num_layers=9, num_loops=3)
    self.assertEqual(conversion.init_sources(9, cfg, init, stepwise), expected)

  def test_sources_sequence_average(self):
    cfg = _rec_cfg(num_layers=9, num_loops=3, sharing='sequence')
    self.assertEqual(conversion.init_sources(9, cfg, 'average'),
                     [[0, 1, 2], [3, 4, 5], [6, 7, 8]])

  def test_sources_middle(self):
    cfg = _rec_cfg(num_layers=8, num_loops=3, sharing='middle_cycle')  # 1 + 2 + 1 unique.
    self.assertEqual(conversion.init_sources(8, cfg, 'stepwise'), [[0], [1], [6], [7]])
    self.assertEqual(conversion.init_sources(8, cfg, 'lower'), [[0], [1], [2], [7]])
    self.assertEqual(conversion.init_sources(8, cfg, 'upper'), [[0], [5], [6], [7]])
    self.assertEqual(conversion.init_sources(8, cfg, 'average'),
                     [[0], [1, 3, 5], [2, 4, 6], [7]])

  def test_non_divisible(self):
    """L=10, B=3: B'=3, keep round(linspace(0, 9, 9)) (half to even)."""
    v = ModelConfig(**{**VANILLA.__dict__, 'num_layers': 10})
    cfg = conversion.recursive_config(v, 3)
    self.assertEqual(cfg.num_layers, 9)
    self.assertEqual(conversion.kept_layers(10, cfg), [0, 1, 2, 3, 4, 6, 7, 8, 9])
    self.assertEqual(conversion.init_sources(10, cfg, 'stepwise'), [[0], [4], [9]])
    self.assertEqual(conversion.init_sources(10, cfg, 'average'),
                     [[0, 3, 7], [1, 4, 8], [2, 6, 9]])
    mid = conversion.recursive_config(ModelConfig(**{**VANILLA.__dict__, 'num_layers': 9}), 3,
                                      'middle_cycle')
    self.assertEqual(conversion.kept_layers(9, mid), [0, 1, 2, 3, 5, 6, 7, 8])

  def test_average_values(self):
    params = _vanilla_params()
    cfg = conversion.recursive_config(VANILLA, 2, 'sequence')
    out = conversion.convert_params(params, VANILLA, cfg, 'average')
    want = (params['layers_2']['mlp']['up']['kernel'] +
            params['layers_3']['mlp']['up']['kernel']) / 2
    np.testing.assert_allclose(out['layers_1']['mlp']['up']['kernel'], want, rtol=1e-6)
    np.testing.assert_allclose(out['layers_1']['attn_norm']['scale'],
                               (params['layers_2']['attn_norm']['scale'] +
                                params['layers_3']['attn_norm']['scale']) / 2, rtol=1e-6)

  def test_svd_lora_truncation(self):
    w = np.random.default_rng(0).normal(size=(6, 2, 3))
    a, b = conversion.svd_lora(w, 1, 2)
    approx = np.tensordot(a, b, axes=1).reshape(6, 6)
    u, s, vt = np.linalg.svd(w.reshape(6, 6))
    assert_close(approx, (u[:, :2] * s[:2]) @ vt[:2], 16 * F32_EPS)  # float32 factors, rank 2


class RelaxationTest(parameterized.TestCase):

  @parameterized.parameters('cycle', 'sequence', 'middle_cycle', 'middle_sequence')
  def test_full_rank_equals_original(self, sharing):
    params = _vanilla_params()
    ref, _ = Llama(VANILLA).apply({'params': params}, _tokens())
    cfg = conversion.recursive_config(VANILLA, 2, sharing, lora_rank=FULL_RANK, ln_share=False)
    out, _ = recursive.Recursive(cfg).apply(
        {'params': conversion.convert_params(params, VANILLA, cfg, 'average')}, _tokens())
    assert_close(out, ref, FORWARD_RTOL)

  def test_rank_zero_equals_recursive(self):
    params = _vanilla_params()
    plain = conversion.recursive_config(VANILLA, 3)
    plain_params = conversion.convert_params(params, VANILLA, plain, 'stepwise')
    ref, _ = recursive.Recursive(plain).apply({'params': plain_params}, _tokens())
    zero = conversion.recursive_config(VANILLA, 3, lora_rank=0, lora_ranks={'q': 0})
    out, _ = recursive.Recursive(zero).apply(
        {'params': conversion.convert_params(params, VANILLA, zero, 'stepwise')}, _tokens())
    np.testing.assert_array_equal(out, ref)
    # A fresh LoRA (B = 0) on the same shared weights is the plain model too.
    relaxed = conversion.recursive_config(VANILLA, 3, lora_rank=4)
    fresh = nn.meta.unbox(recursive.Recursive(relaxed).init(jax.random.PRNGKey(1), _tokens()))
    fresh = {**fresh['params'], **plain_params}
    out, _ = recursive.Recursive(relaxed).apply({'params': fresh}, _tokens())
    assert_close(out, ref, FORWARD_RTOL)

  def test_partial_rank_between(self):
    params = _vanilla_params()
    ref, _ = Llama(VANILLA).apply({'params': params}, _tokens())
    errors = []
    for rank in (0, 4, FULL_RANK):
      cfg = conversion.recursive_config(VANILLA, 2, lora_rank=rank, ln_share=False)
      out, _ = recursive.Recursive(cfg).apply(
          {'params': conversion.convert_params(params, VANILLA, cfg, 'average')}, _tokens())
      errors.append(float(jnp.abs(out - ref).max()))
    self.assertGreater(errors[0], errors[1])
    self.assertGreater(errors[1], errors[2])


class DecodeTest(parameterized.TestCase):

  @parameterized.parameters('cycle', 'middle_sequence')
  def test_cached_decode_equals_full_forward(self, sharing):
    cfg = conversion.recursive_config(VANILLA, 2, sharing, lora_rank=2, ln_share=False)
    model = recursive.Recursive(cfg)
    params = conversion.convert_params(_vanilla_params(), VANILLA, cfg, 'average')
    tokens = _tokens(length=8)
    apply = jax.jit(model.apply)
    full, _ = apply({'params': params}, tokens)
    cache = model.init_cache(2, 8)
    pos = jnp.broadcast_to(jnp.arange(8), tokens.shape)
    first, aux = apply({'params': params}, tokens[:, :5], positions=pos[:, :5], cache=cache)
    self.assertLen(aux['cache']['k'], cfg.num_layers)
    steps = [first]
    cache = aux['cache']
    for t in range(5, 8):
      logits, aux = apply({'params': params}, tokens[:, t:t + 1], positions=pos[:, t:t + 1],
                          cache=cache)
      cache = aux['cache']
      steps.append(logits)
    assert_close(jnp.concatenate(steps, axis=1), full, FORWARD_RTOL)

  def test_generate_greedy(self):
    cfg = conversion.recursive_config(VANILLA, 3)
    model = recursive.Recursive(cfg)
    params = conversion.convert_params(_vanilla_params(), VANILLA, cfg, 'stepwise')
    prompts = _tokens(length=4)
    out = decode.generate(model, params, prompts, 3, decode.SamplingConfig(greedy=True),
                          jax.random.PRNGKey(0))
    seq = prompts
    for _ in range(3):
      logits, _ = jax.jit(model.apply)({'params': params}, seq)
      seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1:], axis=-1)], axis=1)
    np.testing.assert_array_equal(out.tokens, seq[:, 4:])


class EarlyExitTest(parameterized.TestCase):

  @parameterized.parameters(('weighted', [1 / 3, 2 / 3]), ('aggressive', [0.1, 0.1]))
  def test_losses_by_hand(self, mode, weights):
    cfg = conversion.recursive_config(VANILLA, 3, early_exit=mode, exit_distill=0.5)
    self.assertEqual(recursive.exit_weights(cfg), weights + [1.0])
    model = recursive.Recursive(cfg)
    params = conversion.convert_params(_vanilla_params(), VANILLA, cfg, 'average')
    tokens, targets = _tokens(), _tokens(seed=4)
    mask = np.ones(tokens.shape, np.float32)
    mask[0, :3] = 0
    logits, aux = model.apply({'params': params}, tokens, targets=targets, loss_mask=mask,
                              return_exits=True)
    exits = np.asarray(aux['exit_logits'], np.float64)
    np.testing.assert_array_equal(exits[-1], logits)
    # Exit 0 equals a one-loop model with the same shared block.
    one_loop = recursive.RecursiveConfig(**{**cfg.__dict__, 'num_layers': 2, 'num_loops': 1})
    assert_close(exits[0], recursive.Recursive(one_loop).apply({'params': params}, tokens)[0],
                 FORWARD_RTOL)
    logp = exits - np.log(np.exp(exits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.asarray(targets)[None, ..., None], -1)[..., 0]
    kl = (np.exp(logp[-1]) * (logp[-1] - logp)).sum(-1)
    avg = lambda v: (v * mask).sum() / mask.sum()
    self.assertAlmostEqual(float(aux['losses']['exit_ce']),
                           sum(w * avg(ce[i]) for i, w in enumerate(weights)), places=4)
    self.assertAlmostEqual(float(aux['losses']['exit_kd']),
                           0.5 * sum(w * avg(kl[i]) for i, w in enumerate(weights)), places=4)

  def test_no_exit_losses_without_targets(self):
    cfg = conversion.recursive_config(VANILLA, 2, early_exit='aggressive')
    params = conversion.convert_params(_vanilla_params(), VANILLA, cfg, 'lower')
    _, aux = recursive.Recursive(cfg).apply({'params': params}, _tokens())
    self.assertEqual(aux['losses'], {})

  def test_confidence_exit(self):
    exits = jnp.log(jnp.array([
        [[0.5, 0.5], [0.95, 0.05], [0.5, 0.5]],
        [[0.9, 0.1], [0.5, 0.5], [0.6, 0.4]],
        [[0.2, 0.8], [0.3, 0.7], [0.4, 0.6]]]))  # [loops=3, tokens=3, V=2]
    loop, logits = recursive.confidence_exit(exits, 0.85)
    np.testing.assert_array_equal(loop, [1, 0, 2])
    np.testing.assert_array_equal(logits, exits[jnp.array([1, 0, 2]), jnp.arange(3)])  # a gather


class UptrainTest(absltest.TestCase):
  """The repro_relaxed_recursive job in miniature, then the uptrain job chain from the vanilla
  it pretrained (one pretraining, one model shape for both)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from configs.repro import relaxed_recursive  # pylint: disable=g-import-not-at-top
    from training import repro_recursive  # pylint: disable=g-import-not-at-top
    config = relaxed_recursive.get_config()
    small = tiny_config()
    config.model.update(embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
    config.data = small.data
    config.train.update(eval_batches=1, async_checkpointing=False)
    config.repro.update(layers=4, pretrain_steps=2, uptrain_steps=1, post_steps=1,
                        initializations=('stepwise',), lora_ranks=(2,))
    cls.root = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, cls.root)
    cls.repro_dir = os.path.join(cls.root, 'repro')
    cls.report = repro_recursive.run(config, cls.repro_dir)

  def test_repro_tiny(self):
    self.assertEqual(len(self.report['exits_after_post_training']), 2)
    self.assertIn('relaxed_average_r2', self.report['eval_loss'])
    for name in ('results.json', 'results.md', 'results.png'):
      self.assertTrue(os.path.exists(os.path.join(self.repro_dir, name)))

  def test_pretrain_uptrain_posttrain(self):
    """Vanilla (4 layers, the repro's) -> relaxed 2x2 with KD -> early-exit post-training,
    exits only."""
    root = self.root
    vanilla = tiny_config()
    vanilla.train.steps = 2

    config = recursive_tiny.get_config()
    config.model = recursive_tiny.recursive_model_config(lora_rank=2)
    config.data, config.train = vanilla.data, vanilla.train
    config.uptrain.update(source=f'{self.repro_dir}/vanilla', distill=1.0)
    config.train.trainable = ''
    rec_config, params, extra = uptrain.prepare(config)
    self.assertEqual(rec_config.model.num_layers, 4)
    self.assertEqual(sorted(k for k in params if k.startswith('layers')),
                     ['layers_0', 'layers_1'])
    out = uptrain.uptrain(config, f'{root}/rec')
    self.assertIn('lora_3', out['state']['params'])
    metrics = [json.loads(line) for line in open(f'{root}/rec/metrics.jsonl')]
    self.assertTrue(any('train/aux/kd' in m for m in metrics))

    post = recursive_tiny.get_config()
    post.model = recursive_tiny.recursive_model_config(early_exit='aggressive',
                                                       exit_distill=1.0)
    post.data, post.train = vanilla.data, vanilla.train
    post.train.trainable = 'lora_[01]/'  # Only the first loop's LoRA trains.
    post.uptrain.source = f'{root}/rec'
    before = uptrain.load_source(f'{root}/rec')[1]
    after = uptrain.uptrain(post, f'{root}/post')['state']['params']
    np.testing.assert_array_equal(after['layers_0']['mlp']['up']['kernel'],
                                  before['layers_0']['mlp']['up']['kernel'])
    np.testing.assert_array_equal(after['lora_3']['q']['a'], before['lora_3']['q']['a'])
    self.assertFalse(np.array_equal(after['lora_0']['q']['b'], before['lora_0']['q']['b']))


if __name__ == '__main__':
  absltest.main()
