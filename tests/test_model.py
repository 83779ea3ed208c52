"""Llama model: layouts, packing isolation, precision, logical axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from model import attention, param_layout
from model.layers import ModelConfig
from model.llama import Llama
from tests.utils import BF16_EPS, FORWARD_RTOL, assert_close

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)


def _init(cfg, tokens):
  return nn.meta.unbox(Llama(cfg).init(jax.random.key(0), tokens))['params']


class LlamaTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)

  def test_scan_equals_loop_with_the_same_weights(self):
    params = _init(CFG, self.tokens)
    scan_cfg = ModelConfig(**{**vars(CFG), 'scan_layers': True})
    stacked = param_layout.stack_layers(params)
    loop_logits, _ = Llama(CFG).apply({'params': params}, self.tokens)
    scan_logits, _ = Llama(scan_cfg).apply({'params': stacked}, self.tokens)
    assert_close(loop_logits, scan_logits, FORWARD_RTOL)

  def test_packed_documents_do_not_see_each_other(self):
    params = _init(CFG, self.tokens)
    segment_ids = jnp.array([[1] * 5 + [2] * 7] * 2)
    positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    logits, _ = Llama(CFG).apply({'params': params}, self.tokens, positions=positions,
                                 segment_ids=segment_ids)
    alone, _ = Llama(CFG).apply({'params': params}, self.tokens[:, 5:])
    assert_close(logits[:, 5:], alone, FORWARD_RTOL)
    changed = self.tokens.at[:, :5].set((self.tokens[:, :5] + 1) % CFG.vocab_size)
    logits2, _ = Llama(CFG).apply({'params': params}, changed, positions=positions,
                                  segment_ids=segment_ids)
    assert_close(logits[:, 5:], logits2[:, 5:], FORWARD_RTOL)

  def test_bfloat16_compute_tracks_float32(self):
    params = _init(CFG, self.tokens)
    f32, _ = Llama(CFG).apply({'params': params}, self.tokens)
    bf16, _ = Llama(ModelConfig(**{**vars(CFG), 'dtype': 'bfloat16'})).apply(
        {'params': params}, self.tokens)
    self.assertEqual(bf16.dtype, jnp.float32)  # Logits leave the model in float32.
    # Each bfloat16 rounding moves a value by <= eps/2 relative; a logit passes about 8 of them.
    assert_close(bf16, f32, 4 * BF16_EPS)
    self.assertEqual(jax.tree.leaves(params)[0].dtype, jnp.float32)

  def test_every_parameter_has_logical_axis_names(self):
    for scan in (False, True):
      cfg = ModelConfig(**{**vars(CFG), 'scan_layers': scan, 'tie_embeddings': False})
      boxed = jax.eval_shape(Llama(cfg).init, jax.random.key(0), self.tokens)['params']
      leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
      for leaf in leaves:
        self.assertIsInstance(leaf, nn.LogicallyPartitioned)
        self.assertLen(leaf.names, leaf.value.ndim)
      if scan:
        self.assertEqual(boxed['layers']['mlp']['up']['kernel'].names, ('layers', 'embed', 'mlp'))

  def test_gqa_attention_matches_repeated_heads(self):
    q = jax.random.normal(jax.random.key(2), (1, 6, 4, 8))
    k = jax.random.normal(jax.random.key(3), (1, 6, 2, 8))
    v = jax.random.normal(jax.random.key(4), (1, 6, 2, 8))
    pos = jnp.arange(6)[None]
    out = attention.attention(q, k, v, q_pos=pos, kv_pos=pos)
    k4, v4 = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum('bthd,bshd->bhts', q, k4) / np.sqrt(8)
    logits = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), logits, -jnp.inf)
    expected = jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, -1), v4)
    assert_close(out, expected, FORWARD_RTOL)

  def test_bad_config_is_rejected(self):
    with self.assertRaisesRegex(ValueError, 'num_kv_heads'):
      ModelConfig(num_heads=4, num_kv_heads=3)
    with self.assertRaisesRegex(ValueError, 'dtype'):
      ModelConfig(dtype='float8')


if __name__ == '__main__':
  absltest.main()
