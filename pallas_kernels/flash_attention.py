"""Flash attention in Pallas: blockwise online softmax, forward and backward.

FlashAttention-2 (Dao, arXiv:2307.08691): the forward pass (Algorithm 1) keeps a running
row max ``m``, row sum ``l`` and unnormalised output per query block while it walks the key
blocks, and saves the log-sum-exp ``L = m + log l``; the backward pass (Algorithm 2)
recomputes ``P = exp(S - L)`` block by block, with ``D = rowsum(dO * O)``:
``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dK = scale dS^T Q``, ``dQ = scale dS K``.
One kernel computes dK and dV per key block (looping over query blocks and the query heads
sharing that key head), another dQ per query block (looping over key blocks).

Masking follows ``model.attention.attention_mask``: a key is visible iff ``kv_pos >= 0``,
``kv_pos <= q_pos`` when causal, and the segment ids match; ``kv_valid`` (Mixture-of-
Recursions' inactive tokens) is folded into ``kv_pos`` as -1. A query with no visible key
returns zeros and gets zero gradients.

Block skipping: per-block statistics (max query position, min visible key position, and
the segment-id range of each block) are computed outside the kernels with ``jnp``; a
(query block, key block) pair is skipped when no key of it can be visible to any query of
it (``_block_visible``). The kernels never touch a skipped block's values, which gives the
causal speed-up and also covers packed rows, caches with empty slots and gathered tokens at
arbitrary positions.

Backends. One kernel body per pass serves every platform: a grid over (batch, head, block)
whose step loops over the other sequence in-kernel with ``lax.fori_loop`` and skips blocks
with ``lax.cond``; running max, sum and accumulator are loop carries. What differs is only
the launch (``_launch``):

- GPU (Triton lowering): plain ``grid``/``BlockSpec``s; the block statistics are ordinary
  inputs read as scalars; ``num_warps``/``num_stages`` compiler parameters.
- TPU (Mosaic): ``pltpu.PrefetchScalarGridSpec`` puts the block statistics in SMEM, all grid
  axes parallel (megacore); block shapes keep Mosaic's tiling (last two dims whole).
- CPU: the GPU launch under ``interpret=True`` (tests); ``platform='tpu', interpret=True``
  runs the Mosaic launch in Pallas' TPU interpreter.

Arrays are laid out [batch, head, blocks, block, head_dim] so every in-kernel access is a
dynamic index on a leading dimension. GQA: the key/value BlockSpec maps query head ``h`` to
key head ``h // (H / Hkv)``; K/V are never repeated. Verified on CPU only: the GPU launch
and the TPU launch run in interpret mode against the reference, and both lower to Triton
and Mosaic (``tests/test_flash_attention.py``); neither has run on a device yet.

Limits: on TPU a grid step holds one head's whole K/V (in the dK/dV kernel, one group's
whole Q/dO) in VMEM, which bounds the sequence length, and skipping saves compute but not
that copy (on GPU skipped blocks are never loaded); first-order gradients only; no dropout,
bias or logit soft-capping.
"""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

_NEG = -1e30  # masked logit; finite so that exp(m_old - m_new) never sees inf - inf
_EMPTY_LSE = 1e30  # log-sum-exp of a query with no visible key: exp(s - L) == 0
_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min
HEAD_DIMS = (64, 128, 256)  # supported head dims; others are zero-padded to the next one
PLATFORMS = ('gpu', 'tpu', 'cpu')
_MIN_BLOCK = {'gpu': (16, 16), 'cpu': (16, 16), 'tpu': (16, 128)}  # (query, key) minimum


