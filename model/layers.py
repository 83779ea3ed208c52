"""Decoder building blocks in two layer styles (``ModelConfig.layer_style``).

``'llama'``: RMSNorm, rotary embeddings, bias-free GQA attention, SwiGLU MLP, sequential
pre-norm block (``DecoderBlock``). ``'gpt_neox'`` (GPT-NeoX / Pythia, Black et al. 2022, the
layers of the Block Transformer paper, arXiv:2406.02657 §3.1): LayerNorm with bias, attention
and MLP projections with biases, rotary embeddings on the first ``rotary_pct`` of each head's
dims, exact-GELU MLP, parallel residual ``x + Attn(LN1 x) + MLP(LN2 x)``. One
``DecoderBlock``, ``Attention``, ``MLP`` and ``Linear`` serve both.

Every parameter carries logical axis names (``nn.with_logical_partitioning``); the mesh
mapping lives in the config's rules, never here. Parameters are float32; compute runs in
``cfg.dtype``; norms, softmax and RoPE run in float32.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import attention as attention_lib
from model import config_errors

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
LAYER_STYLES = ('llama', 'gpt_neox')


# Rematerialisation policies (``model.remat_policy``, with ``model.remat=True``): what each
# layer application keeps for the backward pass; everything else is recomputed.
#   full           nothing inside the layer: only its input, the residual stream, is kept
#   dots           every matmul output (attention scores included)
#   dots_no_batch  the weight matmuls' outputs; attention scores and softmax are recomputed
REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn_or_module, cfg):
  """``fn_or_module`` rematerialised by ``cfg.remat_policy`` when ``cfg.remat`` (a Linen module
  class through ``nn.remat``, a function through ``jax.checkpoint``), else as it is."""
  if not cfg.remat:
    return fn_or_module
  policy = REMAT_POLICIES[cfg.remat_policy]
  if isinstance(fn_or_module, type) and issubclass(fn_or_module, nn.Module):
    return nn.remat(fn_or_module, policy=policy)
  return jax.checkpoint(fn_or_module, policy=policy)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of the decoder (built from ``config.model``).

  ``layer_style`` picks the layers (module docstring); ``rotary_pct`` is the fraction of each
  head's dims that get rotary embeddings (``rotary_dims``; the rest pass through).
  """
  name: str = 'llama'
  vocab_size: int = 259
  embed_dim: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: embed_dim // num_heads
  mlp_dim: int = 768
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  scan_layers: bool = False
  remat: bool = False
  remat_policy: str = 'full'  # with remat: what a layer keeps for the backward (REMAT_POLICIES)
  dtype: str = 'float32'
  attention_impl: str = 'xla'
  init_std: float = 0.02
  layer_style: str = 'llama'
  rotary_pct: float = 1.0

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'model.remat_policy={self.remat_policy!r}; expected one of '
                       f'{sorted(REMAT_POLICIES)}.')
    if self.attention_impl not in attention_lib.IMPLS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}; expected one of '
                       f'{attention_lib.IMPLS}.')
    if self.dtype not in _DTYPES:
      raise ValueError(f'model.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}.')
    if self.layer_style not in LAYER_STYLES:
      raise ValueError(f'model.layer_style={self.layer_style!r}; expected one of {LAYER_STYLES}.')
    if not 0 < self.rotary_pct <= 1:
      raise ValueError(f'model.rotary_pct={self.rotary_pct} must be in (0, 1].')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.num_kv_heads}.')
    if not self.head_dim and self.embed_dim % self.num_heads:
      raise ValueError(f'model.embed_dim={self.embed_dim} is not divisible by '
                       f'model.num_heads={self.num_heads}; set model.head_dim.')
    if self.rotary_pct < 1 and (not self.rotary_dims or self.rotary_dims % 2):
      raise ValueError(f'model.rotary_pct={self.rotary_pct} of head_dim {self.dims_per_head} gives '
                       f'{self.rotary_dims} rotary dims; they must be even and > 0.')

  @classmethod
  def from_config(cls, config, **overrides):
    """Builds from a ConfigDict/dict; unknown fields raise, naming the field."""
    values = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
      raise config_errors.unknown_fields('config.model', unknown, names)
    return cls(**values)

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def rotary_dims(self) -> int:
    """Leading dims of each head that get rotary embeddings (as GPT-NeoX: int(D * pct))."""
    return int(self.dims_per_head * self.rotary_pct)

  @property
  def biases(self) -> bool:
    """Whether attention and MLP projections have biases (gpt_neox)."""
    return self.layer_style == 'gpt_neox'

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]


