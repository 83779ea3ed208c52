"""Flash-decoding: a few new query tokens against a long, ragged KV cache, in Pallas.

Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference") splits the
key axis of each (row, KV head) into chunks processed in parallel. Each chunk runs the
online softmax of FlashAttention-2 (Dao 2023, Alg. 1) over its keys in blocks of
``block_k`` and emits a partial (max m, sum l, unnormalised output o); a final combine
rescales the partials to the common max: o = sum_j e^{m_j - m} o_j / sum_j e^{m_j - m} l_j.

Layout: q [B, T, H, D]; the cache is head-major k/v [B, Hkv, S, D] (``model.kv_cache``),
read in place. One program handles one (row, KV head, chunk) with all ``H / Hkv`` query
heads of the group and all T tokens stacked as the rows of one matmul (grouped-query
attention without repeating K/V). Visibility is ``model.attention``'s: slot s is visible to
query t when kv_pos[s] >= 0, kv_pos[s] <= q_pos[t] and s < lengths[b]. Slots at or past a
row's length are never used and chunks past it are never read: a chunk's block loop stops
at the length (the ragged-batch speed-up; on GPU the loads are masked), and on TPU the index
map of a chunk past it repeats the last valid chunk, so the pipeline skips its copy. A query
with no visible key returns zeros.

Kernels: one body, two loaders: Triton (GPU; masked loads, since Triton does not bound
blocks at the array's edge) and Mosaic (TPU; lengths scalar-prefetched into SMEM, edge
blocks masked after loading). On CPU the GPU kernel runs in interpret mode.
"""
import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from model import attention as attention_lib

_NEG = -1e30  # Finite "minus infinity": e^{m - m'} stays defined for empty partials.
_DTYPES = (jnp.float32, jnp.bfloat16)
_PLATFORMS = ('gpu', 'tpu')


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Keys per parallel chunk (``chunk``) and per online-softmax step inside it (``block_k``).

  GPU: powers of two >= 16. TPU: multiples of 128 (a key block is a lane-dense slice of
  ``kv_pos``). ``chunk`` must be a multiple of ``block_k``.
  """
  chunk: int
  block_k: int

  @classmethod
  def default(cls, platform: str, head_dim: int, interpret: bool = False) -> 'DecodeBlockSizes':
    """Per-platform defaults; wider heads take smaller key blocks (register/VMEM budget)."""
    if platform == 'tpu':
      return cls(chunk=1024, block_k=512) if head_dim <= 64 else cls(chunk=512, block_k=256)
    if platform == 'gpu':
      if interpret:  # Few, large steps: interpret mode pays per grid step and loop step.
        return cls(chunk=256, block_k=64)
      return cls(chunk=512, block_k=128) if head_dim <= 64 else cls(chunk=512, block_k=64)
    raise ValueError(f'platform={platform!r}; expected one of {_PLATFORMS}.')

  def validate(self, platform: str):
    if self.chunk % self.block_k:
      raise ValueError(f'block_sizes.chunk={self.chunk} is not a multiple of '
                       f'block_sizes.block_k={self.block_k}.')
    if platform == 'tpu':
      if self.block_k % 128:
        raise ValueError(f'block_sizes.block_k={self.block_k} must be a multiple of 128 on TPU.')
    elif self.block_k < 16 or self.block_k & (self.block_k - 1) or self.chunk & (self.chunk - 1):
      raise ValueError(f'block_sizes={self} must be powers of two >= 16 on GPU.')


def decode_attention_reference(q, k_cache, v_cache, *, q_pos, kv_pos, lengths=None, scale=None):
  """Pure-jnp reference: ``model.attention.xla_attention`` over the cache's slots < lengths."""
  if lengths is not None:
    kv_pos = jnp.where(jnp.arange(kv_pos.shape[1]) < lengths[:, None], kv_pos, -1)
  return attention_lib.xla_attention(q, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2),
                                     q_pos=q_pos, kv_pos=kv_pos, scale=scale)


