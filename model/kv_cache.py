"""Functional KV caches shared by every model family.

A cache is a plain dict pytree:
  ``k``, ``v``: tuples of L per-layer buffers [B, Hkv, S, D] (L cache layers; head-major),
  ``pos``: [B, S] int32 position of the token in each slot, -1 where empty,
  ``end``: int32 scalar, the next slot to write (the same for every row).
Each forward call writes its T tokens at slots ``end .. end+T-1`` of every row (padding
tokens, segment id 0, are written with position -1 so nobody attends to them) and
advances ``end`` by T. Writing past S is not checked inside ``jit`` (slots would be
clamped); callers check ``end + T <= S`` statically, as ``model.decode.generate`` does.

Why this layout: a cached call should cost one read of the cache plus writing its new
entries. Each layer writes its entries into its own buffer with one dynamic-update-slice (in
place when the cache is donated; all rows share the write slot, since a per-row write is a
scatter) and attention's matmuls read the buffer as it is. XLA:CPU copies a layer's slice of
a stacked [L, ...] buffer, and transposes a [B, S, Hkv, D] one, before the matmuls: with the
earlier stacked [L, B, S, Hkv, D] cache a decode step moved about 9 cache reads, with this
one about 1.2 (``decode_step_bytes``; tests/test_decode.py, bench/decode.py). Engines that
pick cache layers by a traced depth index use ``stack_layers``.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from model.layers import KVContext, write_slots


def init_cache(num_layers, batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32):
  """An empty cache for ``max_len`` slots per row."""
  shape = (batch, num_kv_heads, max_len, head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
  return {'k': zeros(), 'v': zeros(), 'pos': jnp.full((batch, max_len), -1, jnp.int32),
          'end': jnp.zeros((), jnp.int32)}


def init_cache_for(cfg, batch, max_len, num_layers=None):
  """An empty cache for a model config: one cache layer per unrolled layer by default."""
  return init_cache(cfg.num_layers if num_layers is None else num_layers, batch, max_len,
                    cfg.num_kv_heads, cfg.dims_per_head, cfg.compute_dtype)


def stack_layers(cache):
  """The cache with ``k``/``v`` stacked into [L, B, Hkv, S, D] arrays."""
  return dict(cache, k=jnp.stack(cache['k']), v=jnp.stack(cache['v']))


def advance(cache, positions, segment_ids=None):
  """Returns (KVContext for this call's layers, cache with ``pos``/``end`` updated)."""
  new_pos = positions if segment_ids is None else jnp.where(segment_ids > 0, positions, -1)
  pos = write_slots(cache['pos'], new_pos.astype(jnp.int32), cache['end'])
  ctx = KVContext(kv_pos=pos, write_idx=cache['end'])
  return ctx, dict(cache, pos=pos, end=cache['end'] + positions.shape[1])


def decode_step_bytes(model, batch, max_len):
  """(bytes accessed, bytes of one layer's keys+values) of one cached decode step.

  XLA's cost analysis of ``model.apply`` on one token per row with a donated ``max_len``-slot
  cache, compiled for abstract inputs (nothing is allocated). XLA counts a
  dynamic-update-slice as its update, a scatter as its whole operand and a ``while`` body once.
  """
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  variables = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
  step = jax.jit(lambda v, tok, pos, c: model.apply(v, tok, positions=pos, cache=c),
                 donate_argnums=3)
  cost = step.lower(variables, tokens, tokens, cache).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  layer = cache['k'][0]
  return cost['bytes accessed'], 2 * layer.size * layer.dtype.itemsize
