"""bench/block_decode.py's memory-capped batch search and training/repro_block.py's
matched-loss interpolation, against analytic values; a tiny run of the repro_block job."""
import json
import math
import os

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import block_decode
from model.block_transformer import BlockConfig, BlockTransformer
from model.layers import ModelConfig
from model.llama import Llama
from configs.repro import block_isoloss
from training import repro_block
from training.repro_block import throughput_at_loss

_SHAPE = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _abstract_params(model):
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                      jnp.zeros((1, 4), jnp.int32)))['params']


class MaxBatchTest(absltest.TestCase):

  def test_affine_bytes_match_brute_force(self):
    bytes_of = lambda b: 1000 + 37 * b
    for cap in (1037, 1073, 1074, 1500, 4700, 10_000):
      best = max(b for b in range(1, 200) if bytes_of(b) <= cap)
      self.assertEqual(block_decode.max_batch_under_cap(bytes_of, cap, 64), min(best, 64))

  def test_cap_below_batch_one_or_bad_max_batch_raises(self):
    with self.assertRaisesRegex(ValueError, 'cap'):
      block_decode.max_batch_under_cap(lambda b: 100 * b, 99, 8)
    with self.assertRaisesRegex(ValueError, 'max_batch'):
      block_decode.max_batch_under_cap(lambda b: 100 * b, 1000, 0)

  def _search_is_tight(self, model, params, max_len):
    bytes_of = lambda b: block_decode.memory_bytes(model, params, b, max_len)
    per_row = block_decode.cache_bytes_per_sequence(model, max_len)
    cap = bytes_of(7) + per_row // 2
    batch = block_decode.max_batch_under_cap(bytes_of, cap, 1000)
    self.assertEqual(batch, 7)
    self.assertLessEqual(bytes_of(batch), cap)
    self.assertLess(cap, bytes_of(batch + 1))

  def test_llama_memory_is_params_plus_cache_and_search_is_tight(self):
    model = Llama(ModelConfig(**_SHAPE))
    params = _abstract_params(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    cfg, max_len = model.cfg, 40
    # k and v per layer [B, Hkv, S, D] float32, positions [B, S] int32, one int32 write index.
    per_row = 4 * (2 * cfg.num_layers * cfg.num_kv_heads * max_len * cfg.dims_per_head + max_len)
    self.assertEqual(block_decode.memory_bytes(model, params, 3, max_len),
                     4 * n_params + 3 * per_row + 4)
    self.assertEqual(block_decode.cache_bytes_per_sequence(model, max_len), per_row)
    self._search_is_tight(model, params, max_len)

  def test_block_search_is_tight_and_its_cache_is_smaller(self):
    model = BlockTransformer(BlockConfig(**_SHAPE, block_len=4))
    max_len = 40
    self._search_is_tight(model, _abstract_params(model), max_len)
    # Block decoder: max_len / L_B slots per layer (plus a few local token-decoder slots).
    self.assertLess(block_decode.cache_bytes_per_sequence(model, max_len),
                    block_decode.cache_bytes_per_sequence(Llama(ModelConfig(**_SHAPE)),
                                                          max_len) / 2)


class SettingsTest(absltest.TestCase):

  def test_parse_and_errors(self):
    self.assertEqual(block_decode.parse_settings('a=512/32,b=32/512'),
                     {'a': (512, 32), 'b': (32, 512)})
    for bad in ('a=512', 'a=0/4', 'a:1/2'):
      with self.assertRaisesRegex(ValueError, 'settings'):
        block_decode.parse_settings(bad)


class ThroughputAtLossTest(absltest.TestCase):
  # Throughput x4 per 0.5 nats: log-linear interpolation halves the factor at midpoints.
  LOSSES, TPS = [3.0, 2.0, 2.5], [1600.0, 100.0, 400.0]

  def test_log_linear_between_bracketing_models(self):
    for loss, expected in ((2.0, 100), (2.25, 200), (2.5, 400), (2.75, 800), (3.0, 1600),
                           (2.125, 100 * 2**0.5)):
      self.assertAlmostEqual(throughput_at_loss(self.LOSSES, self.TPS, loss), expected,
                             delta=1e-9 * expected)

  def test_outside_the_curve_is_nan(self):
    for loss in (1.99, 3.01):
      self.assertTrue(math.isnan(throughput_at_loss(self.LOSSES, self.TPS, loss)))

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, 'losses'):
      throughput_at_loss([2.0, 3.0], [1.0], 2.5)
    with self.assertRaisesRegex(ValueError, 'throughputs'):
      throughput_at_loss([2.0, 3.0], [1.0, 0.0], 2.5)


class ReproTest(absltest.TestCase):

  def test_tiny_run_writes_rows_table_and_plot(self):
    config = block_isoloss.get_config()
    config.base.data.update(seq_len=16, batch_size=8, max_docs=20, shuffle_buffer=4)
    config.base.train.update(steps=2, warmup_steps=1, eval_every=2, checkpoint_every=2,
                             eval_batches=1, log_every=1)
    config.variants = {'vanilla': config.variants.vanilla_d32_L1,
                       'block': config.variants.block_d96_B2_T2}
    for model in config.variants.values():
      model.update(embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
    config.throughput.update(prompt_len=4, new_tokens=4, cap_mib=1.0, max_batch=3, rounds=1)
    workdir = self.create_tempdir().full_path
    rows = repro_block.run(config, workdir)
    self.assertEqual([r['model'] for r in rows], ['vanilla', 'block'])  # vanilla first
    for r in rows:
      self.assertEqual(r['tokens'], 2 * 8 * 16)
      self.assertEqual(r['batch'], 3)  # 1 MiB holds more than 3 rows of these tiny models
      self.assertGreater(r['tokens_per_s'], 0)
    # A one-model vanilla curve brackets no other loss: no match, no ratio.
    self.assertIsNone(rows[1]['ratio_at_matched_loss'])
    with open(os.path.join(workdir, 'block_isoloss.json')) as f:
      self.assertEqual(len(json.load(f)['rows']), 2)
    for name in ('block_isoloss.md', 'block_isoloss.png'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)


if __name__ == '__main__':
  absltest.main()
