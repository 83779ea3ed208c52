"""Block Transformer: alignment and causality, block locality, document isolation, config
errors, cached generation and serving against the forward pass, and training (overfitting,
8-device mesh = single device, unpredicted targets out of the loss)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from model import decode, engine
from model.block_transformer import (BlockConfig, BlockTransformer, predicted_targets,
                                     receptive_field)
from model.registry import build_model
from tests.test_train import _one_step, _random_batch
from tests.utils import FORWARD_RTOL, assert_update_close, mean_loss_tol, tiny_config
from training import sharding, train, trainer

V, T, LB = 32, 16, 4
SMALL = dict(vocab_size=V, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32, num_layers=1,
             block_len=LB, init_std=0.3)  # large weights: every dependence is visible


def _model(**overrides):
  model = BlockTransformer(BlockConfig(**{**SMALL, **overrides}))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (1, T)), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params']
  return model, params, tokens


def _forward(model):
  """jit(params, tokens [K, T], positions, segment_ids) -> logits [K, T, V]."""
  return jax.jit(lambda p, tok, pos, seg: model.apply({'params': p}, tok, pos, seg)[0])


def _perturbed(tokens, js):
  """Row 0: ``tokens``; row k + 1: ``tokens`` with token ``js[k]`` changed."""
  rows = [tokens[0]] + [tokens[0].at[j].set((tokens[0, j] + 1) % V) for j in js]
  return jnp.stack(rows)


def _changed(logits):
  """Per perturbed row, the positions whose logits moved by more than rounding."""
  diff = np.abs(np.asarray(logits[1:] - logits[:1], np.float64)).max(-1)
  return [set(np.flatnonzero(d > FORWARD_RTOL * np.abs(logits[0]).max())) for d in diff]


class BlockTransformerTest(parameterized.TestCase):

  @parameterized.parameters(('prefix', 0, True), ('prefix', 8, False), ('summation', 8, True),
                            ('summation', 0, False), ('cross_attention', 8, True))
  def test_causality_and_block_locality(self, token_decoder, token_width, first):
    model, params, tokens = _model(token_decoder=token_decoder, token_embed_dim=token_width,
                                   predict_first_block=first)
    forward = _forward(model)
    pos = jnp.broadcast_to(jnp.arange(T), (T + 1, T))
    seg = jnp.ones((T + 1, T), jnp.int32)
    batch = _perturbed(tokens, range(T))
    logits = forward(params, batch, pos, seg)
    self.assertEqual(logits.shape, (T + 1, T, V))
    field = receptive_field(LB, T)
    for j, changed in enumerate(_changed(logits)):
      # logits[t] predicts tokens[t + 1] from tokens[:t + 1]: token j moves exactly t >= j.
      self.assertEqual(changed, set(range(j, T)), f'token {j}')
      self.assertEqual(changed, set(np.flatnonzero(field[:, j])), f'token {j}')
    # With equal block-embedding rows for tokens a and b, swapping a for b at position j of
    # block k is invisible to the block decoder: only block k's token decoder sees it, and
    # its predictions from j on within the block (t = j .. kL_B + L_B - 2) move.
    a, b = 1, 2
    table = params['block_embed']['embedding']
    tied = dict(params, block_embed={'embedding': table.replace_boxed(
        table.unbox().at[b].set(table.unbox()[a]))})
    base = tokens.at[0].set(a)
    rows = jnp.stack([base[0]] + [base[0].at[j].set(b) for j in range(T)])
    logits = forward(tied, rows, pos, seg)
    for j, changed in enumerate(_changed(logits)):
      self.assertEqual(changed, set(range(j, j // LB * LB + LB - 1)), f'token {j}')
      self.assertEqual(changed, set(np.flatnonzero(field[:, j] == 2)), f'token {j}')

  def test_document_isolation_and_padding(self):
    model, params, tokens = _model()
    # One row: padding (segment 0), document A (4 tokens), document B (8 tokens).
    seg = jnp.asarray([[0] * 4 + [1] * 4 + [2] * 8], jnp.int32)
    pos = jnp.asarray([list(range(4)) + list(range(4)) + list(range(8))], jnp.int32)
    batch = _perturbed(tokens, range(8))
    logits = _forward(model)(params, batch, jnp.repeat(pos, 9, 0), jnp.repeat(seg, 9, 0))
    changed = _changed(logits)
    for j in range(4):  # padding: no real token's prediction (t >= 3) moves
      self.assertFalse({t for t in changed[j] if t >= 3}, f'padding token {j}')
    for j in range(4, 8):  # document A: document B's predictions (t >= 7) do not move
      self.assertEqual(changed[j], set(range(j, 7)), f'token {j}')

  def test_predicted_targets(self):
    model, params, tokens = _model(predict_first_block=False)
    self.assertNotIn('start_context', params)
    _, aux = jax.jit(model.apply)({'params': params}, tokens)
    np.testing.assert_array_equal(aux['predicted'][0], np.arange(T) >= LB - 1)
    # Two packed documents of 8: each document's first block (targets x[1..3], x[9..11];
    # the target of t = 7 is document B's first token) is not predicted.
    pos = jnp.asarray([list(range(8)) * 2])
    expected = [False] * 3 + [True] * 4 + [False] * 4 + [True] * 5
    np.testing.assert_array_equal(predicted_targets(model.cfg, pos)[0], expected)
    first = BlockConfig(**SMALL)
    self.assertTrue(np.all(predicted_targets(first, pos)))

  def test_bad_configs_and_cache(self):
    for overrides, field in [(dict(expansion_ratio=0), 'expansion_ratio'),
                             (dict(embed_dim=18), 'embed_dim'),
                             (dict(block_len=0), 'block_len'),
                             (dict(token_decoder='sum'), 'token_decoder'),
                             (dict(token_embed_dim=7), 'token_embed_dim')]:
      with self.assertRaisesRegex(ValueError, field):
        BlockConfig(**{**SMALL, **overrides})
    with self.assertRaisesRegex(ValueError, 'model.block_lenn'):
      build_model(ml_collections.ConfigDict(dict(SMALL, name='block', block_lenn=2)))
    model, params, tokens = _model()
    with self.assertRaisesRegex(ValueError, 'block_len'):
      model.apply({'params': params}, tokens[:, :6])
    with self.assertRaisesRegex(ValueError, 'needs 4 block slots; the cache has 2'):
      model.apply({'params': params}, tokens[:, :13], cache=model.init_cache(1, 8))
    with self.assertRaisesRegex(ValueError, 'positions'):
      model.apply({'params': params}, tokens[:, :1], cache=model.init_cache(1, 8))
    with self.assertRaisesRegex(ValueError, 'block_len=0'):
      receptive_field(0, 8)


class CachedGenerationTest(parameterized.TestCase):
  """Cached generation (prompts ending anywhere in a block, rows at different offsets) and
  the serving engine, against the teacher-forced forward pass."""

  LENGTHS = (5, 8, 3, 1, 4, 6)  # every offset in a block, and a one-token prompt

  def _prompts(self):
    rng = np.random.default_rng(1)
    return rng.integers(0, V, (len(self.LENGTHS), 9)).astype(np.int32), np.array(self.LENGTHS)

  def _forward_logprobs(self, model, params, prompts, lengths, tokens, out_lengths):
    """Per row, the log-probs of its ``out_lengths[r]`` generated ``tokens`` after its prompt
    under the forward pass: one batch padded at the end to one whole-block length (causal:
    the padding moves no earlier logit), so one compiled forward serves every row."""
    seqs = [np.concatenate([p[:n], t[:m]]) for p, n, t, m in
            zip(prompts, lengths, tokens, out_lengths)]
    batch = np.zeros((len(seqs), -(-max(map(len, seqs)) // LB) * LB), np.int32)
    for r, seq in enumerate(seqs):
      batch[r, :len(seq)] = seq
    log_probs = np.asarray(jax.nn.log_softmax(jax.jit(model.apply)({'params': params}, batch)[0]))
    return [log_probs[r, n - 1 + np.arange(m), seq[n:]]
            for r, (seq, n, m) in enumerate(zip(seqs, lengths, out_lengths))]

  @parameterized.parameters(dict(), dict(token_decoder='summation', token_embed_dim=8),
                            dict(predict_first_block=False, expansion_ratio=3),
                            dict(token_decoder='cross_attention', expansion_ratio=3),
                            dict(scan_layers=True, num_layers=2))
  def test_generate_matches_forward(self, **overrides):
    model, params, _ = _model(**overrides)
    prompts, lengths = self._prompts()
    stop, steps = 5, 11
    out = decode.generate(model, params, prompts, steps, decode.SamplingConfig(top_k=20),
                          jax.random.PRNGKey(1), stop_tokens=(stop,), pad_id=0,
                          prompt_lengths=lengths)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.policy_logprobs)
    out_lengths = np.asarray(out.lengths)
    refs = self._forward_logprobs(model, params, prompts, lengths, tokens, out_lengths)
    for r, (m, ref) in enumerate(zip(out_lengths, refs)):
      self.assertTrue(m == steps or tokens[r, m - 1] == stop)
      np.testing.assert_array_equal(tokens[r, m:], 0)
      np.testing.assert_allclose(logprobs[r, :m], ref, atol=2e-5, rtol=2e-5)

  def test_engine_matches_generate_alone(self):
    model, params, _ = _model()
    prompts, lengths = self._prompts()
    budgets = (7, 3, 9, 5, 6, 4)
    requests = [engine.Request(list(p[:n]), m) for p, n, m in zip(prompts, lengths, budgets)]
    stop = 7
    outputs, stats = engine.BlockEngine(model, params, num_slots=2, max_len=24,
                                        stop_tokens=(stop,)).run(requests)
    # Each request alone: one row of a generate batch (rows are independent), cut at its budget.
    alone = decode.generate(model, params, prompts, max(budgets),
                            decode.SamplingConfig(greedy=True), jax.random.PRNGKey(0),
                            stop_tokens=(stop,), prompt_lengths=lengths, max_len=24)
    for row, (budget, output) in enumerate(zip(budgets, outputs)):
      expected = np.asarray(alone.tokens[row, :min(budget, int(alone.lengths[row]))]).tolist()
      self.assertEqual(output, expected)
    self.assertEqual(stats['tokens'], sum(len(o) for o in outputs))


class BlockTrainingTest(absltest.TestCase):

  def _config(self):
    config = tiny_config(name='block', block_len=4, embed_dim=64, mlp_dim=128, num_layers=1)
    config.train.steps = 20
    return config

  def test_overfits_repeated_batch(self):
    config = self._config()
    config.mesh.update(dict(zip(sharding.MESH_AXES, (1, 1, 1))))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model, tx, schedule, _, shardings, init, rules = trainer.build_state_fns(config, mesh)
    self.assertIsInstance(model, BlockTransformer)
    # The same program as test_train._one_step's: compiled once per suite run (cache).
    step = jax.jit(trainer.make_train_step(model, tx, schedule, config.train),
                   out_shardings=(shardings, None))
    batch = sharding.shard_batch(_random_batch(config), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = init(jax.random.PRNGKey(0))
      losses = []
      for _ in range(config.train.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics['train/loss']))
    # Random tokens over 259 ids start near log(259) = 5.56; memorising them drives it down.
    self.assertGreater(losses[0], 5.0)
    self.assertLess(losses[-1], losses[0] - 2.0)

  def test_unpredicted_targets_are_not_scored(self):
    # Without a first-block context, each document's first-block targets leave the loss
    # (and its token count) in evaluation and in the train step alike.
    model, params, tokens = _model(predict_first_block=False)
    pos = jnp.asarray([list(range(8)) * 2])
    loss_mask = np.ones((1, T), np.int32)
    loss_mask[0, 7] = 0  # the packing's document boundary
    batch = {'tokens': tokens, 'targets': jnp.roll(tokens, -1, 1), 'positions': pos,
             'segment_ids': jnp.asarray([[1] * 8 + [2] * 8]), 'loss_mask': jnp.asarray(loss_mask)}
    _, count = train.make_eval_step(model)({'params': params}, batch)['']
    self.assertEqual(int(count), int(np.sum(loss_mask * predicted_targets(model.cfg, pos))))
    self.assertEqual(int(count), 9)

  def test_mesh_matches_single_device(self):
    config = self._config()
    batch = _random_batch(config)  # two block-aligned documents per row
    p1, m1, _, before = _one_step(config, (1, 1, 1), batch)
    p8, m8, _, _ = _one_step(config, (2, 2, 2), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m8['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    assert_update_close(p8, p1, before)


class BlockJobConfigTest(absltest.TestCase):

  def test_block_tiny_needs_block_aligned_data(self):
    from configs import block_tiny  # pylint: disable=g-import-not-at-top
    config = block_tiny.get_config()
    train.check_config(config)
    config.data.block_len = 0
    with self.assertRaisesRegex(ValueError, 'data.block_len=0 must equal config.model.block_len=4'):
      train.check_config(config)


if __name__ == '__main__':
  absltest.main()
