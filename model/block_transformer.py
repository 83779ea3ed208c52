"""Block Transformer (Ho et al. 2024, arXiv:2406.02657): global-to-local language modelling.

Three parts (§2):

* Embedder (§2.1, ``lookup``): a token table of width ``embed_dim // block_len``; the
  ``L_B = block_len`` embeddings of a block are concatenated into one block embedding of
  width ``embed_dim`` (padding tokens, segment 0, contribute zeros).
* Block decoder (§2.2): blocks of ``layer_style`` (our Llama layers, or ``gpt_neox`` as the
  paper's models; ``model.layers.DecoderBlock``) with causal self-attention over the blocks
  (RoPE position = block index in its document, ``positions[first token] // L_B``; masked by
  the segment id of the block's first token), then a norm. Its output for block i is the
  context of block i + 1. The context of a document's first block is a learned start vector
  (``predict_first_block=True``) or zeros (``False``, the reference behaviour: that block's
  tokens get no real prediction; ``aux['predicted']`` / ``predicted_targets`` mark them).
* Token decoder (§2.3): its own DecoderBlocks of width ``token_embed_dim``, its own token
  embedding and LM head (tied when ``tie_embeddings``), run on every block independently
  (reshaped to [B * blocks, length, width]; local positions 0, 1, ... restart per block).
  ``'prefix'``: the context is projected (with a bias for gpt_neox layers, as the authors'
  1x1-convolution expansion layer) to ``expansion_ratio`` (r) prefix vectors; the input
  is ``[prefix_0 .. prefix_{r-1}, emb(t_0) .. emb(t_{L_B-2})]`` and the outputs from position
  r - 1 on predict ``t_0 .. t_{L_B-1}``. ``'summation'`` (MEGABYTE-style): the context
  (projected when the widths differ) is added to every input of
  ``[learned start token, emb(t_0) .. emb(t_{L_B-2})]``, whose outputs predict
  ``t_0 .. t_{L_B-1}``. ``'cross_attention'`` (T5-style): the inputs are those of
  ``'summation'`` without the added context; instead every token-decoder layer
  (``CrossAttentionBlock``) cross-attends to the context expanded to ``expansion_ratio``
  memory vectors.

Alignment with the data pipeline (``tokens = x[:-1]``, ``targets = x[1:]``; ``logits[:, t]``
is scored against ``x[t+1]``). Blocks are defined on the model's input ``x[0:T]``
(``T % L_B == 0``, N = T / L_B blocks): block i is ``x[iL_B : (i+1)L_B]``. The token decoder
of block i predicts exactly what the paper's does, ``p(x[iL_B + j] | ctx_i, x[iL_B : iL_B + j])``
for j < L_B, with ``ctx_i`` the block decoder's summary of blocks < i. Those L_B predictions
of x at indices iL_B .. iL_B + L_B - 1 are ``logits[:, iL_B - 1 : iL_B + L_B - 1]``: so
``logits[:, t]`` for t = iL_B + j (j < L_B - 1) comes from block i's token decoder, and the
last position of a block (t = iL_B + L_B - 1, target x[(i+1)L_B]) comes from block i + 1's
first prediction (its prefix / start slot), whose context has seen block i. The prediction
of x[0] (not a target) is dropped, and one extra token-decoder block (index N, context = the
block decoder's output for block N - 1, no token inputs) predicts the last target x[T]. The
trainer's cross-entropy of ``logits`` against ``targets`` under ``loss_mask`` is therefore
the paper's objective on x[1 : T+1] (x[0] is given, as a BOS). Causality: ``logits[:, t]``
depends on ``tokens[:, :t+1]`` only.

Cached generation (``init_cache``; ``model.decode.generate`` and ``model.engine.BlockEngine``
drive it). The cache holds the block decoder's KV over finished blocks (``ceil(max_len / L_B)``
slots per row, written at the block's index), the token decoder's local KV of the current
block (``head_slots + L_B - 1`` slots, the same local positions as the forward pass), the
current block's tokens and its context. A cached call with several tokens or with
``segment_ids`` is a *prefill* from an empty cache: each row's real tokens (segment id > 0, a
prefix of the row, at positions 0, 1, ...) fill the cache: the block decoder runs once over
the finished blocks, the token decoder over the head slots and the unfinished block's tokens;
it returns the next-token logits [B, 1, V]. A call with one token and no ``segment_ids`` is a
*decode step* at the row's position t: a token that finishes its block (t % L_B = L_B - 1)
runs the block decoder once on that block and the token decoder on the new block's head slots
(fresh local KV); any other token is one token-decoder step. Rows may be at different offsets
in their blocks (prompts that end mid-block): each part runs under ``nn.cond`` only when some
row needs it, so a batch whose rows are aligned runs the block decoder once per L_B steps.
Logits [B, 1, V] of a decode step equal the forward pass's at that position.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import kv_cache
from model.layers import (MLP, Attention, KVContext, Linear, ModelConfig, RMSNorm, _init,
                          make_norm, write_slots)
from model.llama import Embedder, run_layers

_TOKEN_DECODERS = ('prefix', 'summation', 'cross_attention')


@dataclasses.dataclass(frozen=True)
class BlockConfig(ModelConfig):
  """ModelConfig plus the Block Transformer options (see module docstring).

  ``embed_dim`` is the block decoder's width; ``block_layers`` / ``token_layers`` (0: the
  ``num_layers`` value) the two decoders' depths; ``token_embed_dim`` (0: ``embed_dim``) the
  token decoder's width. Heads, ``head_dim`` and ``mlp_dim`` are shared by both decoders.
  """
  name: str = 'block'
  block_len: int = 4
  block_layers: int = 0
  token_layers: int = 0
  token_embed_dim: int = 0
  token_decoder: str = 'prefix'
  expansion_ratio: int = 2
  predict_first_block: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.token_decoder == 'cross_attention' and self.layer_style != 'llama':
      raise ValueError(f'model.token_decoder=cross_attention is built for layer_style=llama '
                       f'only (got model.layer_style={self.layer_style!r}).')
    if self.token_decoder not in _TOKEN_DECODERS:
      raise ValueError(f'model.token_decoder={self.token_decoder!r}; expected one of '
                       f'{_TOKEN_DECODERS}.')
    for field in ('block_len', 'expansion_ratio'):
      if getattr(self, field) < 1:
        raise ValueError(f'model.{field}={getattr(self, field)} must be >= 1.')
    for field in ('block_layers', 'token_layers', 'token_embed_dim'):
      if getattr(self, field) < 0:
        raise ValueError(f'model.{field}={getattr(self, field)} must be >= 0 (0: default).')
    if self.embed_dim % self.block_len:
      raise ValueError(f'model.embed_dim={self.embed_dim} is not divisible by '
                       f'model.block_len={self.block_len} (the block embedding concatenates '
                       'block_len token embeddings).')
    if not self.head_dim and self.token_width % self.num_heads:
      raise ValueError(f'model.token_embed_dim={self.token_width} is not divisible by '
                       f'model.num_heads={self.num_heads}; set model.head_dim.')

  @property
  def token_width(self) -> int:
    return self.token_embed_dim or self.embed_dim

  @property
  def block_depth(self) -> int:
    return self.block_layers or self.num_layers

  @property
  def head_slots(self) -> int:
    """Token-decoder slots before a block's token inputs: the prefix, or the start token."""
    return self.expansion_ratio if self.token_decoder == 'prefix' else 1

  @property
  def local_len(self) -> int:
    """Token-decoder inputs per block: the head slots and the block's first L_B - 1 tokens."""
    return self.head_slots + self.block_len - 1

  @property
  def token_config(self) -> ModelConfig:
    """The token decoder's ModelConfig: this config at width ``token_width``."""
    base = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**dict(base, name='llama', embed_dim=self.token_width,
                              num_layers=self.token_layers or self.num_layers))


