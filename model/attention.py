"""Attention as one function with several implementations.

``attention(q, k, v, q_pos=..., kv_pos=...)`` masks by *positions*, not array indices:
a key is visible to a query when ``kv_pos <= q_pos`` (causal), ``kv_pos >= 0`` (a slot
holding a real token; caches mark empty slots with -1) and the segment ids match (packed
documents). This makes gathered token subsets (Mixture-of-Recursions) and KV caches work
with the same code. Grouped-query attention: ``k``/``v`` carry ``num_kv_heads`` heads and
each serves ``num_heads // num_kv_heads`` query heads.

Implementations (``impl``, the models' ``attention_impl``): ``xla`` (the pure-``jnp``
reference below), ``pallas`` (``pallas_kernels.flash_attention``: blockwise flash attention
with a custom VJP; Triton on GPU, Mosaic on TPU, interpret mode on CPU, where it is slow and
only for tests) and ``auto`` (``pallas`` on GPU and TPU, ``xla`` on CPU). Cached decoding
with ``pallas`` uses the flash-decoding kernel (``decode``; ``model.layers.Attention``).
"""
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_NEG_INF = -1e30


def attention_mask(q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None, causal=True):
  """Boolean mask [B, T, S]: which key slots each query may attend to."""
  mask = (kv_pos >= 0)[:, None, :]
  if causal:
    mask = mask & (kv_pos[:, None, :] <= q_pos[:, :, None])
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def xla_attention(q, k, v, *, q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None,
                  causal=True, scale=None):
  """Reference attention. q: [B, T, H, D]; k, v: [B, S, Hkv, D]; positions int [B, T] / [B, S].

  Softmax runs in float32; a query with no visible key returns zeros.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f'num_heads={h} is not a multiple of num_kv_heads={hkv}.')
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_pos, kv_pos, q_segment_ids, kv_segment_ids, causal)
  logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1)
  weights = jnp.where(mask[:, None, None], weights, 0.0)
  out = jnp.einsum('bkgts,bskd->btkgd', weights.astype(v.dtype), v)
  return out.reshape(b, t, h, d)


def _mesh_axes(batch_size, kv_heads):
  """(mesh, batch axes, head axis) of the mesh set around the caller (``jax.set_mesh``, as the
  trainer does) under the current logical-axis rules, or None without a mesh. A Pallas
  kernel is one opaque call that XLA cannot partition, so it runs per shard (``shard_map``);
  an axis that does not divide its dimension (e.g. the batch of 1 of an init) is not split."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  size = lambda axes: math.prod(mesh.shape[a] for a in (
      () if axes is None else (axes,) if isinstance(axes, str) else axes))
  batch, heads = nn.logical_to_mesh_axes(('batch', 'heads'))
  return (mesh, batch if batch_size % size(batch) == 0 else None,
          heads if kv_heads % size(heads) == 0 else None)


def pallas_attention(q, k, v, **kwargs):
  """``pallas_kernels.flash_attention.flash_attention``, per shard of batch and heads under a
  mesh (imported on first use, so Pallas loads only for models that ask for it)."""
  from pallas_kernels import flash_attention  # pylint: disable=g-import-not-at-top
  axes = _mesh_axes(q.shape[0], k.shape[2])
  if axes is None:
    return flash_attention.flash_attention(q, k, v, **kwargs)
  return flash_attention.sharded_flash_attention(*axes)(q, k, v, **kwargs)


def decode(q, k_cache, v_cache, *, q_pos, kv_pos):
  """A few new queries [B, T, H, D] against a head-major cache [B, Hkv, S, D] with the
  flash-decoding kernel (``pallas_kernels.decode_attention``), per shard of batch and heads
  under a mesh; same masking as ``attention``."""
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top
  kernel = decode_attention.decode_attention
  axes = _mesh_axes(q.shape[0], k_cache.shape[1])
  if axes is None:
    return kernel(q, k_cache, v_cache, q_pos=q_pos, kv_pos=kv_pos)
  mesh, batch, heads = axes
  tokens, queries, cache = P(batch, None), P(batch, None, heads, None), P(batch, heads, None, None)
  local = lambda q, k, v, qp, kp: kernel(q, k, v, q_pos=qp, kv_pos=kp)
  return jax.shard_map(local, mesh=mesh, in_specs=(queries, cache, cache, tokens, tokens),
                       out_specs=queries, check_vma=False)(q, k_cache, v_cache, q_pos, kv_pos)


IMPLEMENTATIONS: dict[str, Callable] = {'xla': xla_attention, 'pallas': pallas_attention}
IMPLS = ('xla', 'pallas', 'auto')


def resolve(impl: str) -> str:
  """``impl`` with ``auto`` resolved for the default backend."""
  if impl not in IMPLS:
    raise ValueError(f'attention impl={impl!r} unknown; available: {list(IMPLS)}.')
  if impl == 'auto':
    return 'pallas' if jax.default_backend() in ('gpu', 'tpu') else 'xla'
  return impl


def attention(q, k, v, *, q_pos, kv_pos, q_segment_ids=None, kv_segment_ids=None,
              causal=True, impl: str = 'xla', scale: Optional[float] = None):
  """Dispatches to the implementation named ``impl`` (see module docstring)."""
  impl = resolve(impl)
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  return IMPLEMENTATIONS[impl](q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)


DECODE_MAX_QUERIES = 8  # cached calls with at most this many new tokens use the decode kernel


def cached_attention(q, k_cache, v_cache, *, q_pos, kv_pos, q_segment_ids=None,
                     kv_segment_ids=None, impl: str = 'xla'):
  """Attention of new queries [B, T, H, D] over a head-major cache [B, Hkv, S, D] (keys at
  ``kv_pos``, -1 = empty). With ``pallas``, a decode step (T <= ``DECODE_MAX_QUERIES``, no
  segment ids) runs the flash-decoding kernel on the cache as it is laid out; otherwise
  ``attention`` reads the cache as [B, S, Hkv, D] (XLA folds the transpose into its matmul)."""
  impl = resolve(impl)
  if impl == 'pallas' and q.shape[1] <= DECODE_MAX_QUERIES and q_segment_ids is None:
    return decode(q, k_cache, v_cache, q_pos=q_pos, kv_pos=kv_pos)
  return attention(q, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), q_pos=q_pos,
                   kv_pos=kv_pos, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                   impl=impl)