def _check_inputs(q, k_cache, v_cache, q_pos, kv_pos, lengths, scale, block_sizes, platform):
  """Raises ValueError naming the first bad argument (shapes and dtypes are static)."""
  def shape(name, x, ndim):
    if not hasattr(x, 'shape') or len(x.shape) != ndim:
      raise ValueError(f'{name} must be a {ndim}-d array; got shape {getattr(x, "shape", x)}.')
    return x.shape

  b, t, h, d = shape('q', q, 4)
  kb, hkv, s, kd = shape('k_cache', k_cache, 4)
  if (kb, kd) != (b, d):
    raise ValueError(f'k_cache shape {k_cache.shape} must be [B={b}, Hkv, S, D={d}] '
                     '(head-major cache layout).')
  if shape('v_cache', v_cache, 4) != k_cache.shape:
    raise ValueError(f'v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}.')
  if h % hkv:
    raise ValueError(f'q has {h} heads, not a multiple of k_cache num_kv_heads={hkv}.')
  for name, x in (('q', q), ('k_cache', k_cache), ('v_cache', v_cache)):
    if x.dtype not in _DTYPES:
      raise ValueError(f'{name} dtype {x.dtype} unsupported; expected float32 or bfloat16.')
  if not q.dtype == k_cache.dtype == v_cache.dtype:
    raise ValueError(f'q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, '
                     f'{v_cache.dtype}.')
  for name, x, want in (('q_pos', q_pos, (b, t)), ('kv_pos', kv_pos, (b, s)),
                        ('lengths', lengths, (b,))):
    if x is None and name == 'lengths':
      continue
    if tuple(shape(name, x, len(want))) != want or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'{name} must be an integer array of shape {want}; got '
                       f'{x.dtype} {tuple(x.shape)}.')
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
    raise ValueError(f'scale must be a Python number or None; got {scale!r}.')
  if platform is not None and platform not in _PLATFORMS:
    raise ValueError(f'platform={platform!r}; expected one of {_PLATFORMS} or None.')
  if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
    raise ValueError(f'block_sizes must be a DecodeBlockSizes; got {block_sizes!r}.')


def _kernel(lengths_ref, q_ref, qpos_ref, k_ref, v_ref, kvpos_ref, o_ref, m_ref, l_ref, *,
            seq_len, chunk, block_k, scale, load):
  """One (row b, KV head, chunk j): online softmax over the chunk's blocks below the length.

  q_ref [M, D] (the group's heads x tokens), qpos_ref [M, 1], k_ref/v_ref [chunk, D],
  kvpos_ref [1, chunk]; writes o [M, D] (unnormalised, float32), m and l [M, 1].
  """
  b, j = pl.program_id(0), pl.program_id(2)
  start = j * chunk
  limit = jnp.minimum(lengths_ref[b], seq_len) - start  # Valid keys of this chunk (may be <= 0).
  num_blocks = (jnp.clip(limit, 0, chunk) + block_k - 1) // block_k
  q = q_ref[...]
  q_pos = qpos_ref[...]

  def step(i, carry):
    m_prev, l_prev, o_prev = carry
    off = pl.multiple_of(i * block_k, block_k)
    k, v, kv_pos, valid = load(k_ref, v_ref, kvpos_ref, off, limit)
    logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
    visible = valid & (kv_pos >= 0) & (kv_pos <= q_pos)  # [M, block_k]
    m = jnp.maximum(m_prev, jnp.max(jnp.where(visible, logits, _NEG), axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(logits - m), 0.0)
    alpha = jnp.exp(m_prev - m)
    o = alpha * o_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), o

  rows, d = q_ref.shape
  init = (jnp.full((rows, 1), _NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))
  m, l, o = jax.lax.fori_loop(0, num_blocks, step, init)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _load_block(platform, block_k):
  """The loader for ``platform``: (k, v, kv_pos [1, n], valid [1, n]) of the block at ``off``."""
  def in_range(off, limit, shape, axis):
    return off + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit

  def gpu(k_ref, v_ref, kvpos_ref, off, limit):
    keys, rows = pl.ds(off, block_k), in_range(off, limit, (block_k, 1), 0)
    valid = in_range(off, limit, (1, block_k), 1)
    return (plgpu.load(k_ref.at[keys, :], mask=rows, other=0.0),
            plgpu.load(v_ref.at[keys, :], mask=rows, other=0.0),
            plgpu.load(kvpos_ref.at[:, keys], mask=valid, other=-1), valid)

  def tpu(k_ref, v_ref, kvpos_ref, off, limit):
    keys = pl.ds(off, block_k)
    # A block at the array's edge holds undefined values past S: zero v there (p = 0 would
    # not cancel a NaN); logits there are masked by ``valid``.
    v = jnp.where(in_range(off, limit, (block_k, 1), 0), v_ref[keys, :], 0).astype(v_ref.dtype)
    return (k_ref[keys, :], v, kvpos_ref[:, keys], in_range(off, limit, (1, block_k), 1))

  return gpu if platform == 'gpu' else tpu


