"""pallas_kernels.decode_attention (interpret mode on CPU) against the pure-jnp reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (DecodeBlockSizes, decode_attention,
                                             decode_attention_reference)


def _case(seed, b, t, h, hkv, s, d, lengths, dtype):
  """Random q and cache; kv_pos with holes (-1 slots); slots >= lengths hold NaN.

  Row 0 is a plain prefix, row 1 has empty slots inside its prefix, the last row is empty
  (all -1 and length 0). Query positions sit near each row's end so the causal mask cuts.
  """
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
  v = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
  kv_pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
  kv_pos[1, 3:9] = -1
  kv_pos[-1] = -1
  lengths = np.asarray(lengths, np.int32)
  kv_pos = np.where(np.arange(s) < lengths[:, None], kv_pos, -1)
  q_pos = np.maximum(lengths[:, None] - t, 0) + np.arange(t, dtype=np.int32)
  q_pos[0] -= 2  # Row 0's last keys are in its future.
  beyond = np.arange(s)[None, None, :, None] >= lengths[:, None, None, None]
  nan_k, nan_v = (np.where(beyond, np.nan, x) for x in (k, v))  # Never read by the kernel.
  cast = lambda x: jnp.asarray(x, dtype)
  args = dict(q_pos=jnp.asarray(q_pos), kv_pos=jnp.asarray(kv_pos), lengths=jnp.asarray(lengths))
  return (cast(q), cast(nan_k), cast(nan_v)), (cast(q), cast(k), cast(v)), args


@pytest.mark.parametrize(
    'platform,dtype,t,shape,lengths,block_sizes,atol',
    [  # GPU kernel: S=72 is not a multiple of chunk 32; row 1's last chunk is skipped.
        ('gpu', jnp.float32, 3, (4, 2, 72, 64), [61, 30, 0], DecodeBlockSizes(32, 16), 2e-5),
        # bf16 inputs, f32 accumulation; head dim 48 is padded to 64; MQA (Hkv = 1).
        ('gpu', jnp.bfloat16, 1, (4, 1, 72, 48), [72, 17, 0], DecodeBlockSizes(32, 16), 3e-2),
        # TPU kernel: 128-key blocks, S=300 leaves a partial edge block.
        ('tpu', jnp.float32, 1, (6, 2, 300, 128), [300, 140, 0], DecodeBlockSizes(256, 128),
         2e-5),
    ])
def test_matches_reference(platform, dtype, t, shape, lengths, block_sizes, atol):
  h, hkv, s, d = shape
  nan_inputs, clean_inputs, args = _case(0, len(lengths), t, h, hkv, s, d, lengths, dtype)
  out = decode_attention(*nan_inputs, **args, block_sizes=block_sizes, platform=platform,
                         interpret=True)
  # The reference runs in float32 on the same (rounded) inputs, without the NaN slots.
  ref = decode_attention_reference(*(x.astype(jnp.float32) for x in clean_inputs), **args)
  assert out.dtype == dtype and out.shape == (len(lengths), t, h, d)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=atol, rtol=atol)
  np.testing.assert_array_equal(np.asarray(out[-1], np.float32), 0.0)  # Empty row: zeros.


def test_no_visible_key_gives_zeros_without_nan():
  """Slots within the length that are all empty (-1) or all in the future give zeros."""
  (q, k, v), _, args = _case(1, 2, 2, 2, 2, 40, 64, [40, 40], jnp.float32)
  kv_pos = jnp.stack([jnp.full((40,), -1, jnp.int32), jnp.arange(40, dtype=jnp.int32) + 100])
  out = decode_attention(q, k, v, q_pos=args['q_pos'], kv_pos=kv_pos,
                         block_sizes=DecodeBlockSizes(32, 16), platform='gpu', interpret=True)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize('change,match', [
    (dict(q=jnp.zeros((2, 1, 4, 64))[0]), 'q must be a 4-d'),
    (dict(k_cache=jnp.zeros((2, 8, 8, 64)), v_cache=jnp.zeros((2, 8, 8, 64))), 'num_kv_heads'),
    (dict(v_cache=jnp.zeros((2, 2, 9, 64))), 'v_cache shape'),
    (dict(q=jnp.zeros((2, 1, 4, 64), jnp.float16)), 'q dtype'),
    (dict(kv_pos=jnp.zeros((2, 9), jnp.int32)), 'kv_pos must be'),
    (dict(q_pos=jnp.zeros((2, 1))), 'q_pos must be an integer'),
    (dict(lengths=jnp.zeros((3,), jnp.int32)), 'lengths must be'),
    (dict(scale=jnp.float32(1.0)), 'scale must be'),
    (dict(platform='cuda'), 'platform='),
    (dict(block_sizes=DecodeBlockSizes(32, 24)), 'block_sizes'),
    (dict(block_sizes=DecodeBlockSizes(256, 64), platform='tpu'), 'multiple of 128'),
])
def test_bad_input_raises(change, match):
  args = dict(q=jnp.zeros((2, 1, 4, 64)), k_cache=jnp.zeros((2, 2, 8, 64)),
              v_cache=jnp.zeros((2, 2, 8, 64)), q_pos=jnp.zeros((2, 1), jnp.int32),
              kv_pos=jnp.zeros((2, 8), jnp.int32), interpret=True)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    decode_attention(args.pop('q'), args.pop('k_cache'), args.pop('v_cache'), **args)


def test_attention_benchmark_runs_small(tmp_path):
  """``python -m bench.attention --small``: every row runs, and the kernels agree with XLA."""
  from bench import attention as bench_attention
  result = bench_attention.main(['--small', f'--out={tmp_path / "bench.json"}'])
  attn, decode = result['attention'], result['decode']
  assert {r['impl'].split()[0] for r in attn} >= {'xla', 'dpa'}
  assert all(r['error'] is None and r['tflops'] > 0 for r in attn), attn
  assert all(r['max_err_vs_xla'] < 0.1 for r in attn if r['max_err_vs_xla'] is not None)
  assert len(decode) == 2 and all(r['max_err'] < 0.05 and r['speedup'] > 0 for r in decode)