def predicted_targets(cfg: BlockConfig, positions):
  """Bool [B, T]: which targets get a real prediction. With ``predict_first_block=False``
  the tokens of a document's first block (in-document position < ``block_len``; the
  position of target t is ``positions[t + 1]``, ``positions[T - 1] + 1`` for the last) do
  not; mask them out of the loss (``loss_mask * predicted``)."""
  if cfg.predict_first_block:
    return jnp.ones(positions.shape, bool)
  target_pos = jnp.concatenate([positions[:, 1:], positions[:, -1:] + 1], axis=1)
  return target_pos >= cfg.block_len


def receptive_field(block_len, length):
  """How ``logits[:, t]`` (the prediction of token t + 1) sees token s, as an int array
  [length, length] (the alignment of the module docstring): 2 where the token decoder attends
  to s directly (s in the block whose token decoder predicts t + 1, s <= t), 1 where s reaches
  it only through that block's context (an earlier block, summarised by the block decoder,
  §2.2), 0 where s > t. A vanilla decoder's row t is 2 for every s <= t."""
  if block_len < 1 or length < 1:
    raise ValueError(f'block_len={block_len} and length={length} must be >= 1.')
  t, s = np.arange(length)[:, None], np.arange(length)[None]
  local_start = (t + 1) // block_len * block_len  # first token of t + 1's block
  return np.where(s > t, 0, np.where(s >= local_start, 2, 1))


