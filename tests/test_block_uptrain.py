"""Block Transformer uptraining (arXiv:2406.02657): conversion from a vanilla checkpoint
(model.block_conversion) and the uptrain job for model.name='block'."""
import dataclasses
import functools
import json

from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import block_uptrain_tiny
from model import block_conversion, param_layout
from model.block_transformer import BlockTransformer
from model.layers import ModelConfig
from model.llama import Llama
from model.registry import build_model
from training import data as data_lib
from training import losses, tokenizers, train, uptrain
from tests.utils import FORWARD_RTOL, assert_close, tiny_config

VANILLA = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                      mlp_dim=32, tie_embeddings=False)


def _vanilla_params(cfg=VANILLA):
  return nn.meta.unbox(Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
                       ['params'])


class ConversionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # (split, source depth, block_layers, token_layers, expected sources, source scanned,
      #  target scanned)
      ('partition', 'partition', 4, 1, 3, ([0], [1, 2, 3]), True, False),
      ('skip', 'skip', 4, 2, 2, ([0, 2], [0, 2]), False, True),
      ('duplicate', 'duplicate', 2, 2, 2, ([0, 1], [0, 1]), False, False),
  )
  def test_copies_the_right_layers(self, split, depth, b, t, sources, scanned_source,
                                   scanned_target):
    src_cfg = dataclasses.replace(VANILLA, num_layers=depth, scan_layers=scanned_source)
    loop = _vanilla_params(dataclasses.replace(src_cfg, scan_layers=False))
    source = param_layout.stack_layers(loop) if scanned_source else loop
    cfg = block_conversion.block_config(src_cfg, split, block_len=4, block_layers=b,
                                        token_layers=t, scan_layers=scanned_target)
    converted = block_conversion.convert_params(source, src_cfg, cfg, split=split)
    # The block model of these shapes takes this tree (traced, not compiled).
    logits, _ = jax.eval_shape(BlockTransformer(cfg).apply, {'params': converted},
                               jnp.zeros((1, 8), jnp.int32))
    self.assertEqual(logits.shape, (1, 8, 64))
    out = converted
    if scanned_target:
      out = param_layout.unstack_layers(param_layout.unstack_layers(out, b, 'block_layers'),
                                        t, 'token_layers')
    for prefix, src in zip(('block_layers', 'token_layers'), sources):
      self.assertLen([k for k in out if k.startswith(prefix)], len(src))
      for i, s in enumerate(src):
        np.testing.assert_array_equal(out[f'{prefix}_{i}']['attn']['q']['kernel'],
                                      loop[f'layers_{s}']['attn']['q']['kernel'])
        np.testing.assert_array_equal(out[f'{prefix}_{i}']['mlp_norm']['scale'],
                                      loop[f'layers_{s}']['mlp_norm']['scale'])
    for path in (('embedder', 'embed', 'embedding'), ('embedder', 'lm_head', 'kernel'),
                 ('final_norm', 'scale')):
      np.testing.assert_array_equal(_get(out, path), _get(loop, path))
    self.assertEqual(out['block_embed']['embedding'].shape, (64, 16 // 4))
    np.testing.assert_array_equal(out['block_norm']['scale'], np.ones(16))

  def test_identity_prefix_and_zero_start_token(self):
    """Prefix decoder: every prefix vector of block i equals its context: the block
    decoder's (normed) output for block i - 1, the start context for block 0."""
    vanilla = dataclasses.replace(VANILLA, num_layers=2)
    cfg = block_conversion.block_config(vanilla, block_len=4, block_layers=1, token_layers=1,
                                        expansion_ratio=3)
    params = block_conversion.convert_params(_vanilla_params(vanilla), vanilla, cfg,
                                             jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 64)
    _, state = jax.jit(functools.partial(
        BlockTransformer(cfg).apply, capture_intermediates=True, mutable='intermediates'))(
            {'params': params}, tokens)
    prefix = state['intermediates']['prefix_proj']['__call__'][0]  # [B, N + 1, r, W]
    context = state['intermediates']['block_norm']['__call__'][0]  # [B, N, W]
    self.assertEqual(prefix.shape, (2, 4, 3, 16))
    start = np.broadcast_to(params['start_context'], (2, 1, 3, 16))
    assert_close(prefix[:, :1], start, FORWARD_RTOL)
    assert_close(prefix[:, 1:], np.repeat(context[:, :, None], 3, axis=2), FORWARD_RTOL)

    summation = block_conversion.block_config(vanilla, block_len=4, block_layers=1,
                                              token_layers=1, token_decoder='summation')
    params = block_conversion.convert_params(_vanilla_params(vanilla), vanilla, summation)
    np.testing.assert_array_equal(params['start_token'], np.zeros(16))
    self.assertNotIn('context_proj', params)

  def test_depth_and_width_errors(self):
    with self.assertRaisesRegex(ValueError, r'model.block_layers=2 and config.model.'
                                r'token_layers=3 .* source depth 4'):
      block_conversion.block_config(VANILLA, block_len=4, block_layers=2, token_layers=3)
    with self.assertRaisesRegex(ValueError, r'block_layers=0 and .*token_layers=2 \(depths 4 '
                                r"and 2.*layer_split='skip'"):
      block_conversion.block_config(VANILLA, 'skip', block_len=4, token_layers=2)
    with self.assertRaisesRegex(ValueError, 'model.token_embed_dim=8 must be 0 or'):
      block_conversion.block_config(VANILLA, block_len=4, block_layers=2, token_layers=2,
                                    token_embed_dim=8)
    with self.assertRaisesRegex(ValueError, 'model.embed_dim=32 differs from the source'):
      block_conversion.block_config(VANILLA, block_len=4, block_layers=2, token_layers=2,
                                    embed_dim=32)
    with self.assertRaisesRegex(ValueError, 'layer_split'):
      block_conversion.block_config(VANILLA, 'middle', block_len=4)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


class UptrainJobTest(absltest.TestCase):

  def test_uptrain_from_vanilla_workdir(self):
    """A vanilla trained a few steps -> block (partition 1 + 1) with distillation: the job's
    first loss is the converted model's, far below a fresh block model's (~log V)."""
    root = self.create_tempdir().full_path
    vanilla = tiny_config(num_layers=2)
    vanilla.train.update(steps=12, checkpoint_every=12)
    train.train_and_evaluate(vanilla, f'{root}/vanilla')

    config = block_uptrain_tiny.get_config()
    config.data, config.train = vanilla.data, vanilla.train
    config.data.block_len = 4
    config.train.steps = 2
    config.model.update(block_layers=1, token_layers=2)
    config.uptrain.source = f'{root}/vanilla'
    with self.assertRaisesRegex(ValueError, 'model.block_layers=1 .*token_layers=2'):
      uptrain.prepare(config)
    config.model.token_layers = 1
    config.data.block_len = 0
    with self.assertRaisesRegex(ValueError, 'data.block_len=0 must equal'):
      uptrain.prepare(config)
    config.data.block_len = 4

    config.train.checkpoint_every = 2
    out = uptrain.uptrain(config, f'{root}/block')
    self.assertEqual(out['step'], 2)
    saved = json.load(open(f'{root}/block/config.json'))['model']
    self.assertEqual((saved['name'], saved['embed_dim'], saved['block_layers']), ('block', 32, 1))
    first = [json.loads(line) for line in open(f'{root}/block/metrics.jsonl')][0]
    self.assertGreater(first['train/aux/kd'], 0.0)  # KL(teacher || block model) at step 1

    # A fresh initialisation of the same block model on the job's first batch.
    model = build_model(ml_collections.ConfigDict(saved))
    tokenizer = tokenizers.make_tokenizer(config.tokenizer, save=False)
    batch = next(iter(data_lib.make_dataset(config.data, tokenizer, 'train', seed=config.seed)))

    @jax.jit
    def fresh_loss(rng):
      logits, _ = model.apply(model.init(rng, batch['tokens'][:1]), batch['tokens'],
                              positions=batch['positions'], segment_ids=batch['segment_ids'])
      ce, _, n = losses.cross_entropy_sums(logits, batch['targets'], batch['loss_mask'])
      return ce / n

    fresh = float(fresh_loss(jax.random.PRNGKey(1)))
    self.assertAlmostEqual(fresh, np.log(259), delta=0.2)  # near-uniform predictions
    self.assertLess(first['train/loss'], fresh - 0.5)

if __name__ == '__main__':
  absltest.main()