def _round_up(x, m):
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=('scale', 'block_sizes', 'platform', 'interpret'))
def _decode(q, k_cache, v_cache, q_pos, kv_pos, lengths, *, scale, block_sizes, platform,
            interpret):
  b, t, h, d = q.shape
  _, hkv, s, _ = k_cache.shape
  g = h // hkv
  chunk, block_k = block_sizes.chunk, block_sizes.block_k
  num_chunks = pl.cdiv(s, chunk)
  # Rows of the group's matmul: (token, head) pairs, padded to a power of two >= 16 (the
  # smallest Triton dot; a whole bf16 sublane tile on TPU). Padded rows have position -1.
  rows = max(16, 1 << (t * g - 1).bit_length())
  dp = d if platform == 'tpu' else max(16, 1 << (d - 1).bit_length())  # Triton: power of two.
  qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - t * g), (0, dp - d)))
  if dp != d:  # Odd head dims only: copies the cache.
    pad = ((0, 0), (0, 0), (0, 0), (0, dp - d))
    k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
  row_pos = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), ((0, 0), (0, rows - t * g)),
                    constant_values=-1)[:, :, None]
  kv_pos = kv_pos.astype(jnp.int32)[:, None, :]
  lengths = (jnp.full((b,), s, jnp.int32) if lengths is None else
             jnp.clip(lengths.astype(jnp.int32), 0, s))

  kernel = functools.partial(_kernel, seq_len=s, chunk=chunk, block_k=block_k, scale=scale,
                             load=_load_block(platform, block_k))
  out_shape = [jax.ShapeDtypeStruct((b, hkv, num_chunks, rows, dp), jnp.float32),
               jax.ShapeDtypeStruct((b, hkv, num_chunks, rows, 1), jnp.float32),
               jax.ShapeDtypeStruct((b, hkv, num_chunks, rows, 1), jnp.float32)]
  if platform == 'tpu':
    # Chunks past a row's length map to its last valid chunk: the pipeline skips the copy.
    last = lambda bi, lens: jnp.maximum(pl.cdiv(lens[bi], chunk) - 1, 0)
    kv_index = lambda bi, hi, ji, lens: (bi, hi, jnp.minimum(ji, last(bi, lens)), 0)
    out_specs = [pl.BlockSpec((None, None, None, rows, w),
                              lambda bi, hi, ji, lens: (bi, hi, ji, 0, 0)) for w in (dp, 1, 1)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, hkv, num_chunks),
        in_specs=[pl.BlockSpec((None, None, rows, dp), lambda bi, hi, ji, lens: (bi, hi, 0, 0)),
                  pl.BlockSpec((None, rows, 1), lambda bi, hi, ji, lens: (bi, 0, 0)),
                  pl.BlockSpec((None, None, chunk, dp), kv_index),
                  pl.BlockSpec((None, None, chunk, dp), kv_index),
                  pl.BlockSpec((None, 1, chunk), lambda bi, hi, ji, lens: (
                      bi, 0, jnp.minimum(ji, last(bi, lens))))],
        out_specs=out_specs)
    call = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',) * 3),
        name='decode_attention')
  else:
    out_specs = [pl.BlockSpec((None, None, None, rows, w), lambda bi, hi, ji: (bi, hi, ji, 0, 0))
                 for w in (dp, 1, 1)]
    call = pl.pallas_call(
        kernel, grid=(b, hkv, num_chunks), out_shape=out_shape, interpret=interpret,
        in_specs=[pl.BlockSpec((b,), lambda bi, hi, ji: (0,)),
                  pl.BlockSpec((None, None, rows, dp), lambda bi, hi, ji: (bi, hi, 0, 0)),
                  pl.BlockSpec((None, rows, 1), lambda bi, hi, ji: (bi, 0, 0)),
                  pl.BlockSpec((None, None, chunk, dp), lambda bi, hi, ji: (bi, hi, ji, 0)),
                  pl.BlockSpec((None, None, chunk, dp), lambda bi, hi, ji: (bi, hi, ji, 0)),
                  pl.BlockSpec((None, 1, chunk), lambda bi, hi, ji: (bi, 0, ji))],
        out_specs=out_specs, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name='decode_attention')
  o, m, l = call(lengths, qg, row_pos, k_cache, v_cache, kv_pos)

  # Combine the chunks' partials (FlashAttention-2's rescaling across chunks).
  m_all = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - m_all)
  l_all = jnp.sum(w * l, axis=2)
  o = jnp.sum(w * o, axis=2)
  out = jnp.where(l_all > 0, o / jnp.where(l_all > 0, l_all, 1.0), 0.0)
  out = out[:, :, :t * g, :d].reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, h, d).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, *, q_pos, kv_pos, lengths=None, scale=None,
                     block_sizes: Optional[DecodeBlockSizes] = None,
                     platform: Optional[str] = None, interpret: Optional[bool] = None):
  """Attention of T new tokens per row over a head-major KV cache (flash-decoding).

  Args:
    q: [B, T, H, D] float32 or bfloat16 queries (T small: one or a few decode tokens).
    k_cache, v_cache: [B, Hkv, S, D], the same dtype; H must be a multiple of Hkv.
    q_pos: int [B, T] query positions. kv_pos: int [B, S] slot positions, -1 = empty.
    lengths: optional int [B]; slots >= lengths[b] are neither read nor attended.
    scale: logit scale (Python number), default D ** -0.5.
    block_sizes: ``DecodeBlockSizes``; default ``DecodeBlockSizes.default(platform, D)``.
    platform: 'gpu' (Triton) or 'tpu' (Mosaic); default: the default backend's ('gpu' on CPU).
    interpret: run the kernel in Pallas interpret mode; default: when the backend is CPU.

  Returns:
    [B, T, H, D] in q's dtype (float32 accumulation); zeros for a query with no visible key.
  """
  _check_inputs(q, k_cache, v_cache, q_pos, kv_pos, lengths, scale, block_sizes, platform)
  backend = jax.default_backend()
  if platform is None:
    platform = 'tpu' if backend == 'tpu' else 'gpu'
  if interpret is None:
    interpret = backend == 'cpu'
  if block_sizes is None:
    block_sizes = DecodeBlockSizes.default(platform, q.shape[-1], interpret)
  block_sizes.validate(platform)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _decode(q, k_cache, v_cache, q_pos, kv_pos, lengths, scale=scale,
                 block_sizes=block_sizes, platform=platform, interpret=interpret)
