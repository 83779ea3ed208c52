"""Continuous depth-wise batching engine: outputs equal solo greedy decoding, and with early
exits an independent token-by-token reference."""
import dataclasses

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


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x) + eps) * scale


def _rope(x, pos, theta):
  """Rotate-half RoPE of one token's heads x [H, D] at position ``pos``."""
  d = x.shape[-1]
  angle = pos / theta ** (np.arange(0, d, 2) / d)
  x1, x2 = x[:, :d // 2], x[:, d // 2:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _kv(cfg, layer, h, pos):
  xn = _rms(h, layer['attn_norm']['scale'], cfg.norm_eps)
  proj = lambda name: np.einsum('e,ehd->hd', xn, layer['attn'][name]['kernel'])
  return _rope(proj('k'), pos, cfg.rope_theta), proj('v')


def _layer(cfg, layer, h, pos, kv):
  """One pre-norm Llama block on one token h [E] at ``pos``; appends its (k, v) to ``kv``, the
  layer's entries of the earlier positions (None: hidden from attention)."""
  xn = _rms(h, layer['attn_norm']['scale'], cfg.norm_eps)
  q = _rope(np.einsum('e,ehd->hd', xn, layer['attn']['q']['kernel']), pos, cfg.rope_theta)
  kv.append(_kv(cfg, layer, h, pos))
  group = cfg.num_heads // cfg.num_kv_heads  # query head i reads KV head i // group
  keys = np.repeat(np.stack([k for k, _ in filter(None, kv)]), group, axis=1)  # [S, H, D]
  values = np.repeat(np.stack([v for _, v in filter(None, kv)]), group, axis=1)
  scores = np.einsum('hd,shd->hs', q, keys) / np.sqrt(q.shape[-1])
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  h = h + np.einsum('hs,shd,hde->e', weights, values, layer['attn']['o']['kernel'])
  xn = _rms(h, layer['mlp_norm']['scale'], cfg.norm_eps)
  gate, up = xn @ layer['mlp']['gate']['kernel'], xn @ layer['mlp']['up']['kernel']
  return h + (gate / (1 + np.exp(-gate)) * up) @ layer['mlp']['down']['kernel']


def _reference_early_exit(cfg, params, request, threshold, fill_exits=True):
  """Greedy decoding of one request, one token at a time in float64 numpy, written apart from
  the engine: prompt tokens run every loop; a generated step leaves after the first loop
  whose exit (final norm + tied head) has max softmax probability >= ``threshold`` (or after
  the last loop), and its deeper layers' K/V come from its exit hidden state through those
  layers' attn_norm and k/v projections (``fill_exits=False``: they stay hidden instead).
  Returns (generated tokens, exit loop of each, its confidence at loop 0, its gap between
  the two largest logits relative to the largest |logit|)."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  embed, size = params['embedder']['embed']['embedding'], cfg.block_size
  kv = [[] for _ in range(cfg.num_layers)]
  tokens, out, exits, confidence, gaps = list(request.prompt), [], [], [], []
  for pos in range(len(request.prompt) + request.max_new_tokens - 1):
    h, generating = embed[tokens[pos]], pos >= len(request.prompt) - 1
    for loop in range(cfg.num_loops):
      for j in range(size):
        h = _layer(cfg, params[f'layers_{j}'], h, pos, kv[loop * size + j])
      logits = embed @ _rms(h, params['final_norm']['scale'], cfg.norm_eps)
      probs = np.exp(logits - logits.max())
      conf = probs.max() / probs.sum()
      if generating and loop == 0:
        confidence.append(conf)
      if generating and conf >= threshold:
        break
    for layer in range((loop + 1) * size, cfg.num_layers):  # an early exit's deeper K/V
      kv[layer].append(_kv(cfg, params[f'layers_{layer % size}'], h, pos) if fill_exits
                       else None)
    if generating:
      out.append(int(np.argmax(logits)))
      exits.append(loop)
      tokens.append(out[-1])
      top2 = np.sort(logits)[-2:]
      gaps.append((top2[1] - top2[0]) / np.abs(logits).max())
  return out, exits, confidence, gaps


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

  def test_early_exits_equal_a_token_by_token_reference(self):
    """A threshold at which some generated tokens exit after loop 1 and some do not; later
    tokens' loop 2 then attends to the exited tokens' K/V, projected from their exit hidden
    state. Outputs and exit counts equal an independent per-token reference."""
    # Weights 25x the default scale, so that tokens and confidences vary along a request.
    vanilla_cfg = dataclasses.replace(VANILLA, init_std=0.5)
    cfg = conversion.recursive_config(vanilla_cfg, 2)
    params = conversion.convert_params(nn.meta.unbox(Llama(vanilla_cfg).init(
        jax.random.PRNGKey(2), jnp.zeros((1, 4), jnp.int32))['params']), vanilla_cfg, cfg)
    reqs = _requests()
    reference = lambda thr, fill=True: [_reference_early_exit(cfg, params, r, thr, fill)
                                        for r in reqs]
    # The threshold: midway between the two middle loop-1 confidences of the run without
    # early exits (18 generated tokens).
    conf = np.sort(sum((c for _, _, c, _ in reference(np.inf)), []))
    threshold = float(conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2
    ref = reference(threshold)
    outs, exit_loops, confs, gaps = zip(*ref)
    exits = sum(exit_loops, [])
    self.assertGreater(exits.count(0), 0)
    self.assertGreater(exits.count(1), 0)
    # Some token runs loop 2 after an earlier token of its request exited at loop 1.
    self.assertTrue(any(1 in e[e.index(0):] for e in exit_loops if 0 in e))
    # The engine's float32 decisions are the reference's: no confidence is within 1e-4
    # (relative) of the threshold and no argmax within 1e-4 of a tie, far above float32
    # rounding of 16-wide layers and a softmax over 64 logits.
    self.assertGreater(min(abs(c - threshold) for c in sum(confs, [])) / threshold, 1e-4)
    self.assertGreater(min(sum(gaps, [])), 1e-4)
    # The deeper K/V of exited tokens matter: hiding them changes some outputs.
    self.assertNotEqual([r[0] for r in reference(threshold, False)], list(outs))
    eng = engine.DepthwiseEngine(cfg, params, 2, MAX_LEN, exit_threshold=threshold)
    outputs, stats = eng.run(reqs)
    self.assertEqual(outputs, list(outs))
    self.assertEqual(stats['exits_per_depth'], [exits.count(0), exits.count(1)])

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