def _is_pow2(n):
  return n > 0 and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key block lengths of the forward and of the two backward kernels."""
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 8 or not _is_pow2(value):
        raise ValueError(f'BlockSizes.{field.name}={value!r} must be a power of two >= 8.')

  @classmethod
  def default(cls, platform: str, head_dim: int) -> 'BlockSizes':
    """Defaults per platform and (padded) head dim."""
    if platform == 'tpu':
      return cls(128, 128, 128, 128)
    if head_dim <= 128:
      return cls(128, 64, 64, 64)
    return cls(64, 32, 32, 32)

  def fit(self, q_len: int, kv_len: int, platform: str) -> 'BlockSizes':
    """Shrinks blocks longer than the (power-of-two rounded) sequences."""
    min_q, min_kv = _MIN_BLOCK[platform]
    fq = lambda b: min(b, max(min_q, pl.next_power_of_2(q_len)))
    fk = lambda b: min(b, max(min_kv, pl.next_power_of_2(kv_len)))
    return BlockSizes(fq(self.block_q), fk(self.block_kv), fq(self.block_q_bwd),
                      fk(self.block_kv_bwd))


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  scale: float
  blocks: BlockSizes
  platform: str  # kernel launch: 'gpu' (also used for cpu) or 'tpu'
  interpret: bool
  num_warps: int


# ----------------------------------------------------------------------------- block skipping


def _block_visible(q_pos_max, q_seg_min, q_seg_max, kv_pos_min, kv_seg_min, kv_seg_max,
                   causal):
  """Whether a key block may hold a key visible to some query of a query block.

  Key-side statistics cover visible-able keys only (kv_pos >= 0); a block without any has
  kv_seg_min > kv_seg_max, so it fails the segment-overlap test. Works on scalars (in the
  kernels) and on broadcast arrays (``visited_blocks``).
  """
  visible = (kv_seg_min <= q_seg_max) & (kv_seg_max >= q_seg_min)
  if causal:
    visible = visible & (kv_pos_min <= q_pos_max)
  return visible


def _block_stats(q_pos, q_seg, kv_pos, kv_seg, block_q, block_kv):
  """Flat int32 statistics [B * nq * 3] and [B * nk * 3] (see ``_block_visible``)."""
  b = q_pos.shape[0]
  qp = q_pos.reshape(b, -1, block_q)
  qs = q_seg.reshape(b, -1, block_q)
  q_stats = jnp.stack([qp.max(-1), qs.min(-1), qs.max(-1)], -1)
  valid = (kv_pos >= 0).reshape(b, -1, block_kv)
  kp = kv_pos.reshape(b, -1, block_kv)
  ks = kv_seg.reshape(b, -1, block_kv)
  kv_stats = jnp.stack([jnp.where(valid, kp, _INT_MAX).min(-1),
                        jnp.where(valid, ks, _INT_MAX).min(-1),
                        jnp.where(valid, ks, _INT_MIN).max(-1)], -1)
  return q_stats.reshape(-1).astype(jnp.int32), kv_stats.reshape(-1).astype(jnp.int32)


def _visible_in_kernel(q_stats_ref, kv_stats_ref, b, i, j, nq, nk, causal):
  qo = (b * nq + i) * 3
  ko = (b * nk + j) * 3
  return _block_visible(q_stats_ref[qo], q_stats_ref[qo + 1], q_stats_ref[qo + 2],
                        kv_stats_ref[ko], kv_stats_ref[ko + 1], kv_stats_ref[ko + 2], causal)


# ----------------------------------------------------------------------------- kernel bodies


def _mask(q_pos, q_seg, kv_pos, kv_seg, causal):
  """[bq, bk] visibility from [bq, 1] query and [1, bk] key positions / segment ids."""
  mask = (kv_pos >= 0) & (q_seg == kv_seg)
  if causal:
    mask = mask & (kv_pos <= q_pos)
  return mask


def _dot_t(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(q_stats_ref, kv_stats_ref, q_ref, qp_ref, qs_ref, k_ref, v_ref, kp_ref, ks_ref,
                o_ref, lse_ref, *, cfg):
  """One query block against all visible key blocks (FlashAttention-2, Algorithm 1)."""
  b, i = pl.program_id(0), pl.program_id(2)
  nq, nk = pl.num_programs(2), k_ref.shape[0]
  q, q_pos, q_seg = q_ref[...], qp_ref[...], qs_ref[...]

  def step(j, carry):
    m, l, acc = carry
    k, v = k_ref[j], v_ref[j]
    mask = _mask(q_pos, q_seg, kp_ref[j], ks_ref[j], cfg.causal)
    s = jnp.where(mask, _dot_t(q, k) * cfg.scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return (m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True),
            alpha * acc + _dot(p.astype(v.dtype), v))

  def body(j, carry):
    visible = _visible_in_kernel(q_stats_ref, kv_stats_ref, b, i, j, nq, nk, cfg.causal)
    return lax.cond(visible, functools.partial(step, j), lambda c: c, carry)

  bq = q.shape[0]
  init = (jnp.full((bq, 1), _NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, nk, body, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen, acc / l, 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), _EMPTY_LSE)


def _probs(q, k, q_pos, q_seg, kv_pos, kv_seg, lse, cfg):
  mask = _mask(q_pos, q_seg, kv_pos, kv_seg, cfg.causal)
  return jnp.where(mask, jnp.exp(_dot_t(q, k) * cfg.scale - lse), 0.0)


def _dq_kernel(q_stats_ref, kv_stats_ref, q_ref, qp_ref, qs_ref, do_ref, lse_ref, delta_ref,
               k_ref, v_ref, kp_ref, ks_ref, dq_ref, *, cfg):
  """dQ of one query block, looping over the visible key blocks."""
  b, i = pl.program_id(0), pl.program_id(2)
  nq, nk = pl.num_programs(2), k_ref.shape[0]
  q, q_pos, q_seg, do = q_ref[...], qp_ref[...], qs_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def step(j, dq):
    k, v = k_ref[j], v_ref[j]
    p = _probs(q, k, q_pos, q_seg, kp_ref[j], ks_ref[j], lse, cfg)
    ds = p * (_dot_t(do, v) - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  def body(j, dq):
    visible = _visible_in_kernel(q_stats_ref, kv_stats_ref, b, i, j, nq, nk, cfg.causal)
    return lax.cond(visible, functools.partial(step, j), lambda c: c, dq)

  dq = lax.fori_loop(0, nk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_stats_ref, kv_stats_ref, q_ref, qp_ref, qs_ref, do_ref, lse_ref, delta_ref,
                k_ref, v_ref, kp_ref, ks_ref, dk_ref, dv_ref, *, cfg):
  """dK, dV of one key block, looping over visible query blocks and the group's heads."""
  b, j = pl.program_id(0), pl.program_id(2)
  groups, nq = q_ref.shape[0], q_ref.shape[1]
  nk = pl.num_programs(2)
  k, v, kv_pos, kv_seg = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]

  def head_step(i, g, carry):
    dk, dv = carry
    q, do = q_ref[g, i], do_ref[g, i]
    p = _probs(q, k, qp_ref[i], qs_ref[i], kv_pos, kv_seg, lse_ref[g, i], cfg)
    ds = p * (_dot_t(do, v) - delta_ref[g, i])
    return (dk + _dot(ds.astype(q.dtype).T, q), dv + _dot(p.astype(do.dtype).T, do))

  def body(i, carry):
    visible = _visible_in_kernel(q_stats_ref, kv_stats_ref, b, i, j, nq, nk, cfg.causal)
    heads = lambda c: lax.fori_loop(0, groups, functools.partial(head_step, i), c)
    return lax.cond(visible, heads, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, nq, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- launches


def _launch(kernel, cfg, name, grid, stats, in_specs, inputs, out_specs, out_shape):
  """pallas_call for cfg.platform; ``stats`` (two flat int32 arrays) go first."""
  kernel = functools.partial(kernel, cfg=cfg)
  if cfg.platform == 'tpu':
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs)
    params = pltpu.CompilerParams(dimension_semantics=('parallel',) * len(grid))
    interpret = pltpu.InterpretParams() if cfg.interpret else False
    call = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, name=name,
                          compiler_params=params, interpret=interpret)
  else:
    stat_specs = [pl.BlockSpec(s.shape, lambda *_: (0,)) for s in stats]
    params = None if cfg.interpret else plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                             num_stages=2)
    call = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, name=name,
                          in_specs=stat_specs + in_specs, out_specs=out_specs,
                          compiler_params=params, interpret=cfg.interpret)
  return call(*stats, *inputs)


