"""Recursive and Relaxed Recursive Transformers (Bae et al., arXiv:2410.20672).

One block of shared layers applied in ``num_loops`` loops (PAPERS.md §1). ``num_layers``
is the depth L of the *unrolled* model; the unique layers are

  ``cycle``            L/B layers, unrolled layer l uses ``l mod (L/B)`` (loop ``l // (L/B)``);
  ``sequence``         L/B layers, l uses ``l // B`` (loop ``l mod B``);
  ``middle_cycle``     first and last layers unique, the middle L-2 shared as ``cycle``;
  ``middle_sequence``  the same with the middle shared as ``sequence``.

Parameter tree: ``embedder``, ``final_norm`` as in ``model.llama``; ``layers_{j}`` for the
unique layers j (a ``DecoderBlock``'s tree; without its norms when ``ln_share=False``); per
unrolled layer l of a shared layer, ``norms_{l}`` (``ln_share=False``: per-loop norms) and
``lora_{l}/{q,k,v,o,gate,up,down}/{a,b}`` (relaxation, §3.2: ``h = W'x + B_l A_l x``).
There is no LoRA scaling factor: the authors' code scales ``B A x`` by 2 while its SVD
initialisation ignores that factor (its full-rank relaxed kernel is ``2W - W'``, PAPERS.md
§1); without it, ``model.conversion``'s full-rank SVD init gives back each unrolled layer's
source kernel ``W`` (the kept original layer; layers are dropped when the original depth is
not divisible by the loops). Shared weights are single parameters applied several times, so
parameter counts, checkpoints and optimizer states hold unique parameters only.

Early exit (§3.4): the shared final norm and LM head read the hidden state after every
loop (after unrolled layer ``exit_layers(cfg)[i]``). Training losses with the last loop's
weight 1 (its CE is the trainer's LM loss) and intermediate weights ``exit_weights(cfg)``:
``weighted`` (i+1)/B, ``aggressive`` 0.1; optional self-distillation of each intermediate
exit from the detached final exit, ``exit_distill * w_i * KL(p_final || p_i)``.

The KV cache has ``num_layers`` layers: every unrolled layer application has its own slot,
so ``model.decode.generate`` works unchanged.

``scan_layers``: the loops over the shared layers compile as one ``lax.scan`` per run of
shared layers (``scan_segments``), the per-loop norms and LoRA factors stacked as the scanned
input, so compile time and program size no longer grow with the number of loops; the
parameter tree is unchanged. Cached calls unroll (as ``model.llama.run_layers``).
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import kv_cache
from model.decode import token_logprobs
from model.layers import (DecoderBlock, Linear, ModelConfig, RMSNorm, remat, require_llama_layers,
                          training_flops_per_token)
from model.llama import Embedder

SHARING = ('cycle', 'sequence', 'middle_cycle', 'middle_sequence')
EARLY_EXIT = ('none', 'weighted', 'aggressive')
# Projection -> (sub-module, number of input axes of its kernel).
PROJECTIONS = {'q': ('attn', 1), 'k': ('attn', 1), 'v': ('attn', 1), 'o': ('attn', 2),
               'gate': ('mlp', 1), 'up': ('mlp', 1), 'down': ('mlp', 1)}
_NORMS = ('attn_norm', 'mlp_norm')


@dataclasses.dataclass(frozen=True)
class RecursiveConfig(ModelConfig):
  """ModelConfig plus the recursion options of PAPERS.md §1 (names as the authors' code).

  ``lora_ranks`` overrides ``lora_rank`` per projection ({'q': 8, 'down': 0, ...}); it is
  stored as a sorted tuple of pairs so the config stays hashable.
  """
  name: str = 'recursive'
  num_loops: int = 2
  sharing: str = 'cycle'
  ln_share: bool = True
  lora_rank: int = 0
  lora_ranks: tuple = ()
  early_exit: str = 'none'
  exit_distill: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    require_llama_layers(self, 'recursive')
    ranks = self.lora_ranks.items() if isinstance(self.lora_ranks, dict) else self.lora_ranks
    object.__setattr__(self, 'lora_ranks', tuple(sorted((str(k), int(v)) for k, v in ranks)))
    unknown = sorted(set(dict(self.lora_ranks)) - set(PROJECTIONS))
    if unknown:
      raise ValueError(f'model.lora_ranks has unknown projection(s) {unknown}; '
                       f'expected some of {sorted(PROJECTIONS)}.')
    if self.sharing not in SHARING:
      raise ValueError(f'model.sharing={self.sharing!r}; expected one of {SHARING}.')
    if self.early_exit not in EARLY_EXIT:
      raise ValueError(f'model.early_exit={self.early_exit!r}; expected one of {EARLY_EXIT}.')
    if self.num_loops < 1:
      raise ValueError(f'model.num_loops={self.num_loops} must be >= 1.')
    middle = self.num_layers - 2 if self.sharing.startswith('middle') else self.num_layers
    if middle < self.num_loops or middle % self.num_loops:
      raise ValueError(
          f'model.num_layers={self.num_layers} with sharing={self.sharing!r}: the '
          f'{middle} shared layers are not divisible into num_loops={self.num_loops} loops '
          '(convert non-divisible checkpoints with model.conversion, which drops layers).')

  def rank(self, projection: str) -> int:
    return dict(self.lora_ranks).get(projection, self.lora_rank)

  @property
  def block_size(self) -> int:
    """Shared layers per loop: L/B, or (L-2)/B for the middle strategies."""
    middle = self.sharing.startswith('middle')
    return (self.num_layers - 2 * middle) // self.num_loops

  @property
  def num_unique_layers(self) -> int:
    return self.block_size + 2 * self.sharing.startswith('middle')

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: every unrolled layer applied (shared ones once per loop),
    each shared layer's LoRA once per loop, the LM head once per exit."""
    shared = self.num_layers - 2 * self.sharing.startswith('middle')
    lora = sum(self.rank(p) * (math.prod(ins) + math.prod(outs))
               for p, ((ins, outs), _) in kernel_axes(self).items())
    return training_flops_per_token(
        self, seq_len, layers=self.num_layers, attention_layers=self.num_layers,
        heads=self.num_loops if self.early_exit != 'none' else 1, extra_params=shared * lora)


def layer_plan(cfg: RecursiveConfig):
  """Per unrolled layer l: (unique layer index, loop index); unique first/last layers of
  the middle strategies have loop None."""
  n, b, size = cfg.num_layers, cfg.num_loops, cfg.block_size
  offset = int(cfg.sharing.startswith('middle'))
  plan = [(0, None)] if offset else []
  for j in range(n - 2 * offset):
    if cfg.sharing.endswith('cycle'):
      plan.append((offset + j % size, j // size))
    else:
      plan.append((offset + j // b, j % b))
  if offset:
    plan.append((size + 1, None))
  return plan


def scan_segments(cfg: RecursiveConfig):
  """Runs of the shared layers that ``scan_layers`` compiles as one ``lax.scan`` over the
  loops: (unique layers of one scan step, steps, first unrolled layer). ``cycle``: one run,
  a step applies the whole block; ``sequence``: one run per shared layer, a step applies
  it once. The middle strategies' unique first and last layers stay outside."""
  offset, size, loops = int(cfg.sharing.startswith('middle')), cfg.block_size, cfg.num_loops
  if cfg.sharing.endswith('cycle'):
    return [(tuple(range(offset, offset + size)), loops, offset)]
  return [((offset + k,), loops, offset + k * loops) for k in range(size)]


def exit_layers(cfg: RecursiveConfig):
  """Unrolled layer after which each loop's exit reads the hidden state (last: L-1)."""
  offset = int(cfg.sharing.startswith('middle'))
  return [offset + (i + 1) * cfg.block_size - 1 for i in range(cfg.num_loops - 1)] + [
      cfg.num_layers - 1]


def exit_weights(cfg: RecursiveConfig):
  """Loss weight of each loop's exit; the last is 1 (§3.4: weighted ∝ i, aggressive)."""
  b = cfg.num_loops
  if cfg.early_exit == 'weighted':
    return [(i + 1) / b for i in range(b)]
  return [0.1] * (b - 1) + [1.0]


def _box(init, names):
  return nn.with_logical_partitioning(init, names)


def kernel_axes(cfg: ModelConfig):
  """Projection -> ((input dims, output dims), (input names, output names)) of its kernel,
  as ``model.layers`` creates it."""
  e, f, d = cfg.embed_dim, cfg.mlp_dim, cfg.dims_per_head
  h, hkv = cfg.num_heads, cfg.num_kv_heads
  emb, heads, kv = ('embed',), ('heads', 'head_dim'), ('kv_heads', 'head_dim')
  return {'q': (((e,), (h, d)), (emb, heads)), 'k': (((e,), (hkv, d)), (emb, kv)),
          'v': (((e,), (hkv, d)), (emb, kv)), 'o': (((h, d), (e,)), (heads, emb)),
          'gate': (((e,), (f,)), (emb, ('mlp',))), 'up': (((e,), (f,)), (emb, ('mlp',))),
          'down': (((f,), (e,)), (('mlp',), emb))}


def _block_init(cfg: ModelConfig, norms: bool):
  """Initialiser of one unique layer: a DecoderBlock's parameter tree (boxed)."""
  def init(rng):
    x = jnp.zeros((1, 1, cfg.embed_dim), cfg.compute_dtype)
    ctx = (jnp.zeros((1, 1), jnp.int32), None, None)
    params = DecoderBlock(cfg, parent=None).init(rng, x, None, ctx)['params']
    return params if norms else {k: v for k, v in params.items() if k not in _NORMS}
  return init


def _norms_init(cfg: ModelConfig):
  def init(_):
    ones = _box(nn.initializers.ones, ('norm',))
    return {n: {'scale': ones(None, (cfg.embed_dim,), jnp.float32)} for n in _NORMS}
  return init


def _lora_init(cfg: RecursiveConfig):
  """A_l ~ N(0, init_std), B_l = 0: a fresh relaxation leaves the recursive model as is."""
  def init(rng):
    out = {}
    for i, (proj, ((ins, outs), (in_names, out_names))) in enumerate(kernel_axes(cfg).items()):
      r = cfg.rank(proj)
      if r:
        a = _box(nn.initializers.normal(cfg.init_std), in_names + (None,))
        b = _box(nn.initializers.zeros, (None,) + out_names)
        out[proj] = {'a': a(jax.random.fold_in(rng, i), ins + (r,), jnp.float32),
                     'b': b(rng, (r,) + outs, jnp.float32)}
    return out
  return init


def apply_layer(cfg: ModelConfig, params, lora, x, layer_kv, ctx):
  """One DecoderBlock with explicit ``params``; ``lora`` {proj: {a, b}} adds ``(x a) b`` to
  the named projections' outputs (Flax method interception of ``Linear``)."""
  dtype = cfg.compute_dtype

  def add_lora(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, Linear) and context.method_name == '__call__' and module.name in lora:
      a, b = lora[module.name]['a'], lora[module.name]['b']
      low = jnp.tensordot(args[0].astype(dtype), a.astype(dtype), axes=a.ndim - 1)
      out = out + jnp.tensordot(low, b.astype(dtype), axes=1)
    return out

  def run(params, x, layer_kv):
    block = DecoderBlock(cfg, parent=None)
    if not lora:
      return block.apply({'params': params}, x, layer_kv, ctx)
    with nn.intercept_methods(add_lora):
      return block.apply({'params': params}, x, layer_kv, ctx)

  return remat(run, cfg)(params, x, layer_kv)


def early_exit_losses(cfg: RecursiveConfig, exit_logits, targets, loss_mask):
  """Scaled auxiliary losses of the intermediate exits (the last exit's CE, weight 1, is the
  trainer's LM loss): ``exit_ce`` = sum_i w_i CE_i and, with ``exit_distill``, ``exit_kd`` =
  exit_distill * sum_i w_i KL(p_last || p_i) with p_last detached; token means over the
  loss mask."""
  mask = loss_mask.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  weights = exit_weights(cfg)
  mean = lambda v: jnp.sum(v * mask) / count
  losses = {'exit_ce': sum(w * mean(-token_logprobs(lg, targets))
                           for w, lg in zip(weights[:-1], exit_logits[:-1]))}
  if cfg.exit_distill:
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(exit_logits[-1]).astype(jnp.float32))
    kl = lambda lg: jnp.sum(jnp.exp(teacher) * (teacher - jax.nn.log_softmax(
        lg.astype(jnp.float32))), axis=-1)
    losses['exit_kd'] = cfg.exit_distill * sum(
        w * mean(kl(lg)) for w, lg in zip(weights[:-1], exit_logits[:-1]))
  return losses


def confidence_exit(exit_logits, threshold):
  """Confidence-threshold early exit at inference (§3.4, Fig. 5).

  Args:
    exit_logits: [B_loops, ..., V] logits of every loop's exit.
    threshold: a token leaves at the first loop whose max softmax probability is >= it.
  Returns:
    (exit_loop [...] int32 — the last loop when no exit is confident enough —,
     logits [..., V] of that exit).
  """
  conf = jnp.max(jax.nn.softmax(exit_logits.astype(jnp.float32), axis=-1), axis=-1)
  confident = (conf >= threshold).at[-1].set(True)
  loop = jnp.argmax(confident, axis=0).astype(jnp.int32)
  logits = jnp.take_along_axis(exit_logits, loop[None, ..., None], axis=0)[0]
  return loop, logits


class Recursive(nn.Module):
  """``apply(params, tokens, positions, segment_ids, cache, train, targets, loss_mask,
  return_exits) -> (logits, aux)``, as ``model.llama.Llama``.

  ``aux['losses']`` holds the early-exit losses when ``early_exit != 'none'`` and targets
  are given; ``aux['exit_logits']`` [B_loops, B, T, V] every loop's exit logits when
  ``return_exits`` (or early-exit training); ``aux['cache']`` the updated cache.
  """
  cfg: RecursiveConfig

  def init_cache(self, batch, max_len):
    return kv_cache.init_cache_for(self.cfg, batch, max_len)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, train=False,
               targets=None, loss_mask=None, return_exits=False, step=None):
    del train, step  # No dropout or step-dependent behaviour.
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embedder = Embedder(cfg, name='embedder')
    x = nn.with_logical_constraint(embedder.encode(tokens), ('batch', 'length', 'embed'))
    kv_ctx, new_cache = None, None
    if cache is not None:
      kv_ctx, new_cache = kv_cache.advance(cache, positions, segment_ids)
    ctx = (positions, segment_ids, kv_ctx)

    plan = layer_plan(cfg)
    relaxed = any(cfg.rank(p) for p in PROJECTIONS)
    unique = [self.param(f'layers_{j}', _block_init(cfg, cfg.ln_share or
                                                    all(p[1] is None for p in plan if p[0] == j)))
              for j in range(cfg.num_unique_layers)]
    per_layer = []  # unrolled layer l's own parameters: per-loop norms, LoRA
    for l, (j, loop) in enumerate(plan):
      own = {'norms': {}, 'lora': {}}
      if loop is not None and not cfg.ln_share:
        own['norms'] = self.param(f'norms_{l}', _norms_init(cfg))
      if loop is not None and relaxed:
        own['lora'] = self.param(f'lora_{l}', _lora_init(cfg))
      per_layer.append(own)
    training_exits = cfg.early_exit != 'none' and targets is not None and cfg.num_loops > 1
    exits_at, hidden, new_k, new_v = exit_layers(cfg), {}, [], []
    segments = scan_segments(cfg) if cfg.scan_layers and cache is None else []
    scanned = {first: (js, steps) for js, steps, first in segments}
    l = 0
    while l < len(plan):
      if l in scanned:  # one lax.scan over the loops of this run of shared layers
        js, steps = scanned[l]
        own = jax.tree.map(lambda *v: jnp.stack(v), *[
            [per_layer[l + s * len(js) + i] for i in range(len(js))] for s in range(steps)])

        def body(x, own_s, js=js):
          for i, j in enumerate(js):
            x, _ = apply_layer(cfg, {**unique[j], **own_s[i]['norms']}, own_s[i]['lora'], x,
                               None, ctx)
          return x, x if (return_exits or training_exits) else None

        x, ys = jax.lax.scan(body, x, own, length=steps)
        ends = range(l + len(js) - 1, l + steps * len(js), len(js))
        hidden.update({e: ys[s] for s, e in enumerate(ends) if e in exits_at and ys is not None})
        l += steps * len(js)
        continue
      own = per_layer[l]
      layer_kv = None if cache is None else (cache['k'][l], cache['v'][l])
      x, kv = apply_layer(cfg, {**unique[plan[l][0]], **own['norms']}, own['lora'], x, layer_kv,
                          ctx)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
      hidden[l] = x
      l += 1
    hidden = [hidden[e] for e in exits_at[:-1] if e in hidden] + [x]

    final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name='final_norm')
    logits = embedder.decode(final_norm(x))
    aux = {'losses': {}}
    if return_exits or training_exits:
      exit_logits = [embedder.decode(final_norm(h)) for h in hidden[:-1]] + [logits]
      if training_exits:
        mask = jnp.ones(targets.shape) if loss_mask is None else loss_mask
        aux['losses'] = early_exit_losses(cfg, exit_logits, targets, mask)
      if return_exits:
        aux['exit_logits'] = jnp.stack(exit_logits)
    if cache is not None:
      aux['cache'] = dict(new_cache, k=tuple(new_k), v=tuple(new_v))
    return logits, aux
