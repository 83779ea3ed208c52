"""MoR continuous depth-wise batching: every request's output equals solo greedy decoding."""
from absl.testing import absltest, parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import mor_tiny
from model import decode, mor, mor_engine
from model.engine import Request

_SMALL = dict(vocab_size=64, embed_dim=32, num_layers=5, num_heads=4, num_kv_heads=2, mlp_dim=64)
MAX_LEN = 20


def _requests():
  rng = np.random.default_rng(0)
  return [Request(rng.integers(1, 64, size=p).tolist(), n)
          for p, n in [(3, 6), (1, 3), (5, 8), (2, 4), (4, 1), (6, 5)]]


def _setup(**kw):
  """A random model whose routers' logits are O(1), so that depths vary per token."""
  cfg = mor.MoRConfig(**{**_SMALL, **kw})
  variables = nn.meta.unbox(mor.MoR(cfg).init(jax.random.PRNGKey(1),
                                              jnp.zeros((1, 4), jnp.int32)))
  params = dict(variables['params'])
  for i, name in enumerate(n for n in params if 'router' in n):
    kernel = params[name]['proj']['kernel']
    params[name] = {'proj': {'kernel': jax.random.normal(jax.random.PRNGKey(i + 1), kernel.shape)}}
  return cfg, dict(variables, params=params)


def _solo(cfg, variables, requests):
  """Greedy ``generate`` of each request, as rows of one batch (rows are independent)."""
  prompts = np.zeros((len(requests), max(len(r.prompt) for r in requests)), np.int32)
  for row, r in zip(prompts, requests):
    row[:len(r.prompt)] = r.prompt
  new = max(r.max_new_tokens for r in requests)
  out = decode.generate(mor.MoR(cfg), variables, prompts, new,
                        decode.SamplingConfig(greedy=True), jax.random.PRNGKey(0),
                        prompt_lengths=[len(r.prompt) for r in requests], max_len=MAX_LEN)
  return [np.asarray(t[:r.max_new_tokens]).tolist() for t, r in zip(out.tokens, requests)]


class MoREngineTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('expert', dict(), 3, None),
      ('expert_one_slot', dict(), 1, None),
      ('expert_two_lanes', dict(), 3, 2),
      ('expert_one_lane_partial_first', dict(num_recursions=2, capacity=(0.5, 0.5)), 4, 1),
      ('expert_kv_sharing', dict(kv_sharing=True), 3, None),
      ('expert_aux_router_tanh', dict(sampling='aux_router', router_func='tanh'), 3, None),
      ('expert_cycle', dict(sharing='cycle', num_layers=4, num_recursions=2), 3, None),
      ('expert_scanned', dict(scan_layers=True), 3, None),
      ('token_choice', mor_tiny.token_choice(), 3, 2),
      ('token_choice_kv_sharing', mor_tiny.token_choice(kv_sharing=True), 2, None),
  )
  def test_equals_solo_decoding(self, kw, slots, lanes):
    cfg, variables = _setup(**kw)
    eng = mor_engine.MoREngine(cfg, variables, slots, MAX_LEN, exit_lanes=lanes)
    outputs, stats = eng.run(_requests())
    self.assertEqual(outputs, _solo(cfg, variables, _requests()))
    self.assertEqual(stats['tokens'], sum(r.max_new_tokens for r in _requests()))
    exits = np.asarray(stats['exits_per_depth'])
    self.assertGreaterEqual((exits > 0).sum(), 2, exits)  # depths really vary per token
    if cfg.router == 'expert_choice':  # recursion 1 keeps every token iff its capacity is 1
      self.assertEqual(exits[0] == 0, cfg.capacities[0] == 1.0, exits)
    # A token takes as many steps as recursions, plus waits for a lane and refills.
    self.assertGreaterEqual(stats['steps'] * slots, (exits * np.arange(len(exits))).sum())

  def test_loss_free_bias_decides_the_depth(self):
    cfg, variables = _setup(**mor_tiny.token_choice(balancing='loss_free'))
    variables = dict(variables, router_state={'bias': jnp.array([0.0, 5.0, 0.0])})
    eng = mor_engine.MoREngine(cfg, variables, 3, MAX_LEN)
    outputs, stats = eng.run(_requests())
    self.assertEqual(stats['exits_per_depth'], [0, 0, stats['tokens'], 0])
    self.assertEqual(outputs, _solo(cfg, variables, _requests()))

  def test_stop_tokens_free_slots(self):
    cfg, variables = _setup()
    first = _solo(cfg, variables, _requests())[0][0]
    eng = mor_engine.MoREngine(cfg, variables, 2, MAX_LEN, stop_tokens=(first,))
    outputs, _ = eng.run(_requests())
    self.assertEqual(outputs[0], [first])

  def test_rejects_bad_lanes(self):
    cfg, variables = _setup()
    with self.assertRaisesRegex(ValueError, 'exit_lanes=3'):
      mor_engine.MoREngine(cfg, variables, 2, MAX_LEN, exit_lanes=3)


if __name__ == '__main__':
  absltest.main()