def require_llama_layers(cfg: ModelConfig, family: str) -> None:
  """Raises unless ``cfg.layer_style == 'llama'`` (families with their own layer code)."""
  if cfg.layer_style != 'llama':
    raise ValueError(f'model.layer_style={cfg.layer_style!r} is not supported by the {family} '
                     "family; only 'llama'.")


def decoder_block_params(cfg: ModelConfig) -> int:
  """Parameters of one block: q, k, v, o, the MLP and two norms (llama: SwiGLU, RMSNorm;
  gpt_neox: two-matrix MLP, LayerNorm, and every bias)."""
  e, d, f = cfg.embed_dim, cfg.dims_per_head, cfg.mlp_dim
  attn = 2 * e * d * (cfg.num_heads + cfg.num_kv_heads)
  if cfg.layer_style == 'gpt_neox':
    return attn + d * (cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * e * f + f + 6 * e
  return attn + 3 * e * f + 2 * e


def training_flops_per_token(cfg: ModelConfig, seq_len: int, layers: float,
                             attention_layers: float, heads: int = 1,
                             extra_params: float = 0) -> float:
  """Training FLOPs per token (PaLM, App. B) for families that apply layers a variable number
  of times: 6 x the weights a token passes through (``layers`` DecoderBlock applications,
  ``heads`` final norm + LM head applications, ``extra_params``) + 12·H·D·T per attention
  layer (``attention_layers``: full-sequence equivalents). For a Llama of L layers
  (``layers = attention_layers = L``) this is ``budget.analytic_flops_per_token``."""
  weights = (layers * decoder_block_params(cfg) +
             heads * (cfg.vocab_size + 1) * cfg.embed_dim + extra_params)
  return 6 * weights + attention_layers * 12 * cfg.num_heads * cfg.dims_per_head * seq_len


def _init(cfg, names):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


class Linear(nn.Module):
  """Projection whose kernel has the full logical shape ``in_dims + features``.

  Contracts the trailing ``len(in_dims)`` axes of ``x`` (``axis``) with the kernel's leading
  axes. Unlike ``nn.DenseGeneral`` the kernel is created in its final shape, so its logical
  sharding annotation applies at creation. ``bias``: adds a bias of shape ``features``
  (logical names: the kernel's last ``len(features)``; initialised to zeros).
  """
  features: tuple[int, ...]
  names: tuple[str, ...]
  cfg: 'ModelConfig'
  axis: tuple[int, ...] = (-1,)
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    in_dims = tuple(x.shape[a] for a in axis)
    kernel = self.param('kernel', _init(self.cfg, self.names), in_dims + tuple(self.features),
                        jnp.float32)
    dtype = self.cfg.compute_dtype
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.bias:
      names = self.names[len(self.names) - len(self.features):]
      b = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, names),
                     tuple(self.features), jnp.float32)
      y = y + b.astype(dtype)
    return y


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Llama)."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias, computed in float32 (GPT-NeoX)."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       shape, jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      shape, jnp.float32)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (y * scale + bias).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """The layer style's norm (llama: RMSNorm; gpt_neox: LayerNorm with bias), eps
  ``cfg.norm_eps``, output in the compute dtype."""
  norm = LayerNorm if cfg.layer_style == 'gpt_neox' else RMSNorm
  return norm(cfg.norm_eps, cfg.compute_dtype, name=name)


