"""Llama-style decoder: the "vanilla" baseline every other family builds on.

token embedding (tied or untied) -> L x block -> norm -> LM head, the block and norm of
``cfg.layer_style`` (``layers.DecoderBlock``, ``layers.make_norm``). Layers are a
Python loop of distinct modules (``layers_0`` ...) or, with ``scan_layers``, one
``nn.scan`` (parameters stacked under ``layers`` with a leading 'layers' axis; compile
time flat in depth).
"""
import flax.linen as nn
import jax.numpy as jnp

from model import kv_cache
from model.layers import DecoderBlock, Linear, ModelConfig, _init, make_norm, remat


class Embedder(nn.Module):
  """Token embedding and LM head; ``attend`` reuses the embedding when tied."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                          embedding_init=_init(cfg, ('vocab', 'embed')), name='embed')
    if not cfg.tie_embeddings:
      self.lm_head = Linear((cfg.vocab_size,), ('embed', 'vocab'), cfg, name='lm_head')

  def encode(self, tokens):
    return self.embed(tokens)

  def decode(self, x):
    logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


def run_layers(cfg: ModelConfig, x, ctx, layer_caches, num_layers, name='layers', block=None):
  """Applies ``num_layers`` blocks of ``cfg.layer_style`` (or ``block``s, same interface; loop
  or scan) inside the calling module.

  ``layer_caches`` is None or (k, v), each a tuple of per-layer buffers (``model.kv_cache``);
  returns (x, new caches in the same form). A cached call of scanned layers unrolls the scan
  (the parameters keep their stacked tree): XLA then reads each layer's buffer in place instead
  of copying its slice of the stacked scan input (the stacking and unstacking fold away).
  """
  block = block or DecoderBlock
  block = remat(block, cfg)
  if cfg.scan_layers:
    cached = layer_caches is not None
    scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(0, nn.broadcast), length=num_layers,
                      unroll=num_layers if cached else 1,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    stacked = None if not cached else tuple(jnp.stack(c) for c in layer_caches)
    x, new = scanned(cfg, name=name)(x, stacked, ctx)
    return x, (None if not cached else tuple(tuple(c) for c in new))
  new_k, new_v = [], []
  for i in range(num_layers):
    layer_kv = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
    x, kv = block(cfg, name=f'{name}_{i}')(x, layer_kv, ctx)
    if kv is not None:
      new_k.append(kv[0])
      new_v.append(kv[1])
  return x, (None if layer_caches is None else (tuple(new_k), tuple(new_v)))


class Llama(nn.Module):
  """``apply(params, tokens, positions, segment_ids, cache, train) -> (logits, aux)``.

  ``aux`` holds ``losses`` (auxiliary losses, already scaled; none for this family) and,
  when a cache was given, the updated ``cache``. The trainer also passes ``targets`` and
  ``loss_mask`` so that families with target-dependent auxiliary losses (early exit) can
  compute them, and the training ``step`` (MoR's capacity warm-up); this family ignores them.
  """
  cfg: ModelConfig

  def init_cache(self, batch, max_len):
    return kv_cache.init_cache_for(self.cfg, batch, max_len)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, train=False,
               targets=None, loss_mask=None, step=None):
    del train, targets, loss_mask, step  # No dropout, target- or step-dependent behaviour.
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embedder = Embedder(cfg, name='embedder')
    x = nn.with_logical_constraint(embedder.encode(tokens), ('batch', 'length', 'embed'))
    kv_ctx, layer_caches, new_cache = None, None, None
    if cache is not None:
      kv_ctx, new_cache = kv_cache.advance(cache, positions, segment_ids)
      layer_caches = (cache['k'], cache['v'])
    x, new_layer_caches = run_layers(cfg, x, (positions, segment_ids, kv_ctx), layer_caches,
                                     cfg.num_layers)
    x = make_norm(cfg, 'final_norm')(x)
    aux = {'losses': {}}
    if cache is not None:
      aux['cache'] = dict(new_cache, k=new_layer_caches[0], v=new_layer_caches[1])
    return embedder.decode(x), aux