def _blocked(x, block, axis):
  """Splits ``axis`` into [n_blocks, block]."""
  return x.reshape(x.shape[:axis] + (-1, block) + x.shape[axis + 1:])


def _side_inputs(pos, block_q, block_kv):
  """Positions/segments as [B, nq, bq, 1] (queries) and [B, nk, 1, bk] (keys)."""
  q_pos, q_seg, kv_pos, kv_seg = pos
  qcol = lambda x: _blocked(x, block_q, 1)[..., None]
  krow = lambda x: _blocked(x, block_kv, 1)[:, :, None, :]
  return qcol(q_pos), qcol(q_seg), krow(kv_pos), krow(kv_seg)


def _query_grid_specs(bq, bk, nk, d, groups):
  """BlockSpecs on the grid (batch, query head, query block) of the forward and dQ kernels:
  one query block (last dim ``w``), its positions, and all key blocks of the key head."""
  q_spec = lambda w: pl.BlockSpec((None, None, None, bq, w),
                                  lambda b, hh, i, *_: (b, hh, i, 0, 0))
  qside = pl.BlockSpec((None, None, bq, 1), lambda b, hh, i, *_: (b, i, 0, 0))
  kv_all = pl.BlockSpec((None, None, nk, bk, d),
                        lambda b, hh, i, *_: (b, lax.div(hh, groups), 0, 0, 0))
  kside_all = pl.BlockSpec((None, nk, 1, bk), lambda b, hh, i, *_: (b, 0, 0, 0))
  return q_spec, qside, kv_all, kside_all


