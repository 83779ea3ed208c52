"""KV-cache decoding and sampling: model.decode.generate against full forward passes."""
import functools

from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import decode, kv_cache
from model.layers import ModelConfig
from model.llama import Llama
from model.mor import MoR, MoRConfig
from model.recursive import Recursive, RecursiveConfig
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


class _PromptsTestCase(parameterized.TestCase):
  """The tiny model and three right-padded prompts of lengths 6, 2 and 4."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.params = _model()
    cls.prompts = jax.random.randint(jax.random.key(1), (3, 6), 1, 64)
    cls.lengths = np.array([6, 2, 4])


class GenerateTest(_PromptsTestCase):

  def _greedy(self, prompts, lengths, max_new_tokens=7, **kwargs):
    return decode.generate(self.model, self.params, prompts, max_new_tokens, GREEDY,
                           jax.random.key(0), prompt_lengths=lengths, **kwargs)

  def test_batched_prompts_match_single_prompts(self):
    batched = self._greedy(self.prompts, self.lengths)
    for b, n in enumerate(self.lengths.tolist()):
      alone = self._greedy(self.prompts[b:b + 1, :n], None)
      np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
      assert_close(batched.policy_logprobs[b], alone.policy_logprobs[0], FORWARD_RTOL)

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
    assert_close(out.policy_logprobs[0], expected, FORWARD_RTOL)
    np.testing.assert_array_equal(out.sample_logprobs, 0.0)  # A deterministic choice: log 1.
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
      np.testing.assert_array_equal(out.sample_logprobs[b, n:], 0.0)
      np.testing.assert_array_equal(out.policy_logprobs[b, n:], 0.0)
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
    np.testing.assert_array_equal(a.sample_logprobs, b.sample_logprobs)
    self.assertTrue(np.all(np.asarray(a.policy_logprobs) < 0))

  def test_cache_too_small_raises(self):
    with self.assertRaisesRegex(ValueError, 'max_len=10'):
      self._greedy(self.prompts, self.lengths, max_new_tokens=5, max_len=10)


def _reference_sampling_logprobs(logits, sampling):
  """log p of every token under temperature / top-k / top-p sampling, computed directly in
  float64 numpy: p = softmax(logits / T); keep the k most likely tokens and renormalise; keep
  the most likely ones until their mass reaches top_p (the token crossing it included) and
  renormalise. Filtered tokens get -inf."""
  z = np.asarray(logits, np.float64) / sampling.temperature
  order = np.argsort(-z, axis=-1, kind='stable')
  p = np.exp(np.take_along_axis(z, order, -1) - z.max(-1, keepdims=True))
  if sampling.top_k:
    p[..., sampling.top_k:] = 0
  p /= p.sum(-1, keepdims=True)
  if sampling.top_p < 1:
    p = np.where(np.cumsum(p, -1) - p < sampling.top_p, p, 0)
    p /= p.sum(-1, keepdims=True)
  out = np.empty_like(p)
  np.put_along_axis(out, order, np.log(p, where=p > 0, out=np.full_like(p, -np.inf)), -1)
  return out


class GenerateLogprobsTest(_PromptsTestCase):
  """``sample_logprobs`` / ``policy_logprobs`` against the full forward pass's logits."""

  @parameterized.named_parameters(
      ('temperature', dict(temperature=0.7)), ('top_k', dict(top_k=5)),
      ('top_p', dict(top_p=0.8)), ('combined', dict(temperature=1.3, top_k=10, top_p=0.9)))
  def test_logprobs_match_full_forward(self, kwargs):
    sampling, new = decode.SamplingConfig(**kwargs), 6
    out = decode.generate(self.model, self.params, self.prompts, new, sampling,
                          jax.random.key(5), prompt_lengths=self.lengths)
    seqs = np.zeros((3, self.prompts.shape[1] + new), np.int32)  # Right padding: invisible.
    for b, n in enumerate(self.lengths):
      seqs[b, :n + new] = np.concatenate([self.prompts[b, :n], out.tokens[b]])
    all_logits = np.asarray(_forward(self.model, self.params, jnp.asarray(seqs)))
    for b, n in enumerate(self.lengths):
      logits = all_logits[b, n - 1:n - 1 + new]  # The logits each generated token came from.
      tokens = np.asarray(out.tokens[b])[:, None]
      policy = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tokens, 1)[:, 0]
      sample = np.take_along_axis(_reference_sampling_logprobs(logits, sampling), tokens, 1)[:, 0]
      # Cached and full-forward float32 logits differ by reduction order only (see
      # test_cached_logits_equal_full_forward); log-probs inherit that.
      assert_close(out.policy_logprobs[b], policy, FORWARD_RTOL)
      assert_close(out.sample_logprobs[b], sample, FORWARD_RTOL)
      self.assertTrue(np.all(np.isfinite(sample)))  # Only kept tokens are drawn.

  def test_sample_logprobs_are_the_distribution_drawn_from(self):
    """Many rows with one prompt draw one token each from the same distribution: the
    empirical frequencies converge to exp(sample_logprobs)."""
    n = 20_000
    sampling = decode.SamplingConfig(temperature=0.8, top_k=12, top_p=0.9)
    prompts = jnp.broadcast_to(self.prompts[:1, :3], (n, 3))
    out = decode.generate(self.model, self.params, prompts, 1, sampling, jax.random.key(7))
    tokens, logprobs = np.asarray(out.tokens[:, 0]), np.asarray(out.sample_logprobs[:, 0])
    seen = np.unique(tokens)
    probs = np.exp(np.array([logprobs[tokens == t][0] for t in seen]))
    for t, p in zip(seen, probs):  # One distribution: a token's log-prob is the same in every row.
      np.testing.assert_allclose(logprobs[tokens == t], np.log(p), rtol=1e-6)
    freq = np.array([np.mean(tokens == t) for t in seen])
    np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / n))
    # A token of probability >= 20/n is missed with probability <= e^-20, so the mass of
    # never-drawn tokens is below 64 * 20 / n.
    self.assertGreater(probs.sum(), 1 - 64 * 20 / n)
    self.assertLess(probs.sum(), 1 + 1e-5)


