"""Block Transformer (Ho et al. 2024, arXiv:2406.02657): global-to-local language modelling.

Three parts (§2):

* Embedder (§2.1, ``lookup``): a token table of width ``embed_dim // block_len``; the
  ``L_B = block_len`` embeddings of a block are concatenated into one block embedding of
  width ``embed_dim`` (padding tokens, segment 0, contribute zeros).
* Block decoder (§2.2): Llama DecoderBlocks with causal self-attention over the blocks
  (RoPE position = block index in its document, ``positions[first token] // L_B``; masked by
  the segment id of the block's first token), then an RMSNorm. Its output for block i is the
  context of block i + 1. The context of a document's first block is a learned start vector
  (``predict_first_block=True``) or zeros (``False``, the reference behaviour: that block's
  tokens get no real prediction; ``aux['predicted']`` / ``predicted_targets`` mark them).
* Token decoder (§2.3): its own DecoderBlocks of width ``token_embed_dim``, its own token
  embedding and LM head (tied when ``tie_embeddings``), run on every block independently
  (reshaped to [B * blocks, length, width]; local positions 0, 1, ... restart per block).
  ``'prefix'``: the context is projected to ``expansion_ratio`` (r) prefix vectors; the input
  is ``[prefix_0 .. prefix_{r-1}, emb(t_0) .. emb(t_{L_B-2})]`` and the outputs from position
  r - 1 on predict ``t_0 .. t_{L_B-1}``. ``'summation'`` (MEGABYTE-style): the context
  (projected when the widths differ) is added to every input of
  ``[learned start token, emb(t_0) .. emb(t_{L_B-2})]``, whose outputs predict
  ``t_0 .. t_{L_B-1}``. (``'cross_attention'`` is not built.)

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

Scope: teacher-forced forward pass and training; cached generation is not built.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from model.layers import Linear, ModelConfig, _init, make_norm
from model.llama import Embedder, run_layers

_TOKEN_DECODERS = ('prefix', 'summation')
_NOT_BUILT = ('cross_attention',)
_NO_CACHE = 'cached generation for the block family is not built yet'


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
    if self.token_decoder in _NOT_BUILT:
      raise ValueError(f'model.token_decoder={self.token_decoder!r} is not built; '
                       f'choose one of {_TOKEN_DECODERS}.')
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


class BlockTransformer(nn.Module):
  """``apply(params, tokens, positions, segment_ids, cache, train) -> (logits, aux)``.

  ``logits[:, t]`` predicts ``tokens[:, t+1]`` (module docstring); ``aux`` holds ``losses``
  (none) and ``predicted`` (``predicted_targets``). ``targets``, ``loss_mask`` and ``step``
  are accepted for the trainer's interface and ignored.
  """
  cfg: BlockConfig

  def init_cache(self, batch, max_len):
    raise NotImplementedError(_NO_CACHE)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, train=False,
               targets=None, loss_mask=None, step=None):
    del train, targets, loss_mask, step  # No dropout, target- or step-dependent behaviour.
    if cache is not None:
      raise NotImplementedError(_NO_CACHE)
    cfg, tcfg = self.cfg, self.cfg.token_config
    lb, (b, t) = cfg.block_len, tokens.shape
    if t % lb:
      raise ValueError(f'Sequence length {t} is not a multiple of model.block_len={lb}.')
    n = t // lb
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)

    # Embedder (§2.1): concatenated token embeddings; padding contributes zeros.
    table = nn.Embed(cfg.vocab_size, cfg.embed_dim // lb, dtype=cfg.compute_dtype,
                     embedding_init=_init(cfg, ('vocab', 'embed')), name='block_embed')
    emb = table(tokens)
    if segment_ids is not None:
      emb = emb * (segment_ids > 0)[..., None].astype(emb.dtype)
    x = nn.with_logical_constraint(emb.reshape(b, n, cfg.embed_dim), ('batch', 'length', 'embed'))

    # Block decoder (§2.2) over blocks at their in-document block index.
    block_pos = positions[:, ::lb] // lb
    block_seg = None if segment_ids is None else segment_ids[:, ::lb]
    x, _ = run_layers(cfg, x, (block_pos, block_seg, None), None, cfg.block_depth,
                      name='block_layers')
    x = make_norm(cfg, 'block_norm')(x)
    if cfg.predict_first_block:
      start = self.param('start_context', _init(cfg, ('embed',)), (cfg.embed_dim,), jnp.float32)
    else:
      start = jnp.zeros((cfg.embed_dim,), jnp.float32)
    start = jnp.broadcast_to(start.astype(x.dtype), (b, 1, cfg.embed_dim))
    # Context of token-decoder blocks 0..N: the output of the previous block, or the start
    # context for a document's first block (block N continues block N - 1's document).
    first = jnp.concatenate([block_pos == 0, jnp.zeros((b, 1), bool)], axis=1)
    ctx = jnp.where(first[..., None], start, jnp.concatenate([start, x], axis=1))

    # Token decoder (§2.3) on each block: local inputs t_0 .. t_{L_B-2} (block N: padding).
    embedder = Embedder(tcfg, name='embedder')
    local = jnp.pad(tokens, ((0, 0), (0, lb))).reshape(b, n + 1, lb)[:, :, :-1]
    y = embedder.encode(local)  # [B, N+1, L_B-1, W]
    w = tcfg.embed_dim
    if cfg.token_decoder == 'prefix':
      prefix = Linear((cfg.expansion_ratio, w), ('embed', 'prefix', 'token_embed'), cfg,
                      name='prefix_proj')(ctx)
      y = jnp.concatenate([prefix.astype(y.dtype), y], axis=2)
      head = cfg.expansion_ratio  # slots before the token inputs
    else:
      if w != cfg.embed_dim:
        ctx = Linear((w,), ('embed', 'token_embed'), cfg, name='context_proj')(ctx)
      start_tok = self.param('start_token', _init(cfg, ('embed',)), (w,), jnp.float32)
      y = jnp.concatenate([jnp.broadcast_to(start_tok.astype(y.dtype), (b, n + 1, 1, w)), y],
                          axis=2) + ctx[:, :, None].astype(y.dtype)
      head = 1
    s = y.shape[2]
    local_pos = jnp.broadcast_to(jnp.arange(s), (b * (n + 1), s))
    local_seg = None
    if segment_ids is not None:
      # Head slots take the segment of the block's first token (block N: of the last token).
      seg_tokens = jnp.pad(segment_ids, ((0, 0), (0, lb))).reshape(b, n + 1, lb)[:, :, :-1]
      seg_head = jnp.concatenate([segment_ids[:, ::lb], segment_ids[:, -1:]], axis=1)
      local_seg = jnp.concatenate(
          [jnp.repeat(seg_head[:, :, None], head, axis=2), seg_tokens], axis=2).reshape(-1, s)
    y, _ = run_layers(tcfg, y.reshape(b * (n + 1), s, w), (local_pos, local_seg, None), None,
                      tcfg.num_layers, name='token_layers')
    # Outputs from slot head - 1 on predict x[iL_B .. iL_B + L_B - 1]; keep x[1 .. T].
    y = y.reshape(b, n + 1, s, w)[:, :, head - 1:].reshape(b, (n + 1) * lb, w)[:, 1:t + 1]
    y = make_norm(cfg, 'final_norm')(y)
    return embedder.decode(y), {'losses': {}, 'predicted': predicted_targets(cfg, positions)}
