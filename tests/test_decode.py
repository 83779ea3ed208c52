"""KV-cache decoding and sampling: model.decode.generate against full forward passes."""
import functools

from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import decode
from model.layers import ModelConfig
from model.llama import Llama
from tests.utils import FORWARD_RTOL, assert_close

GREEDY = decode.SamplingConfig(greedy=True)


@functools.cache
def _model(scan_layers=False):
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, scan_layers=scan_layers, init_std=0.3)
  model = Llama(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return model, nn.meta.unbox(variables)['params']


def _forward(model, params, tokens):
  return jax.jit(model.apply)({'params': params}, tokens)[0]


class CachedDecodingTest(parameterized.TestCase):

  @parameterized.named_parameters(('loop', False), ('scan', True))
  def test_cached_logits_equal_full_forward(self, scan_layers):
    model, params = _model(scan_layers)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    full = _forward(model, params, tokens)
    apply = jax.jit(lambda tok, pos, cache: model.apply(
        {'params': params}, tok, positions=pos, cache=cache))
    prefill = 3
    logits, aux = apply(tokens[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (2, prefill)),
                        model.init_cache(2, 12))
    cached = [logits]
    for t in range(prefill, tokens.shape[1]):
      logits, aux = apply(tokens[:, t:t + 1], jnp.full((2, 1), t), aux['cache'])
      cached.append(logits)
    assert_close(jnp.concatenate(cached, axis=1), full, FORWARD_RTOL)


class GenerateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.params = _model()
    cls.prompts = jax.random.randint(jax.random.key(1), (3, 6), 1, 64)
    cls.lengths = jnp.array([6, 2, 4])

  def _greedy(self, prompts, lengths, max_new_tokens=7, **kwargs):
    return decode.generate(self.model, self.params, prompts, max_new_tokens, GREEDY,
                           jax.random.key(0), prompt_lengths=lengths, **kwargs)

  def test_batched_prompts_match_single_prompts(self):
    batched = self._greedy(self.prompts, self.lengths)
    for b, n in enumerate(self.lengths.tolist()):
      alone = self._greedy(self.prompts[b:b + 1, :n], None)
      np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
      assert_close(batched.logprobs[b], alone.logprobs[0], FORWARD_RTOL)

  @parameterized.named_parameters(('loop', False), ('scan', True))
  def test_greedy_tokens_are_argmax_of_full_forward(self, scan_layers):
    model, params = _model(scan_layers)
    prompt = self.prompts[:1, :5]
    out = decode.generate(model, params, prompt, 8, GREEDY, jax.random.key(0))
    seq = jnp.concatenate([prompt, out.tokens], axis=1)
    logits = _forward(model, params, seq)
    steps = logits[0, 4:-1]  # Logits that predicted each generated token.
    np.testing.assert_array_equal(out.tokens[0], jnp.argmax(steps, axis=-1))
    expected = jnp.take_along_axis(jax.nn.log_softmax(steps), out.tokens[0, :, None], 1)[:, 0]
    assert_close(out.logprobs[0], expected, FORWARD_RTOL)
    np.testing.assert_array_equal(out.lengths, [8])

  def test_stop_tokens_end_rows_and_pad(self):
    free = self._greedy(self.prompts, self.lengths)
    stop = int(free.tokens[0, 2])
    out = self._greedy(self.prompts, self.lengths, stop_tokens=(stop,), pad_id=-1)
    for b in range(3):
      hits = np.flatnonzero(np.asarray(free.tokens[b]) == stop)
      n = hits[0] + 1 if hits.size else 7
      self.assertEqual(int(out.lengths[b]), n)
      np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
      np.testing.assert_array_equal(out.tokens[b, n:], -1)
      np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
    self.assertEqual(int(out.lengths[0]), 3)

  def test_all_rows_stopped_exits_with_padding(self):
    free = self._greedy(self.prompts[:1], None)
    out = self._greedy(self.prompts[:1], None, stop_tokens=(int(free.tokens[0, 0]),))
    np.testing.assert_array_equal(out.lengths, [1])
    np.testing.assert_array_equal(out.tokens[0, 1:], 0)

  def test_generate_is_jittable_and_sampling_is_reproducible(self):
    sampling = decode.SamplingConfig(temperature=0.8, top_k=10, top_p=0.9)
    fn = jax.jit(lambda params, prompts, rng: decode.generate(
        self.model, params, prompts, 5, sampling, rng, prompt_lengths=self.lengths))
    a = fn(self.params, self.prompts, jax.random.key(3))
    b = decode.generate(self.model, self.params, self.prompts, 5, sampling, jax.random.key(3),
                        prompt_lengths=self.lengths)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    self.assertTrue(np.all(np.asarray(a.logprobs) < 0))

  def test_cache_too_small_raises(self):
    with self.assertRaisesRegex(ValueError, 'max_len=10'):
      self._greedy(self.prompts, self.lengths, max_new_tokens=5, max_len=10)


class SamplingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3

  def test_greedy_is_argmax(self):
    tokens = decode.sample_logits(self.logits, jax.random.key(1), GREEDY)
    np.testing.assert_array_equal(tokens, jnp.argmax(self.logits, -1))

  @parameterized.parameters(1, 5, 49)
  def test_top_k_keeps_exactly_k_best(self, k):
    kept = np.isfinite(decode.filter_logits(self.logits, decode.SamplingConfig(top_k=k)))
    np.testing.assert_array_equal(kept.sum(-1), k)
    top = np.argsort(-np.asarray(self.logits), axis=-1)[:, :k]
    self.assertTrue(np.all(np.take_along_axis(kept, top, axis=-1)))

  def test_top_k_keeps_exactly_k_with_ties(self):
    kept = np.isfinite(decode.filter_logits(jnp.zeros((2, 10)), decode.SamplingConfig(top_k=3)))
    np.testing.assert_array_equal(kept.sum(-1), 3)

  @parameterized.parameters(0.05, 0.5, 0.9, 0.999)
  def test_top_p_keeps_smallest_set_with_enough_mass(self, p):
    kept = np.isfinite(decode.filter_logits(self.logits, decode.SamplingConfig(top_p=p)))
    probs = np.asarray(jax.nn.softmax(self.logits))
    for row_kept, row_probs in zip(kept, probs):
      mass = row_probs[row_kept].sum()
      self.assertGreaterEqual(mass, p - 1e-6)
      self.assertLess(mass - row_probs[row_kept].min(), p)  # Dropping any kept token is too few.
      self.assertGreaterEqual(row_probs[row_kept].min(), row_probs[~row_kept].max(initial=0))

  def test_temperature_matches_softmax_frequencies(self):
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, temperature = 40_000, 0.7
    tokens = decode.sample_logits(jnp.broadcast_to(logits, (n, 6)), jax.random.key(2),
                                  decode.SamplingConfig(temperature=temperature))
    freq = np.bincount(np.asarray(tokens), minlength=6) / n
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-4
    np.testing.assert_array_less(np.abs(freq - expected), tolerance)

  def test_sampling_stays_inside_filtered_set(self):
    sampling = decode.SamplingConfig(top_k=8, top_p=0.7)
    allowed = np.isfinite(decode.filter_logits(self.logits, sampling))
    for seed in range(5):
      tokens = np.asarray(decode.sample_logits(self.logits, jax.random.key(seed), sampling))
      self.assertTrue(np.all(allowed[np.arange(16), tokens]))

  @parameterized.parameters(dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0),
                            dict(top_p=1.5))
  def test_bad_sampling_config_raises(self, **kwargs):
    with self.assertRaises(ValueError):
      decode.SamplingConfig(**kwargs)


if __name__ == '__main__':
  absltest.main()