def apply_rope(x, positions, theta, rotary_dims=None):
  """Rotary embedding, rotate-half convention (as Hugging Face Llama and GPT-NeoX), on the
  first ``rotary_dims`` (default: all) dims of each head; the others pass through unchanged.
  x: [B, T, H, D]."""
  d = x.shape[-1] if rotary_dims is None else rotary_dims
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x[..., :d].astype(jnp.float32)
  x1, x2 = x32[..., :d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return out if d == x.shape[-1] else jnp.concatenate([out, x[..., d:]], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVContext:
  """Where a layer's attention reads (and writes) keys and values: the K/V policy.

  ``kv_pos`` [B, S] are the positions of the keys attended, after this call's write (-1: a
  hidden key: an empty cache slot, padding, a token that did not reach this recursion).
  ``write_idx`` is the slot where this call's first token goes: a scalar (every row writes
  at the same slot, as ``model.kv_cache`` does) or per row [B]; None: the given keys are
  only read (keys shared from an earlier recursion). ``kv_segment_ids`` [B, S] (optional)
  masks keys of other documents. See ``Attention`` for the policies.
  """
  kv_pos: jax.Array
  write_idx: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None


def write_slots(buffer, update, start, axis=1):
  """Writes ``update`` into ``buffer`` (both batch-major) along the slot ``axis`` from ``start``.

  A scalar ``start`` writes every row at the same slot with one dynamic-update-slice (in
  place when XLA may reuse ``buffer``, e.g. a donated cache); a per-row ``start`` [B] is a
  scatter, which copies the buffer unless XLA can update it in place.
  """
  update = update.astype(buffer.dtype)
  if jnp.ndim(start) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buffer, update, start, axis)
  one = lambda buf, upd, s: jax.lax.dynamic_update_slice_in_dim(buf, upd, s, axis - 1)
  return jax.vmap(one)(buffer, update, start)


def write_kv(buffer, update, start):
  """Writes keys or values ``update`` [B, T, Hkv, D] into one layer's head-major cache buffer
  [B, Hkv, S, D] at slot ``start`` (see ``write_slots``); returns the written buffer.

  Head-major is the layout XLA's batched matmuls read in place: a [B, S, Hkv, D] buffer is
  transposed (copied) before every attention read.
  """
  return write_slots(buffer, jnp.swapaxes(update, 1, 2), start, axis=2)


def kv_view(buffer):
  """A head-major cache buffer [B, Hkv, S, D] as attention's keys/values [B, S, Hkv, D] (XLA
  folds the transpose into the attention matmul)."""
  return jnp.swapaxes(buffer, 1, 2)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE at the tokens' positions (on ``cfg.rotary_dims``
  of each head); q, k, v, o have biases when ``cfg.biases`` (gpt_neox). The one attention
  module of every family and engine; ``cfg.attention_impl`` picks the kernel.

  K/V policy, from ``layer_kv`` (head-major buffers (k, v) [B, Hkv, S, D]) and ``kv_ctx``:

  * fresh (both None): attend among ``x``'s own tokens (visibility from positions and
    segment ids); returns None;
  * fresh with explicit visibility (``kv_ctx`` only: its ``kv_pos``/``kv_segment_ids`` for
    ``x``'s tokens, e.g. MoR's inactive tokens hidden): returns ``x``'s head-major (k, v) for
    later recursions to share;
  * cached (``kv_ctx.write_idx`` set): write ``x``'s keys/values into the buffers, attend over
    them, return the written buffers;
  * shared (``kv_ctx.write_idx`` None): attend over the given buffers, return None;
  * memory (``memory`` [B, M, E]): cross-attention to keys/values projected from ``memory``,
    all visible, no rotary embedding (the Block Transformer's ``cross_attention`` decoder);
  * projection only: ``kv(x, positions)`` (an exited token's keys/values for deeper loops).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    h, hkv, d, bias = cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head, cfg.biases
    self.q = Linear((h, d), ('embed', 'heads', 'head_dim'), cfg, bias=bias)
    self.k = Linear((hkv, d), ('embed', 'kv_heads', 'head_dim'), cfg, bias=bias)
    self.v = Linear((hkv, d), ('embed', 'kv_heads', 'head_dim'), cfg, bias=bias)
    self.o = Linear((cfg.embed_dim,), ('heads', 'head_dim', 'embed'), cfg, axis=(-2, -1),
                    bias=bias)

  def kv(self, x, positions):
    """Keys (with RoPE) and values [B, T, Hkv, D] of ``x`` at ``positions``."""
    return apply_rope(self.k(x), positions, self.cfg.rope_theta, self.cfg.rotary_dims), self.v(x)

  def __call__(self, x, positions, segment_ids, layer_kv=None, kv_ctx: Optional[KVContext] = None,
               memory=None):
    cfg = self.cfg
    if memory is not None:  # memory
      zeros = lambda a: jnp.zeros(a.shape[:2], jnp.int32)
      out = attention_lib.attention(self.q(x), self.k(memory), self.v(memory), q_pos=zeros(x),
                                    kv_pos=zeros(memory), causal=False, impl=cfg.attention_impl)
      return self.o(out), None
    q = apply_rope(self.q(x), positions, cfg.rope_theta, cfg.rotary_dims)
    if kv_ctx is None:  # fresh
      k, v = self.kv(x, positions)
      kv_pos = positions if segment_ids is None else jnp.where(segment_ids > 0, positions, -1)
      out = attention_lib.attention(q, k, v, q_pos=positions, kv_pos=kv_pos,
                                    q_segment_ids=segment_ids, impl=cfg.attention_impl)
      return self.o(out), None
    # Segment ids matter only where the keys carry them; caches mark padding by position.
    q_seg = segment_ids if kv_ctx.kv_segment_ids is not None else None
    if layer_kv is None:  # fresh, explicit visibility
      layer_kv = tuple(jnp.swapaxes(t, 1, 2) for t in self.kv(x, positions))
      new_kv = layer_kv
    elif kv_ctx.write_idx is not None:  # cached
      layer_kv = tuple(write_kv(buf, new, kv_ctx.write_idx)
                       for buf, new in zip(layer_kv, self.kv(x, positions)))
      new_kv = layer_kv
    else:  # shared
      new_kv = None
    out = attention_lib.cached_attention(q, *layer_kv, q_pos=positions, kv_pos=kv_ctx.kv_pos,
                                         q_segment_ids=q_seg,
                                         kv_segment_ids=kv_ctx.kv_segment_ids,
                                         impl=cfg.attention_impl)
    return self.o(out), new_kv


def project_kv(cfg: ModelConfig, layer, h, positions):
  """K/V [B, T, Hkv, D] of hidden states ``h`` through one block's ``attn_norm`` and k/v
  projections (``layer``: the block's parameters), as if the block ran on them."""
  xn = make_norm(cfg, 'attn_norm').apply({'params': layer['attn_norm']}, h)
  return Attention(cfg).apply({'params': layer['attn']}, xn, positions, method=Attention.kv)


class MLP(nn.Module):
  """llama: SwiGLU, down(silu(gate(x)) * up(x)); gpt_neox: down(gelu(up(x))) with exact (erf)
  GELU and biases."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    up = lambda name: Linear((cfg.mlp_dim,), ('embed', 'mlp'), cfg, bias=cfg.biases, name=name)(x)
    if cfg.layer_style == 'gpt_neox':
      hidden = nn.gelu(up('up'), approximate=False)
    else:
      hidden = nn.silu(up('gate')) * up('up')
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return Linear((cfg.embed_dim,), ('mlp', 'embed'), cfg, bias=cfg.biases, name='down')(hidden)


class DecoderBlock(nn.Module):
  """One decoder layer of ``cfg.layer_style``: llama, pre-norm x + Attn(norm x), then
  x + MLP(norm x); gpt_neox, the parallel residual x + Attn(LN1 x) + MLP(LN2 x). Parameters
  ``attn_norm``, ``attn``, ``mlp_norm``, ``mlp`` in both (``make_norm``, ``MLP``).

  Called as ``block(x, layer_kv, (positions, segment_ids, kv_ctx))`` so that ``nn.scan``
  can scan over layers with the per-layer cache as the scanned input; returns
  ``(x, new_layer_kv)``.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer_kv, ctx):
    positions, segment_ids, kv_ctx = ctx
    cfg = self.cfg
    attn_out, new_kv = Attention(cfg, name='attn')(
        make_norm(cfg, 'attn_norm')(x), positions, segment_ids, layer_kv, kv_ctx)
    mlp = lambda h: MLP(cfg, name='mlp')(make_norm(cfg, 'mlp_norm')(h))
    if cfg.layer_style == 'gpt_neox':
      x = x + attn_out + mlp(x)
    else:
      x = x + attn_out
      x = x + mlp(x)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