class DecodeStepCostTest(parameterized.TestCase):
  """A cached decode step moves about the bytes its attention layers must read from the KV
  cache (XLA's cost analysis): one read of each layer's cache per layer application. That
  is one read of the whole cache, except with MoR's KV sharing, where every recursion reads
  the shared layers' cache (4 reads of 3 cache layers here).

  The models are small with a long cache, so the cache dominates: 2 rows x 2048 slots x 2
  KV heads of dim 64 are 4 MiB of keys+values per cache layer, against 0.24 MiB of weights
  per layer. Without in-place writes a step copies the cache several times (about 9x).
  XLA counts a dynamic-update-slice as its update only, but a per-row scatter as its whole
  operand, and counts a ``while`` body once: hence one shared write slot for all rows and
  scanned layers unrolled when cached (model.kv_cache, model.llama.run_layers). With a
  single KV head XLA:CPU's dot fusion transposes the cache before reading it (measured:
  about 6.7x), so these models have 2 KV heads.
  """
  SHAPES = dict(vocab_size=64, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=64,
                mlp_dim=64)

  @parameterized.named_parameters(
      ('llama_loop', Llama, ModelConfig, dict(num_layers=3)),
      ('llama_scan', Llama, ModelConfig, dict(num_layers=3, scan_layers=True)),
      ('recursive', Recursive, RecursiveConfig, dict(num_layers=4, num_loops=2)),
      ('mor', MoR, MoRConfig, dict(num_layers=4, num_recursions=2)),
      ('mor_kv_sharing', MoR, MoRConfig, dict(num_layers=4, num_recursions=2, kv_sharing=True)))
  def test_decode_step_bytes_are_about_one_cache_read(self, family, config, overrides):
    if jax.default_backend() != 'cpu':
      self.skipTest('The bound holds for XLA:CPU fusion and layout decisions; other backends '
                    'decide differently and have not been measured.')
    model = family(config(**self.SHAPES, **overrides))
    step_bytes, layer_bytes = kv_cache.decode_step_bytes(model, batch=2, max_len=2048)
    self.assertLessEqual(step_bytes, 1.5 * model.cfg.num_layers * layer_bytes)


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