def _forward(cfg, q, k, v, pos):
  """q [B, H, T, D], k/v [B, Hkv, S, D] (padded) -> out [B, H, T, D], lse [B, H, T, 1]."""
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
  bsz, h, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  nq, nk = t // bq, s // bk
  stats = _block_stats(*pos, bq, bk)
  qp, qs, kp, ks = _side_inputs(pos, bq, bk)
  q_spec, qside, kv_all, kside_all = _query_grid_specs(bq, bk, nk, d, h // hkv)
  out, lse = _launch(
      _fwd_kernel, cfg, 'flash_fwd', (bsz, h, nq), stats,
      [q_spec(d), qside, qside, kv_all, kv_all, kside_all, kside_all],
      [_blocked(q, bq, 2), qp, qs, _blocked(k, bk, 2), _blocked(v, bk, 2), kp, ks],
      [q_spec(d), q_spec(1)],
      [jax.ShapeDtypeStruct((bsz, h, nq, bq, d), q.dtype),
       jax.ShapeDtypeStruct((bsz, h, nq, bq, 1), jnp.float32)])
  return out.reshape(q.shape), lse.reshape(bsz, h, t, 1)


def _backward(cfg, q, k, v, pos, out, lse, do):
  """(dq, dk, dv) from the saved log-sum-exp, with delta = rowsum(dO * O)."""
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  bsz, h, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  groups, nq, nk = h // hkv, t // bq, s // bk
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  stats = _block_stats(*pos, bq, bk)
  qp, qs, kp, ks = _side_inputs(pos, bq, bk)
  q_blocks = [_blocked(x, bq, 2) for x in (q, do, lse, delta)]
  kv_blocks = [_blocked(k, bk, 2), _blocked(v, bk, 2)]

  # dQ: grid over (batch, query head, query block), all key blocks of the head's key head.
  q_spec, qside, kv_all, kside_all = _query_grid_specs(bq, bk, nk, d, groups)
  dq = _launch(
      _dq_kernel, cfg, 'flash_dq', (bsz, h, nq), stats,
      [q_spec(d), qside, qside, q_spec(d), q_spec(1), q_spec(1), kv_all, kv_all, kside_all,
       kside_all],
      [q_blocks[0], qp, qs, *q_blocks[1:], *kv_blocks, kp, ks],
      q_spec(d), jax.ShapeDtypeStruct(q_blocks[0].shape, q.dtype))

  # dK, dV: grid over (batch, key head, key block), all query blocks of the group's heads.
  group_spec = lambda w: pl.BlockSpec((None, groups, nq, bq, w),
                                      lambda b, hh, j, *_: (b, hh, 0, 0, 0))
  qside_all = pl.BlockSpec((None, nq, bq, 1), lambda b, hh, j, *_: (b, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, None, None, bk, d), lambda b, hh, j, *_: (b, hh, j, 0, 0))
  kside_spec = pl.BlockSpec((None, None, 1, bk), lambda b, hh, j, *_: (b, j, 0, 0))
  dk, dv = _launch(
      _dkv_kernel, cfg, 'flash_dkv', (bsz, hkv, nk), stats,
      [group_spec(d), qside_all, qside_all, group_spec(d), group_spec(1), group_spec(1),
       kv_spec, kv_spec, kside_spec, kside_spec],
      [q_blocks[0], qp, qs, *q_blocks[1:], *kv_blocks, kp, ks],
      [kv_spec, kv_spec], [jax.ShapeDtypeStruct(kv_blocks[0].shape, k.dtype)] * 2)
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, pos):
  return _forward(cfg, q, k, v, pos)[0]


def _flash_fwd(cfg, q, k, v, pos):
  out, lse = _forward(cfg, q, k, v, pos)
  return out, (q, k, v, pos, out, lse)