class CrossAttentionBlock(nn.Module):
  """Token-decoder layer of the ``cross_attention`` decoder (§2.3, the T5-style option):
  x + SelfAttn(norm x); x + CrossAttn(norm x, memory); x + MLP(norm x). ``ctx`` is the
  DecoderBlock's ``(positions, segment_ids, kv_ctx)`` plus the memory [B', M, W] of the
  tokens' block, which every token sees whole (``layers.Attention``'s memory policy)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer_kv, ctx):
    positions, segment_ids, kv_ctx, memory = ctx
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, name=name)
    attn_out, new_kv = Attention(cfg, name='attn')(norm('attn_norm')(x), positions, segment_ids,
                                                   layer_kv, kv_ctx)
    x = x + attn_out
    x = x + Attention(cfg, name='cross')(norm('cross_norm')(x), None, None, memory=memory)[0]
    x = x + MLP(cfg, name='mlp')(norm('mlp_norm')(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


class BlockTransformer(nn.Module):
  """``apply(params, tokens, positions, segment_ids, cache, train) -> (logits, aux)``.

  Without a cache, ``logits[:, t]`` predicts ``tokens[:, t+1]`` (module docstring) and ``aux``
  holds ``losses`` (none) and ``predicted`` (``predicted_targets``). With a cache: a prefill
  or a decode step (module docstring), ``aux['cache']`` the updated cache. ``targets``,
  ``loss_mask`` and ``step`` are accepted for the trainer's interface and ignored.
  """
  cfg: BlockConfig

  def init_cache(self, batch, max_len):
    """An empty cache for rows of up to ``max_len`` tokens (filled by a prefill call)."""
    cfg, tcfg = self.cfg, self.cfg.token_config

    def layers(c, num_layers, slots):
      empty = kv_cache.init_cache(num_layers, batch, slots, c.num_kv_heads, c.dims_per_head,
                                  c.compute_dtype)
      return {k: empty[k] for k in ('k', 'v', 'pos')}  # rows write at their own slots

    return {'block': layers(cfg, cfg.block_depth, -(-max_len // cfg.block_len)),
            'token': layers(tcfg, tcfg.num_layers, cfg.local_len),
            'tokens': jnp.zeros((batch, cfg.block_len), jnp.int32),
            'context': jnp.zeros((batch, cfg.embed_dim), cfg.compute_dtype)}

  def target_mask(self, positions):
    """Which targets the trainer scores (``predicted_targets``)."""
    return predicted_targets(self.cfg, positions)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, train=False,
               targets=None, loss_mask=None, step=None):
    del train, targets, loss_mask, step  # No dropout, target- or step-dependent behaviour.
    if cache is None:
      return self._forward(tokens, positions, segment_ids)
    if tokens.shape[1] == 1 and segment_ids is None:
      if positions is None:
        raise ValueError('A cached decode step needs each row\'s position (positions [B, 1]).')
      logits, cache = self._decode_step(tokens, positions[:, 0], cache)
    else:
      logits, cache = self._prefill(tokens, segment_ids, cache)
    return logits[:, None], {'losses': {}, 'cache': cache}

  # Parts shared by the forward pass and cached generation. Each creates its own named
  # submodules, so the same parameters serve every path.

  def _embed_blocks(self, tokens, mask=None):
    """Block embeddings [B, n, E] of tokens [B, n·L_B] (§2.1); masked tokens add zeros."""
    cfg = self.cfg
    table = nn.Embed(cfg.vocab_size, cfg.embed_dim // cfg.block_len, dtype=cfg.compute_dtype,
                     embedding_init=_init(cfg, ('vocab', 'embed')), name='block_embed')
    emb = table(tokens)
    if mask is not None:
      emb = emb * mask[..., None].astype(emb.dtype)
    b, t = tokens.shape
    return nn.with_logical_constraint(emb.reshape(b, t // cfg.block_len, cfg.embed_dim),
                                      ('batch', 'length', 'embed'))

  def _block_decoder(self, x, ctx, caches=None):
    """Block decoder (§2.2) and its norm -> (outputs [B, n, E], new layer caches)."""
    cfg = self.cfg
    x, caches = run_layers(cfg, x, ctx, caches, cfg.block_depth, name='block_layers')
    return make_norm(cfg, 'block_norm')(x), caches

  def _start(self, batch):
    """Context [batch, E] of a document's first block: learned, or zeros (the reference)."""
    cfg = self.cfg
    if cfg.predict_first_block:
      start = self.param('start_context', _init(cfg, ('embed',)), (cfg.embed_dim,), jnp.float32)
    else:
      start = jnp.zeros((cfg.embed_dim,), jnp.float32)
    return jnp.broadcast_to(start.astype(cfg.compute_dtype), (batch, cfg.embed_dim))

  def _token_inputs(self, embedder, context, tokens, head=True):
    """Token-decoder inputs (§2.3) for contexts [..., E] and local tokens [..., k]: the head
    slots (when ``head``) and the token embeddings -> [..., head_slots + k, W]."""
    cfg = self.cfg
    y, w = embedder.encode(tokens), cfg.token_width
    if cfg.token_decoder == 'prefix':
      if not head:
        return y
      prefix = Linear((cfg.expansion_ratio, w), ('embed', 'prefix', 'token_embed'), cfg,
                      bias=cfg.biases, name='prefix_proj')(context)
      return jnp.concatenate([prefix.astype(y.dtype), y], axis=-2)
    if head:
      start = self.param('start_token', _init(cfg, ('embed',)), (w,), jnp.float32)
      start = jnp.broadcast_to(start.astype(y.dtype), y.shape[:-2] + (1, w))
      y = jnp.concatenate([start, y], axis=-2)
    if cfg.token_decoder == 'cross_attention':
      return y
    if w != cfg.embed_dim:
      context = Linear((w,), ('embed', 'token_embed'), cfg, name='context_proj')(context)
    return y + context[..., None, :].astype(y.dtype)

  def _token_decoder(self, y, ctx, context, caches=None):
    """Token decoder layers on inputs [B', S, W] with block contexts [B', E] -> (hidden
    states, new layer caches). ``cross_attention``: every layer also attends to the context
    expanded to ``expansion_ratio`` memory vectors."""
    cfg, tcfg = self.cfg, self.cfg.token_config
    if cfg.token_decoder != 'cross_attention':
      return run_layers(tcfg, y, ctx, caches, tcfg.num_layers, name='token_layers')
    memory = Linear((cfg.expansion_ratio, tcfg.embed_dim), ('embed', 'prefix', 'token_embed'),
                    cfg, name='memory_proj')(context)
    return run_layers(tcfg, y, ctx + (memory,), caches, tcfg.num_layers, name='token_layers',
                      block=CrossAttentionBlock)

  def _logits(self, embedder, y):
    cfg = self.cfg
    return embedder.decode(make_norm(cfg, 'final_norm')(y))

  def _embedder(self):
    return Embedder(self.cfg.token_config, name='embedder')

  # The three paths.

  def _forward(self, tokens, positions, segment_ids):
    """Teacher-forced logits [B, T, V] (alignment: module docstring)."""
    cfg = self.cfg
    lb, head, w, (b, t) = cfg.block_len, cfg.head_slots, cfg.token_width, tokens.shape
    if t % lb:
      raise ValueError(f'Sequence length {t} is not a multiple of model.block_len={lb}.')
    n, s = t // lb, cfg.local_len
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    x = self._embed_blocks(tokens, None if segment_ids is None else segment_ids > 0)
    block_pos = positions[:, ::lb] // lb
    block_seg = None if segment_ids is None else segment_ids[:, ::lb]
    x, _ = self._block_decoder(x, (block_pos, block_seg, None))
    # Context of token-decoder blocks 0..N: the output of the previous block, or the start
    # context for a document's first block (block N continues block N - 1's document).
    start = self._start(b)[:, None]
    first = jnp.concatenate([block_pos == 0, jnp.zeros((b, 1), bool)], axis=1)
    ctx = jnp.where(first[..., None], start, jnp.concatenate([start, x], axis=1))
    # Token decoder on each block: local inputs t_0 .. t_{L_B-2} (block N: padding).
    embedder = self._embedder()
    local = jnp.pad(tokens, ((0, 0), (0, lb))).reshape(b, n + 1, lb)[:, :, :-1]
    y = self._token_inputs(embedder, ctx, local)  # [B, N+1, S, W]
    local_pos = jnp.broadcast_to(jnp.arange(s), (b * (n + 1), s))
    local_seg = None
    if segment_ids is not None:
      # Head slots take the segment of the block's first token (block N: of the last token).
      seg_tokens = jnp.pad(segment_ids, ((0, 0), (0, lb))).reshape(b, n + 1, lb)[:, :, :-1]
      seg_head = jnp.concatenate([segment_ids[:, ::lb], segment_ids[:, -1:]], axis=1)
      local_seg = jnp.concatenate(
          [jnp.repeat(seg_head[:, :, None], head, axis=2), seg_tokens], axis=2).reshape(-1, s)
    y, _ = self._token_decoder(y.reshape(b * (n + 1), s, w), (local_pos, local_seg, None),
                               ctx.reshape(b * (n + 1), cfg.embed_dim))
    # Outputs from slot head - 1 on predict x[iL_B .. iL_B + L_B - 1]; keep x[1 .. T].
    y = y.reshape(b, n + 1, s, w)[:, :, head - 1:].reshape(b, (n + 1) * lb, w)[:, 1:t + 1]
    return self._logits(embedder, y), {'losses': {}, 'predicted': predicted_targets(cfg, positions)}

  def _prefill(self, tokens, segment_ids, cache):
    """Fills an empty cache with each row's real tokens -> (next-token logits [B, V], cache)."""
    cfg = self.cfg
    lb, head, (b, t) = cfg.block_len, cfg.head_slots, tokens.shape
    nb, slots = -(-t // lb), cache['block']['pos'].shape[1]
    if nb > slots:
      raise ValueError(f'A prompt of {t} tokens needs {nb} block slots; the cache has {slots} '
                       f'(max_len <= {slots * lb}).')
    count = (jnp.full((b,), t) if segment_ids is None else
             jnp.sum(segment_ids > 0, axis=1)).astype(jnp.int32)
    done, offset = count // lb, count % lb  # finished blocks; tokens of the unfinished one
    tokens = jnp.pad(tokens, ((0, 0), (0, (nb + 1) * lb - t)))
    # Block decoder over the finished blocks; unfinished ones are written as empty slots.
    index = jnp.broadcast_to(jnp.arange(nb), (b, nb))
    block = cache['block']
    pos = write_slots(block['pos'], jnp.where(index < done[:, None], index, -1), 0)
    x, (k, v) = self._block_decoder(self._embed_blocks(tokens[:, :nb * lb]),
                                    (index, None, KVContext(pos, jnp.zeros((), jnp.int32))),
                                    (block['k'], block['v']))
    last = jnp.take_along_axis(x, jnp.maximum(done - 1, 0)[:, None, None], axis=1)[:, 0]
    context = jnp.where((done > 0)[:, None], last, self._start(b))
    # Token decoder over the head slots and the unfinished block's tokens.
    current = jnp.take_along_axis(tokens, done[:, None] * lb + jnp.arange(lb), axis=1)
    real = jnp.arange(lb) < offset[:, None]
    embedder = self._embedder()
    y = self._token_inputs(embedder, context, current[:, :-1])
    local = jnp.broadcast_to(jnp.arange(cfg.local_len), (b, cfg.local_len))
    local_pos = jnp.where(jnp.concatenate([jnp.ones((b, head), bool), real[:, :-1]], 1), local, -1)
    token = cache['token']
    first_slot = jnp.zeros((), jnp.int32)
    y, (tk, tv) = self._token_decoder(y, (local, None, KVContext(local_pos, first_slot)),
                                      context, (token['k'], token['v']))
    y = jnp.take_along_axis(y, (head - 1 + offset)[:, None, None], axis=1)
    cache = {'block': {'k': k, 'v': v, 'pos': pos}, 'token': {'k': tk, 'v': tv, 'pos': local_pos},
             'tokens': jnp.where(real, current, 0), 'context': context}
    return self._logits(embedder, y)[:, 0], cache

  def _decode_step(self, tokens, positions, cache):
    """One token per row at ``positions`` [B] -> (next-token logits [B, V], cache)."""
    cfg = self.cfg
    lb, head, b = cfg.block_len, cfg.head_slots, tokens.shape[0]
    index, offset = positions // lb, positions % lb
    ends = offset == lb - 1  # this token finishes its block
    current = jnp.where(jnp.arange(lb) == offset[:, None], tokens, cache['tokens'])
    no_logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)

    def new_block(mdl, cache):
      # Block decoder on the finished block (rows that did not finish one write an empty
      # slot at their unfinished block's index), then the next block's head slots.
      block = cache['block']
      pos = write_slots(block['pos'], jnp.where(ends, index, -1)[:, None], index)
      x, (k, v) = mdl._block_decoder(mdl._embed_blocks(current), (index[:, None], None,
                                                                  KVContext(pos, index)),
                                     (block['k'], block['v']))
      embedder = mdl._embedder()
      y = mdl._token_inputs(embedder, x[:, 0], jnp.zeros((b, 0), jnp.int32))
      local = jnp.broadcast_to(jnp.arange(cfg.local_len), (b, cfg.local_len))
      local_pos = jnp.where(local < head, local, -1)
      token = cache['token']
      y, (tk, tv) = mdl._token_decoder(y, (local[:, :head], None,
                                           KVContext(local_pos, jnp.zeros((), jnp.int32))),
                                       x[:, 0], (token['k'], token['v']))
      return (mdl._logits(embedder, y[:, head - 1]), {'k': k, 'v': v, 'pos': pos},
              {'k': tk, 'v': tv, 'pos': local_pos}, x[:, 0])

    def token_step(mdl, cache):
      # One token-decoder step at local slot head + offset (finishing rows: a dummy slot 0,
      # their result is discarded).
      slot = jnp.where(ends, 0, head + offset)
      token = cache['token']
      pos = write_slots(token['pos'], slot[:, None], slot)
      embedder = mdl._embedder()
      y = mdl._token_inputs(embedder, cache['context'], tokens, head=False)
      y, (tk, tv) = mdl._token_decoder(y, (slot[:, None], None, KVContext(pos, slot)),
                                       cache['context'], (token['k'], token['v']))
      return mdl._logits(embedder, y[:, 0]), {'k': tk, 'v': tv, 'pos': pos}

    logits_new, block, token_new, context = nn.cond(
        jnp.any(ends), new_block,
        lambda mdl, c: (no_logits, c['block'], c['token'], c['context']), self, cache)
    logits_step, token_step_cache = nn.cond(
        jnp.any(~ends), token_step, lambda mdl, c: (no_logits, c['token']), self, cache)
    pick = lambda new, old: jnp.where(ends.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    cache = {'block': block, 'token': jax.tree.map(pick, token_new, token_step_cache),
             'tokens': current, 'context': pick(context, cache['context'])}
    return pick(logits_new, logits_step), cache
