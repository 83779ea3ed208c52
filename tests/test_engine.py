"""Continuous depth-wise batching engine: outputs equal solo greedy decoding."""
from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import conversion, decode, engine, recursive
from model.layers import ModelConfig
from model.llama import Llama

VANILLA = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                      mlp_dim=32)
MAX_LEN = 16


def _requests():
  rng = np.random.default_rng(0)
  return [engine.Request(rng.integers(1, 64, size=p).tolist(), n)
          for p, n in [(3, 5), (1, 2), (5, 7), (2, 3), (4, 1)]]


def _solo(cfg, params, request):
  out = decode.generate(recursive.Recursive(cfg), params, np.asarray([request.prompt]),
                        request.max_new_tokens, decode.SamplingConfig(greedy=True),
                        jax.random.PRNGKey(0), max_len=MAX_LEN)
  return np.asarray(out.tokens[0]).tolist()


class EngineTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.vanilla = nn.meta.unbox(Llama(VANILLA).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 4), jnp.int32))['params'])
    cls.cfg = conversion.recursive_config(VANILLA, 2)
    cls.params = conversion.convert_params(cls.vanilla, VANILLA, cls.cfg, 'stepwise')

  @parameterized.parameters(1, 2)
  def test_depthwise_equals_solo(self, slots):
    eng = engine.DepthwiseEngine(self.cfg, self.params, slots, MAX_LEN)
    outputs, stats = eng.run(_requests())
    for out, req in zip(outputs, _requests()):
      self.assertEqual(out, _solo(self.cfg, self.params, req))
    self.assertEqual(stats['early_exit_rate'], 0.0)
    self.assertEqual(stats['tokens'], sum(r.max_new_tokens for r in _requests()))

  @parameterized.parameters(False, True)
  def test_vanilla_baselines_equal_solo(self, static):
    cfg = engine.single_loop(VANILLA)
    eng = engine.DepthwiseEngine(cfg, self.vanilla, 2, MAX_LEN, static_batching=static)
    outputs, _ = eng.run(_requests())
    for out, req in zip(outputs, _requests()):
      self.assertEqual(out, _solo(cfg, self.vanilla, req))

  def test_everything_exits_at_loop_one(self):
    """Threshold 0: every token leaves after loop 0 (exit rate 1), so the outputs are those
    of the one-loop model; the deeper layers' K/V are filled but never read."""
    eng = engine.DepthwiseEngine(self.cfg, self.params, 2, MAX_LEN, exit_threshold=0.0)
    outputs, stats = eng.run(_requests())
    self.assertEqual(stats['early_exit_rate'], 1.0)
    one = recursive.RecursiveConfig(**{**self.cfg.__dict__, 'num_layers': 2, 'num_loops': 1})
    for out, req in zip(outputs, _requests()):
      self.assertEqual(out, _solo(one, self.params, req))

  def test_stop_tokens_free_slots(self):
    reqs = _requests()
    first = _solo(self.cfg, self.params, reqs[2])[0]
    eng = engine.DepthwiseEngine(self.cfg, self.params, 2, MAX_LEN, stop_tokens=(first,))
    outputs, _ = eng.run(reqs)
    self.assertEqual(outputs[2], [first])

  def test_rejects_lora(self):
    cfg = conversion.recursive_config(VANILLA, 2, lora_rank=2)
    with self.assertRaisesRegex(ValueError, 'no LoRA'):
      engine.DepthwiseEngine(cfg, None, 2, MAX_LEN)


if __name__ == '__main__':
  absltest.main()