def _flash_bwd(cfg, residuals, do):
  q, k, v, pos, out, lse = residuals
  return (*_backward(cfg, q, k, v, pos, out, lse, do), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def _check_shape(name, x, shape):
  if x is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} has shape {tuple(x.shape)}; expected {tuple(shape)}.')


def _validate(q, k, v, q_pos, kv_pos, q_segment_ids, kv_segment_ids, kv_valid):
  if q.ndim != 4:
    raise ValueError(f'q must be [batch, q_len, heads, head_dim]; got shape {q.shape}.')
  if k.ndim != 4:
    raise ValueError(f'k must be [batch, kv_len, kv_heads, head_dim]; got shape {k.shape}.')
  _check_shape('v', v, k.shape)
  b, t, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f'k has shape {k.shape}; batch and head_dim must match q {q.shape}.')
  if h % k.shape[2]:
    raise ValueError(f'q num_heads={h} is not a multiple of k num_kv_heads={k.shape[2]}.')
  if d > HEAD_DIMS[-1]:
    raise ValueError(f'q head_dim={d} exceeds the supported maximum {HEAD_DIMS[-1]}.')
  if not (q.dtype == k.dtype == v.dtype and jnp.issubdtype(q.dtype, jnp.floating)):
    raise ValueError(f'q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, '
                     f'{v.dtype}.')
  s = k.shape[1]
  _check_shape('q_pos', q_pos, (b, t))
  _check_shape('kv_pos', kv_pos, (b, s))
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('q_segment_ids and kv_segment_ids must be given together.')
  _check_shape('q_segment_ids', q_segment_ids, (b, t))
  _check_shape('kv_segment_ids', kv_segment_ids, (b, s))
  _check_shape('kv_valid', kv_valid, (b, s))


def _resolve_platform(platform, interpret):
  platform = jax.default_backend() if platform is None else platform
  if platform not in PLATFORMS:
    raise ValueError(f'platform={platform!r} unknown; expected one of {PLATFORMS}.')
  interpret = platform == 'cpu' if interpret is None else bool(interpret)
  if platform == 'cpu' and not interpret:
    raise ValueError("platform='cpu' runs only with interpret=True.")
  return platform, interpret


def _pad_axis(x, axis, length, value):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def flash_attention(q, k, v, *, q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None,
                    causal=True, scale=None, kv_valid=None,
                    block_sizes: Optional[BlockSizes] = None, platform: Optional[str] = None,
                    interpret: Optional[bool] = None):
  """Flash attention with ``model.attention.attention``'s signature and masking.

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, Hkv, D] keys and values; H must be a multiple of Hkv (GQA).
    q_pos, kv_pos: int [B, T] / [B, S] positions; kv_pos < 0 marks an empty key slot.
    q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S] (given together).
    causal: whether a key must satisfy kv_pos <= q_pos.
    scale: logit scale; default D ** -0.5.
    kv_valid: optional bool [B, S]; False hides the key.
    block_sizes: ``BlockSizes``; default ``BlockSizes.default(platform, padded D)``.
    platform: 'gpu', 'tpu' or 'cpu'; default ``jax.default_backend()``.
    interpret: run the kernels in Pallas' interpreter; default True on 'cpu' only.

  Returns:
    [B, T, H, D] in q's dtype; zeros for queries without a visible key.
  """
  _validate(q, k, v, q_pos, kv_pos, q_segment_ids, kv_segment_ids, kv_valid)
  platform, interpret = _resolve_platform(platform, interpret)
  b, t, h, d = q.shape
  s = k.shape[1]
  d_pad = next(x for x in HEAD_DIMS if x >= d)
  blocks = block_sizes or BlockSizes.default(platform, d_pad)
  blocks = blocks.fit(t, s, platform)
  cfg = _Config(causal=bool(causal), scale=float(d ** -0.5 if scale is None else scale),
                blocks=blocks, platform='tpu' if platform == 'tpu' else 'gpu',
                interpret=interpret, num_warps=4 if d_pad <= 64 else 8)

  q_multiple = max(blocks.block_q, blocks.block_q_bwd)  # powers of two: a multiple of both
  kv_multiple = max(blocks.block_kv, blocks.block_kv_bwd)
  t_pad = pl.cdiv(t, q_multiple) * q_multiple
  s_pad = pl.cdiv(s, kv_multiple) * kv_multiple
  kv_pos = kv_pos.astype(jnp.int32)
  if kv_valid is not None:
    kv_pos = jnp.where(kv_valid, kv_pos, -1)
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((b, t), jnp.int32)
    kv_segment_ids = jnp.zeros((b, s), jnp.int32)
  # Padded queries: position -1 and the last real segment id leave the block statistics as
  # tight as without them; their outputs are sliced off and their dO is zero. Padded keys
  # are empty slots (position -1).
  pos = (_pad_axis(q_pos.astype(jnp.int32), 1, t_pad, -1),
         jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), mode='edge'),
         _pad_axis(kv_pos, 1, s_pad, -1),
         _pad_axis(kv_segment_ids.astype(jnp.int32), 1, s_pad, 0))
  to_kernel = lambda x, length: _pad_axis(_pad_axis(x, 1, length, 0), 3, d_pad, 0).transpose(
      0, 2, 1, 3)
  out = _flash(cfg, to_kernel(q, t_pad), to_kernel(k, s_pad), to_kernel(v, s_pad), pos)
  return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def reference_attention(q, k, v, *, q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None,
                        causal=True, scale=None, kv_valid=None):
  """Pure-jnp reference: ``model.attention.xla_attention`` with ``kv_valid`` as kv_pos -1."""
  from model.attention import xla_attention  # pylint: disable=g-import-not-at-top
  if kv_valid is not None:
    kv_pos = jnp.where(kv_valid, kv_pos, -1)
  return xla_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)


