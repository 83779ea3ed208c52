"""Pallas flash attention (interpret mode on CPU) against the pure-jnp reference: forward and
dQ, dK, dV for GQA, causal and not, packed rows, caches with empty slots, queries without a
visible key, ragged lengths, kv_valid, padded head dims, bfloat16; block skipping; sharding
over batch and heads; lowering for Triton and Mosaic; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import flash_attention as fa
from tests.utils import BF16_EPS, F32_EPS, assert_close

_BLOCKS = fa.BlockSizes(16, 16, 16, 16)
# Errors relative to the largest entry of the quantity compared: float32 sums here have at
# most 64 terms (head dim, keys) -> 256 eps; bfloat16 rounds q, k, v, P and dS -> 4 eps.
_RTOL = {jnp.float32: 256 * F32_EPS, jnp.bfloat16: 4 * BF16_EPS}
_T, _S = 40, 56  # neither a multiple of the block (16)


def _mixed_batch(seed=0):
  """Four rows, one situation each; T and S are not multiples of the block.

  0: packed documents (segments 1..3, positions restarting per document), queries are the
     last T keys; 1: a cache, positions 0..29 with an empty slot (-1) and unfilled slots
     (-1) after; 2: queries 0..7 in a segment no key has (no visible key: zero output);
  3: gathered tokens at sorted arbitrary positions, keys 16..31 all invalid (kv_valid).
  """
  rng = np.random.default_rng(seed)
  kv_pos = np.zeros((4, _S), np.int32)
  kv_seg = np.ones((4, _S), np.int32)
  q_pos = np.zeros((4, _T), np.int32)
  q_seg = np.ones((4, _T), np.int32)
  lengths = (20, 15, 21)
  kv_seg[0] = np.repeat([1, 2, 3], lengths)
  kv_pos[0] = np.concatenate([np.arange(n) for n in lengths])
  q_pos[0], q_seg[0] = kv_pos[0, _S - _T:], kv_seg[0, _S - _T:]
  kv_pos[1] = np.where(np.arange(_S) < 30, np.arange(_S), -1)
  kv_pos[1, 7] = -1
  q_pos[1] = np.arange(_T) + 10
  kv_pos[2] = np.arange(_S)
  q_pos[2] = np.arange(_T) + _S - _T
  q_seg[2, :8] = 99
  kv_pos[3] = np.sort(rng.choice(200, _S, replace=False))
  q_pos[3] = np.sort(rng.choice(200, _T, replace=False))
  kv_valid = rng.random((4, _S)) < 0.85
  kv_valid[3, 16:32] = False
  return dict(q_pos=jnp.asarray(q_pos), kv_pos=jnp.asarray(kv_pos),
              q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg),
              kv_valid=jnp.asarray(kv_valid))


def _qkvg(head_dim, dtype, heads=4, kv_heads=2, seed=1):
  """q, k, v and an output cotangent, rounded to ``dtype``."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shapes = [(4, _T, heads, head_dim), (4, _S, kv_heads, head_dim), (4, _S, kv_heads, head_dim),
            (4, _T, heads, head_dim)]
  return [jax.random.normal(key, shape).astype(dtype) for key, shape in zip(keys, shapes)]


def _vjp(fn, q, k, v, g):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(g))


class FlashAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('causal_f32_d64', True, 64, jnp.float32),
      ('full_f32_d32_padded', False, 32, jnp.float32),
      ('causal_bf16_d32', True, 32, jnp.bfloat16))
  def test_matches_reference(self, causal, head_dim, dtype):
    """Output and dQ, dK, dV equal the reference's; nothing is NaN (empty queries included).

    Key blocks that no query can see are skipped, never read: NaN values there leave every
    result equal to the reference's on the same values zeroed.
    """
    batch = _mixed_batch()
    q, k, v, g = _qkvg(head_dim, dtype)
    unseen = jnp.zeros(v.shape, bool).at[3, 16:32].set(True)  # row 3: kv_valid False
    unseen = unseen.at[1, 32:48].set(True)  # row 1: unfilled cache slots (kv_pos -1)
    flash = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=causal,
                                                       block_sizes=_BLOCKS, **batch))
    # The reference runs in float32 on the same (rounded) inputs.
    ref = lambda q, k, v: fa.reference_attention(q, k, v, causal=causal, **batch)
    got = _vjp(flash, q, k, jnp.where(unseen, jnp.nan, v), g)
    want = _vjp(ref, *(x.astype(jnp.float32) for x in (q, k, v, g)))
    for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
      with self.subTest(name):
        self.assertEqual(a.dtype, dtype)
        self.assertTrue(np.isfinite(np.asarray(a, np.float32)).all())
        assert_close(a, b, _RTOL[dtype])
    # Row 2's first 8 queries see no key: zero output and zero dQ.
    np.testing.assert_array_equal(np.asarray(got[0][2, :8], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(got[1][2, :8], np.float32), 0.0)

  def test_visited_blocks(self):
    """The skipping rule: causal rows visit the lower block triangle; blocks of invalid keys
    and blocks of disjoint segments are skipped."""
    pos = jnp.broadcast_to(jnp.arange(64), (1, 64))
    visited = fa.visited_blocks(pos, pos, block_q=16, block_kv=16)
    np.testing.assert_array_equal(visited[0], np.tril(np.ones((4, 4), bool)))
    batch = _mixed_batch()
    visited = fa.visited_blocks(batch['q_pos'][:, :32], batch['kv_pos'][:, :48],
                                batch['q_segment_ids'][:, :32], batch['kv_segment_ids'][:, :48],
                                kv_valid=batch['kv_valid'][:, :48], block_q=16, block_kv=16)
    self.assertFalse(visited[3, :, 1].any())  # row 3's invalid key block
    # Row 0: query block 1 holds documents 2 and 3, key block 0 only document 1.
    self.assertFalse(visited[0, 1, 0])
    self.assertTrue(visited[0, 0, 0])

  def test_sharded_over_batch_and_heads(self):
    """Under jit on a 2 x 4 mesh (batch x heads) via shard_map: the reference's output and
    gradients."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
    attend = fa.sharded_flash_attention(mesh, 'data', 'model', block_sizes=_BLOCKS)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(keys[0], (2, 32, 8, 64))
    k, v = (jax.random.normal(key, (2, 32, 4, 64)) for key in keys[1:])
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    seg = (jnp.arange(32) >= 12).astype(jnp.int32)[None].repeat(2, 0)
    kw = dict(q_pos=pos, kv_pos=pos, q_segment_ids=seg, kv_segment_ids=seg)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kw)))
    heads = NamedSharding(mesh, P('data', None, 'model', None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    got = jax.jit(jax.value_and_grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss(fa.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, _RTOL[jnp.float32])
    with self.assertRaisesRegex(ValueError, 'k has 2 heads'):
      attend(q, k[:, :, :2], v[:, :, :2], **kw)

  def test_tpu_launch_in_interpreter(self):
    """The Mosaic launch (scalar-prefetched block statistics) in Pallas' TPU interpreter:
    output and gradients of a packed causal GQA row equal the reference's."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (1, 32, 2, 64))
    k, v = (jax.random.normal(key, (1, 32, 1, 64)) for key in keys[1:])
    seg = (jnp.arange(32) >= 20).astype(jnp.int32)[None]
    pos = jnp.arange(32)[None] - 20 * seg
    kw = dict(q_pos=pos, kv_pos=pos, q_segment_ids=seg, kv_segment_ids=seg)
    flash = lambda q, k, v: fa.flash_attention(q, k, v, block_sizes=_BLOCKS, platform='tpu',
                                               interpret=True, **kw)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    got = jax.jit(jax.value_and_grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    ref = lambda q, k, v: fa.reference_attention(q, k, v, **kw)
    want = jax.value_and_grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, _RTOL[jnp.float32])

  @parameterized.parameters(('gpu', 'cuda'), ('tpu', 'tpu'))
  def test_lowers_for_accelerators(self, platform, lowering_platform):
    """Forward and backward lower to Triton (GPU) and Mosaic (TPU) kernels, with default
    blocks, a padded head dim and ragged lengths (compiled only on the device)."""
    q = jax.ShapeDtypeStruct((2, 200, 4, 96), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 2, 96), jnp.bfloat16)
    q_pos = jax.ShapeDtypeStruct((2, 200), jnp.int32)
    kv_pos = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def loss(q, k, v, q_pos, kv_pos):
      out = fa.flash_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_segment_ids=q_pos,
                               kv_segment_ids=kv_pos, platform=platform, interpret=False)
      return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, k, k, q_pos, kv_pos).lower(
        lowering_platforms=(lowering_platform,)).as_text()
    for kernel in ('flash_fwd', 'flash_dq', 'flash_dkv'):
      self.assertIn(kernel, text)

  def test_bad_input(self):
    q = jnp.zeros((2, 8, 4, 64))
    k = jnp.zeros((2, 16, 2, 64))
    pos = dict(q_pos=jnp.zeros((2, 8), jnp.int32), kv_pos=jnp.zeros((2, 16), jnp.int32))
    cases = [
        ('num_heads=4 is not a multiple', (q, k[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2)),
         pos),
        ('head_dim=320', (jnp.zeros((2, 8, 4, 320)), jnp.zeros((2, 16, 2, 320)),
                          jnp.zeros((2, 16, 2, 320))), pos),
        ('^v has shape', (q, k, k[:, :8]), pos),
        ('^k has shape', (q, k[:, :, :, :32], k[:, :, :, :32]), pos),
        ('^q_pos has shape', (q, k, k), dict(pos, q_pos=pos['kv_pos'])),
        ('^kv_pos has shape', (q, k, k), dict(pos, kv_pos=pos['q_pos'])),
        ('^kv_segment_ids has shape', (q, k, k),
         dict(pos, q_segment_ids=pos['q_pos'], kv_segment_ids=pos['q_pos'])),
        ('given together', (q, k, k), dict(pos, q_segment_ids=pos['q_pos'])),
        ('^kv_valid has shape', (q, k, k), dict(pos, kv_valid=jnp.ones((2, 8), bool))),
        ('^platform=', (q, k, k), dict(pos, platform='metal')),
    ]
    for pattern, args, kwargs in cases:
      with self.subTest(pattern), self.assertRaisesRegex(ValueError, pattern):
        fa.flash_attention(*args, **kwargs)
    with self.assertRaisesRegex(ValueError, 'block_kv=24'):
      fa.BlockSizes(16, 24, 16, 16)


if __name__ == '__main__':
  absltest.main()