def visited_blocks(q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None, causal=True,
                   kv_valid=None, block_q=128, block_kv=128):
  """bool [B, nq, nk]: the (query block, key block) pairs the kernels compute.

  The same rule as the kernels' (``_block_visible``) on the same statistics; lengths must be
  multiples of the blocks. For inspecting how much block skipping saves.
  """
  if kv_valid is not None:
    kv_pos = jnp.where(kv_valid, kv_pos, -1)
  if q_segment_ids is None:
    q_segment_ids, kv_segment_ids = jnp.zeros_like(q_pos), jnp.zeros_like(kv_pos)
  q_stats, kv_stats = _block_stats(q_pos, q_segment_ids, kv_pos, kv_segment_ids, block_q,
                                   block_kv)
  b = q_pos.shape[0]
  qs = q_stats.reshape(b, -1, 1, 3)
  ks = kv_stats.reshape(b, 1, -1, 3)
  return _block_visible(qs[..., 0], qs[..., 1], qs[..., 2], ks[..., 0], ks[..., 1],
                        ks[..., 2], causal)


def sharded_flash_attention(mesh, batch_axes, head_axis, **kernel_kwargs):
  """``flash_attention`` under ``jax.shard_map`` on ``mesh``.

  Inputs are split over batch (``batch_axes``, a mesh axis name or tuple of names) and
  heads (``head_axis``: query and key heads alike, so each shard keeps whole GQA groups;
  both head counts must be divisible by the axis size). Sequences stay whole per shard.
  Returns a function with ``flash_attention``'s call signature (without the kernel
  options, fixed here by ``kernel_kwargs``: block_sizes, platform, interpret).
  """
  heads = mesh.shape[head_axis] if head_axis is not None else 1
  qkv_spec = P(batch_axes, None, head_axis, None)
  tok_spec = P(batch_axes, None)

  def attend(q, k, v, *, q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None,
             causal=True, scale=None, kv_valid=None):
    for name, x in (('q', q), ('k', k)):
      if x.ndim == 4 and x.shape[2] % heads:
        raise ValueError(f'{name} has {x.shape[2]} heads, not divisible by mesh axis '
                         f'{head_axis!r} of size {heads}.')
    _validate(q, k, v, q_pos, kv_pos, q_segment_ids, kv_segment_ids, kv_valid)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    optional = {name: x for name, x in (('q_segment_ids', q_segment_ids),
                                        ('kv_segment_ids', kv_segment_ids),
                                        ('kv_valid', kv_valid)) if x is not None}

    def local(q, k, v, q_pos, kv_pos, optional):
      return flash_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, causal=causal, scale=scale,
                             **optional, **kernel_kwargs)

    return jax.shard_map(
        local, mesh=mesh, out_specs=qkv_spec, check_vma=False,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, tok_spec, tok_spec,
                  {name: tok_spec for name in optional}))(q, k, v, q_pos, kv_pos, optional)

  return attend
