"""Mixture-of-Recursions (MoR; Bae et al. 2025, arXiv:2507.10524), PAPERS.md §2.

A recursive backbone (``sharing='middle_cycle'``: first and last layers unique, a block of
``base_depth = (L-2)//N_r`` shared layers applied ``N_r`` times; ``cycle``: no unique ends,
``L//N_r`` shared layers) whose lightweight routers decide how many recursions each token
takes. Shared layers are one set of parameters (``shared_j``; with ``scan_layers``, stacked
under ``shared`` and applied by one ``nn.scan`` at every recursion, so a 360M model compiles
one shared layer instead of ``base_depth * N_r``) applied at every recursion, so the
attention projections are tied across recursions.

Routers (option names as in the authors' code):

* ``router='expert_choice'`` (§2.2.1): at recursion r, ``g = alpha * G(theta_r^T H / temperature)``
  (G = sigmoid or tanh) over the tokens still active; the top ``k_r = max(1, int(capacity_r * T))``
  stay (hierarchical filtering; capacity_r is a fraction of the full length T, as in the
  authors' code; padding never takes a place), sorted back into causal order, gathered with
  their original positions and segment ids (static shapes), and updated ``H <- H + g * f(H)``
  (``gating='weighted'``) or ``H <- H + f(H)`` (``'additive'``), where ``f`` is the whole
  shared block output including its residuals (as in the authors' code). Top-k is not
  causal, so ``sampling='aux_loss'`` trains the router logits with a BCE against the top-k
  mask (summed over each recursion's candidates, divided by batch * candidates, summed over
  recursions, times ``aux_coeff``), or ``'aux_router'`` trains a separate router on the
  detached hidden state. Decoding (and ``causal_routing`` forward passes, see
  ``MoR.eval_variants``) keeps a token at recursion r when it was kept at r-1 and that logit
  is >= 0 (sigmoid >= 0.5, tanh >= 0), or when capacity_r = 1, where top-k keeps every token
  (recursion 1 with the default capacities).
* ``router='token_choice'`` (§2.2.2): once, before the first recursion, ``g = G(theta^T H^1)``
  over N_r depths (softmax or sigmoid); the token recurses ``argmax + 1`` times, carrying the
  block output unweighted, and ends as ``H^1 + alpha * g_argmax * f^d(H^1)`` (the authors'
  code). Balancing (``balance_loss``): ``balancing='loss'``, by default the authors'
  ``balance_coeff * sum_i (N_r f_i)(alpha P_i)`` (f_i: fraction of tokens choosing depth i,
  P_i: mean probability of depth i), or with ``balance_formula='plain'`` ``balance_coeff *
  sum_i f_i P_i``; or ``'loss_free'`` (DeepSeek-V3 style, PAPERS.md §2), a bias ``b`` in the
  ``router_state`` collection (not a parameter, no gradient) picks the depth by
  ``argmax(alpha * g + b)`` (the authors' code) while the gate stays ``alpha * g``; each
  training forward pass applied with ``mutable=['router_state']`` returns ``b +
  bias_update_rate * sign(mean_i f_i - f)``, which the trainer keeps for the next step;
  decoding takes the full variables (``model.decode.generate(model, {'params': ...,
  'router_state': ...}, ...)``). Inactive tokens are masked out of attention.
* ``cap_warmup_step`` (expert choice, training): capacities start at 1 and reach their targets
  along the authors' cosine, ``c_r + (1 - c_r) * (1 + cos(pi * min(1, step / W))) / 2``, where
  ``step`` is the model call's ``step`` (the trainer's 0-based step; the authors' counter is
  1-based). Shapes stay static: during training every recursion gathers ``k = T`` tokens
  (the warm-up start) ranked by the router and masks those ranked below ``k_r(step)``, so a
  run with warm-up pays the full recursion compute for all of its steps, not only the
  warm-up (uncounted in ``flops_per_token``). Evaluation and decoding use the targets.
* ``z_loss``: ``z_coeff * mean(logsumexp(logits)^2)`` per router call, summed.

Attention at recursion r runs only among the tokens active at r. KV (§2.3): recursion-wise
caching (each recursion's keys/values, visible only for the tokens that reached it) or, with
``kv_sharing``, every recursion reuses the keys/values of recursion 1. The decoding cache is
``model.kv_cache``'s dict plus ``depth`` [B, S]: the recursions each slot's token took; cache
layers are first, (recursion, shared layer) or (shared layer) with ``kv_sharing``, last.
Slots stay full-size per layer (static shapes): recursion-wise caching hides keys, it saves
neither cache memory nor cache reads; KV sharing saves memory (N_r times fewer shared-layer
slots). A cached call (``model.decode.generate``) runs every token through every recursion
and masks the ones that left, so its cost per token is that of the full recursive model;
``model.mor_engine.MoREngine`` serves the same model with each token running only the
recursions it takes (continuous depth-wise batching), with identical greedy outputs.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model import kv_cache
from model.layers import (DecoderBlock, KVContext, Linear, ModelConfig, RMSNorm, remat,
                          require_llama_layers, training_flops_per_token, write_slots)
from model.llama import Embedder

_SHARING = ('middle_cycle', 'cycle')
_ROUTERS = ('expert_choice', 'token_choice')
# Hidden width (x embed_dim) of each router type; 0 = a single linear map. In the authors'
# code `mlp` and `wide_mlp` are the same two-layer GELU MLP of width 2d.
_ROUTER_WIDTH = {'linear': 0, 'mlp': 2, 'wide_mlp': 2}


@dataclasses.dataclass(frozen=True)
class MoRConfig(ModelConfig):
  """ModelConfig plus the MoR options (names as in the authors' code; see module docstring)."""
  name: str = 'mor'
  num_recursions: int = 3
  sharing: str = 'middle_cycle'
  router: str = 'expert_choice'
  router_type: str = 'linear'
  router_func: str = 'sigmoid'  # expert: sigmoid | tanh; token: softmax | sigmoid
  alpha: float = 0.1
  temperature: float = 1.0
  capacity: tuple = ()  # per recursion; () -> (N_r - r) / N_r
  gating: str = 'weighted'
  sampling: str = 'aux_loss'
  aux_coeff: float = 0.001
  z_loss: bool = False
  z_coeff: float = 0.001
  balancing: str = 'loss'
  balance_coeff: float = 0.1
  balance_formula: str = 'authors'  # token choice's balancing loss: 'authors' | 'plain'
  bias_update_rate: float = 0.001  # balancing='loss_free' (DeepSeek-V3's gamma)
  cap_warmup_step: int = 0
  kv_sharing: bool = False
  causal_routing: bool = False  # expert choice, uncached eval forward: route as decoding does

  def __post_init__(self):
    super().__post_init__()
    require_llama_layers(self, 'mor')
    object.__setattr__(self, 'capacity', tuple(float(c) for c in self.capacity))
    checks = [('sharing', self.sharing, _SHARING), ('router', self.router, _ROUTERS),
              ('router_type', self.router_type, tuple(_ROUTER_WIDTH)),
              ('gating', self.gating, ('weighted', 'additive')),
              ('sampling', self.sampling, ('aux_loss', 'aux_router')),
              ('balancing', self.balancing, ('loss', 'loss_free')),
              ('balance_formula', self.balance_formula, ('authors', 'plain')),
              ('router_func', self.router_func,
               ('sigmoid', 'tanh') if self.router == 'expert_choice' else ('softmax', 'sigmoid'))]
    for field, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f'model.{field}={value!r}; expected one of {allowed}.')
    if self.num_recursions < 1 or self.base_depth < 1:
      raise ValueError(f'model.num_layers={self.num_layers} with sharing={self.sharing!r} '
                       f'leaves no shared layer for num_recursions={self.num_recursions}.')
    caps = self.capacities
    if len(caps) != self.num_recursions or not all(0 < c <= 1 for c in caps) or any(
        b > a for a, b in zip(caps, caps[1:])):
      raise ValueError(f'model.capacity={self.capacity}: expected {self.num_recursions} '
                       'non-increasing values in (0, 1] (or () for (N_r - r) / N_r).')

  @property
  def num_ends(self) -> int:
    """Unique layers before (and after) the shared block: 1 for middle_cycle, else 0."""
    return int(self.sharing == 'middle_cycle')

  @property
  def base_depth(self) -> int:
    """Shared layers in the recursion block: (L - 2)//N_r (middle_cycle) or L//N_r."""
    return (self.num_layers - 2 * self.num_ends) // max(self.num_recursions, 1)

  @property
  def capacities(self) -> tuple:
    n = self.num_recursions
    return self.capacity or tuple((n - r) / n for r in range(n))

  def top_ks(self, seq_len):
    """Static tokens kept per row at each recursion: max(1, int(capacity_r * T))."""
    return tuple(max(1, int(c * seq_len)) for c in self.capacities)

  def warmup_top_ks(self, seq_len, step):
    """Tokens kept per row at each recursion at training step ``step`` (traced int32):
    ``max(1, int(c_r(step) * T))`` along the cosine warm-up, the targets once it is over."""
    ratio = jnp.minimum(step / self.cap_warmup_step, 1.0)
    decay = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))
    return tuple(jnp.where(ratio >= 1, k, jnp.maximum(1, jnp.floor((c + (1 - c) * decay) *
                                                                    seq_len)).astype(jnp.int32))
                 for c, k in zip(self.capacities, self.top_ks(seq_len)))

  def flops_per_token(self, seq_len: int) -> float:
    """Expected training FLOPs per token under the target capacities (token choice: the
    balanced split (N_r - r)/N_r), as the paper counts them: a shared layer runs on the
    fraction c_r of tokens at recursion r, its attention costs c_r^2 (recursion-wise caching)
    or c_r (KV sharing; K/V projections still counted), and each router runs on its
    candidates. Warm-up steps and token choice's masking cost more (module docstring)."""
    n = self.num_recursions
    caps = (self.capacities if self.router == 'expert_choice' else
            tuple((n - r) / n for r in range(n)))
    width = _ROUTER_WIDTH[self.router_type]
    e = self.embed_dim
    router = lambda out: width * e * (e + out) if width else e * out
    if self.router == 'expert_choice':
      candidates = sum((1.0,) + caps[:-1])
      routers = candidates * router(1) * (2 if self.sampling == 'aux_router' else 1)
    else:
      routers = router(n)
    ends = 2 * self.num_ends
    return training_flops_per_token(
        self, seq_len, layers=ends + self.base_depth * sum(caps),
        attention_layers=ends + self.base_depth * sum(
            c * (1.0 if self.kv_sharing else c) for c in caps), extra_params=routers)

  @property
  def num_cache_layers(self) -> int:
    shared = self.base_depth * (1 if self.kv_sharing else self.num_recursions)
    return 2 * self.num_ends + shared


class Router(nn.Module):
  """Bias-free router: linear, or a GELU MLP of width ``_ROUTER_WIDTH * d``; float32 logits."""
  cfg: MoRConfig
  features: int

  @nn.compact
  def __call__(self, x):
    cfg, width = self.cfg, _ROUTER_WIDTH[self.cfg.router_type]
    names = ('embed', 'router')
    if width:
      x = nn.gelu(Linear((width * cfg.embed_dim,), ('embed', 'mlp'), cfg, name='hidden')(x),
                  approximate=False)
      names = ('mlp', 'router')
    return Linear((self.features,), names, cfg, name='proj')(x).astype(jnp.float32)


def shared_layer(params, j):
  """Shared layer j's parameters, in the loop (``shared_j``) or scanned (``shared``) layout."""
  if f'shared_{j}' in params:
    return params[f'shared_{j}']
  return jax.tree.map(lambda x: x[j], params['shared'])


class _Block:
  """Applies the shared layers at recursion r with that recursion's keys/values.

  ``run(r, h, positions, segment_ids, active)``: ``h`` [B, N, E] are the tokens processed
  (gathered, or all with an ``active`` mask: inactive ones are hidden from attention).
  Uncached: keys are the processed tokens (or recursion 1's with ``kv_sharing``). Cached:
  every call's tokens are written into their recursion's cache layer; a slot is visible at
  recursion r when its token reached r (``depth``), or reached recursion 1 when sharing.
  """

  def __init__(self, cfg, layers, cache=None, kv_ctx=None):
    """``layers``: the shared layers as a list of modules, or one ``nn.scan`` over them
    (``scan_layers``: parameters stacked under ``shared``), called with stacked keys/values."""
    self.cfg, self.layers, self.depth = cfg, layers, cfg.base_depth
    self.shared_kv, self.shared_vis = [None] * self.depth, None
    self.cache_kv = None
    if cache is not None:
      first = cfg.num_ends
      self.cache_kv = [(cache['k'][first + i], cache['v'][first + i])
                       for i in range(cfg.num_cache_layers - 2 * first)]
      self.kv_ctx = kv_ctx
      self.new_depth = None
      self.slot_depth = cache['depth']

  def __call__(self, r, h, positions, segment_ids, active):
    cfg, cached = self.cfg, self.cache_kv is not None
    reuse = cfg.kv_sharing and r > 0
    if cached:  # the cache's positions mark padding; segment ids are not needed
      segment_ids = None
      self.new_depth = active.astype(jnp.int32) + (0 if r == 0 else self.new_depth)
      self.slot_depth = write_slots(self.slot_depth, self.new_depth, self.kv_ctx.write_idx)
    if reuse:
      kv_pos, kv_seg = self.shared_vis
    elif cached:
      kv_pos, kv_seg = jnp.where(self.slot_depth > r, self.kv_ctx.kv_pos, -1), None
    else:
      kv_pos, kv_seg = jnp.where(active & (segment_ids > 0), positions, -1), segment_ids
    if r == 0:
      self.shared_vis = (kv_pos, kv_seg)
    write_idx = self.kv_ctx.write_idx if cached and not reuse else None
    slots = [j if cfg.kv_sharing else r * self.depth + j for j in range(self.depth)]
    if cached:
      layer_kvs = [self.cache_kv[slot] for slot in slots]
    else:
      layer_kvs = self.shared_kv if reuse else [None] * self.depth
    h, kvs = self._layers(h, layer_kvs, (positions, segment_ids,
                                         KVContext(kv_pos, write_idx, kv_seg)))
    for j, (slot, kv) in enumerate(zip(slots, kvs)):
      if cached and not reuse:
        self.cache_kv[slot] = kv
      elif r == 0:
        self.shared_kv[j] = kv
    return h

  def _layers(self, h, layer_kvs, ctx):
    """The shared layers on ``h`` with per-layer keys/values (or Nones) -> (h, their new
    keys/values, a list)."""
    if isinstance(self.layers, list):
      kvs = []
      for layer, layer_kv in zip(self.layers, layer_kvs):
        h, kv = layer(h, layer_kv, ctx)
        kvs.append(kv)
      return h, kvs
    stacked = None if layer_kvs[0] is None else tuple(
        jnp.stack([kv[i] for kv in layer_kvs]) for i in range(2))
    h, new = self.layers(h, stacked, ctx)
    return h, [None if new is None else (new[0][j], new[1][j]) for j in range(self.depth)]


def _take(x, idx):
  """Gathers rows' entries at idx [B, K] along axis 1 of x [B, N, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter_add(x, idx, updates):
  return jax.vmap(lambda a, i, u: a.at[i].add(u.astype(a.dtype)))(x, idx, updates)


def _router_probs(cfg, logits):
  """G(logits): sigmoid, tanh or softmax over the last axis."""
  return {'sigmoid': jax.nn.sigmoid, 'tanh': jnp.tanh,
          'softmax': lambda z: jax.nn.softmax(z, axis=-1)}[cfg.router_func](logits)


def _z_loss(cfg, logits):
  return cfg.z_coeff * jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def _delta(cfg, gate, out):
  """What a recursion adds to H: g * f(H) (weighted gating) or f(H) (additive)."""
  return gate[..., None] * out if cfg.gating == 'weighted' else out


def expert_choice_topk(cfg, x, positions, segment_ids, routers, aux_routers, block, step=None):
  """Training-time expert choice: static top-k per recursion among the previous survivors.

  Padding (segment id 0) is never a candidate: it ranks below every real token, is never
  kept (so a row with fewer real tokens than ``k_r`` keeps only its real ones) and is left
  out of the BCE and z-loss sums (whose denominators stay batch * candidates, static).
  With ``cfg.cap_warmup_step`` and a training ``step``, each recursion gathers the top
  ``T`` candidates and keeps those ranked below ``k_r(step)`` (``MoRConfig.warmup_top_ks``);
  the others are masked out of attention, the update, the depth and the BCE.
  Returns (x, depth [B, T], losses).
  """
  b, t, _ = x.shape
  k_max = ks = cfg.top_ks(t)
  if cfg.cap_warmup_step and step is not None:
    k_max, ks = (t,) * cfg.num_recursions, cfg.warmup_top_ks(t, step)
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid, n_valid = segment_ids > 0, t  # candidates: the previous recursion's kept tokens
  depth = jnp.zeros((b, t), jnp.int32)
  bce, z = 0.0, 0.0
  for r, (k_static, k) in enumerate(zip(k_max, ks)):
    h = _take(x, idx)
    logits = routers[r](h / cfg.temperature)[..., 0]  # [B, candidates]
    # G is increasing: top-k of g = top-k of the logits; non-candidates rank last, unkept.
    _, order = jax.lax.top_k(jnp.where(valid, logits, -jnp.inf), k_static)
    kept = (jnp.arange(k_static) < k) & _take(valid, order)
    perm = jnp.argsort(order, axis=-1)  # causal order
    sel, kept = _take(order, perm), _take(kept, perm)
    target = jnp.zeros(logits.shape).at[jnp.arange(b)[:, None], sel].set(kept.astype(float))
    decision = logits if cfg.sampling == 'aux_loss' else (
        aux_routers[r](jax.lax.stop_gradient(h))[..., 0])
    bce += jnp.where(valid, optax.sigmoid_binary_cross_entropy(decision, target),
                     0.0).sum() / (b * n_valid)
    z += cfg.z_coeff * jnp.where(valid, jnp.square(logits), 0.0).sum() / (b * n_valid)
    idx = _take(idx, sel)
    gate = cfg.alpha * _router_probs(cfg, _take(logits, sel))
    out = block(r, _take(h, sel), _take(positions, idx), _take(segment_ids, idx), kept)
    x = _scatter_add(x, idx, jnp.where(kept[..., None], _delta(cfg, gate, out), 0.0))
    depth = _scatter_add(depth, idx, kept.astype(jnp.int32))
    valid, n_valid = kept, k
  losses = {'mor_sampling': cfg.aux_coeff * bce}
  if cfg.z_loss:
    losses['mor_z'] = z
  return x, depth, losses


def causal_keep(cfg, r, decision):
  """Causal expert choice's rule at recursion ``r`` (an int or an int array like
  ``decision``): keep a token whose router (or aux router) logit is >= 0, or every token
  when capacity_r = 1 (top-k then keeps all T tokens in training)."""
  full = jnp.asarray([c >= 1.0 for c in cfg.capacities])
  return full[jnp.minimum(r, cfg.num_recursions - 1)] | (decision >= 0)


def expert_choice_causal(cfg, x, positions, segment_ids, routers, aux_routers, block):
  """Causal expert choice (decoding): a token continues while ``causal_keep`` holds and it
  was kept at the previous recursion; all tokens are processed with inactive ones masked.
  Returns (x, depth, {})."""
  active = jnp.ones(x.shape[:2], bool)
  depth = jnp.zeros(x.shape[:2], jnp.int32)
  for r in range(cfg.num_recursions):
    logits = routers[r](x / cfg.temperature)[..., 0]
    decision = logits if cfg.sampling == 'aux_loss' else aux_routers[r](x)[..., 0]
    active = active & causal_keep(cfg, r, decision)
    out = block(r, x, positions, segment_ids, active)
    gate = cfg.alpha * _router_probs(cfg, logits)
    x = jnp.where(active[..., None], x + _delta(cfg, gate, out).astype(x.dtype), x)
    depth = depth + active
  return x, depth, {}


def depth_load(cfg, depth):
  """f_i: the fraction of tokens taking i + 1 recursions."""
  return jnp.mean(jax.nn.one_hot(depth - 1, cfg.num_recursions), axis=(0, 1))


def choose_depth(cfg, probs, bias=None):
  """Token choice's decision from router probabilities g [..., N_r]: (depth = argmax(alpha * g
  + bias) + 1, gate = alpha * g of that depth). The loss-free bias is added to the
  alpha-scaled probabilities, as in the authors' code (it matters when alpha != 1)."""
  scores = cfg.alpha * probs
  choice = jnp.argmax(scores if bias is None else scores + bias, axis=-1)
  return choice + 1, jnp.take_along_axis(scores, choice[..., None], axis=-1)[..., 0]


def balance_loss(cfg, depth, probs):
  """Token choice's balancing loss over all B * T tokens, with f_i the fraction of tokens
  taking i + 1 recursions and P_i the mean router probability of depth i + 1:

  * ``balance_formula='authors'`` (default; the authors' code): ``balance_coeff *
    sum_i (N_r f_i) (alpha P_i)``, i.e. f_i = N_r * count_i / (B T) and P_i taken from the
    alpha-scaled probabilities;
  * ``'plain'``: ``balance_coeff * sum_i f_i P_i``, the authors' divided by N_r * alpha.
  """
  load, mean_probs = depth_load(cfg, depth), jnp.mean(probs, axis=(0, 1))
  if cfg.balance_formula == 'authors':
    load, mean_probs = cfg.num_recursions * load, cfg.alpha * mean_probs
  return cfg.balance_coeff * jnp.sum(load * mean_probs)


def token_choice(cfg, x, positions, segment_ids, router, block, bias=None):
  """Token choice: one routing decision before recursion 1 (``choose_depth``, with the
  loss-free balancing bias). Returns (x, depth, losses)."""
  logits = router(x / cfg.temperature)  # [B, T, N_r]
  probs = _router_probs(cfg, logits)
  depth, gate = choose_depth(cfg, probs, bias)
  h = x
  for r in range(cfg.num_recursions):
    active = depth > r
    h = jnp.where(active[..., None], block(r, h, positions, segment_ids, active), h)
  losses = {}
  if cfg.balancing == 'loss':
    losses['mor_balance'] = balance_loss(cfg, depth, probs)
  if cfg.z_loss:
    losses['mor_z'] = _z_loss(cfg, logits)
  return x + _delta(cfg, gate, h).astype(x.dtype), depth.astype(jnp.int32), losses


class MoR(nn.Module):
  """``apply(variables, tokens, positions, segment_ids, cache, train, step) -> (logits, aux)``.

  ``aux``: ``losses`` (scaled router losses), ``depth`` [B, T] (recursions per token) and,
  with a cache, the updated ``cache``. Expert choice routes by top-k unless a cache is given
  (or ``causal_routing`` outside training), then by the causal threshold rule. ``step`` (the
  training step) drives ``cap_warmup_step``. ``balancing='loss_free'`` adds the
  ``router_state`` collection to the variables; a training call with
  ``mutable=['router_state']`` returns its update.
  """
  cfg: MoRConfig

  def eval_variants(self) -> dict[str, nn.Module]:
    """Models to evaluate beside this one on the same variables, by name. Expert choice
    (unless already ``causal_routing``): ``{'causal_routing': MoR with causal_routing=True}``,
    routing as decoding does, so a token's loss does not depend on later tokens; its uncached
    logits equal cached decoding's. Token choice is causal already: ``{}``."""
    if self.cfg.router != 'expert_choice' or self.cfg.causal_routing:
      return {}
    return {'causal_routing': MoR(dataclasses.replace(self.cfg, causal_routing=True),
                                  parent=None)}

  def init_cache(self, batch, max_len):
    cache = kv_cache.init_cache_for(self.cfg, batch, max_len, self.cfg.num_cache_layers)
    return dict(cache, depth=jnp.zeros((batch, max_len), jnp.int32))

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, train=False,
               targets=None, loss_mask=None, step=None):
    del targets, loss_mask  # No target-dependent losses in this family.
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    embedder = Embedder(cfg, name='embedder')
    x = nn.with_logical_constraint(embedder.encode(tokens), ('batch', 'length', 'embed'))
    kv_ctx, new_cache = None, None
    if cache is not None:
      kv_ctx, new_cache = kv_cache.advance(cache, positions, segment_ids)
    block_cls = remat(DecoderBlock, cfg)
    ends_kv = []

    def end_layer(x, name, i):
      layer_kv = None if cache is None else (cache['k'][i], cache['v'][i])
      x, kv = block_cls(cfg, name=name)(x, layer_kv, (positions, segment_ids, kv_ctx))
      ends_kv.append(kv)
      return x

    if cfg.num_ends:
      x = end_layer(x, 'first', 0)
    if cfg.scan_layers:  # one compiled layer, applied by a scan at every recursion
      shared = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=(0, nn.broadcast), length=cfg.base_depth,
                       unroll=cfg.base_depth if cache is not None else 1,
                       metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, name='shared')
    else:
      shared = [block_cls(cfg, name=f'shared_{j}') for j in range(cfg.base_depth)]
    block = _Block(cfg, shared, cache, kv_ctx)
    if cfg.router == 'token_choice':
      bias = None
      if cfg.balancing == 'loss_free':
        bias = self.variable('router_state', 'bias', jnp.zeros, (cfg.num_recursions,),
                             jnp.float32)
      x, depth, losses = token_choice(cfg, x, positions, seg, Router(
          cfg, cfg.num_recursions, name='router'), block, None if bias is None else bias.value)
      if bias is not None and train and self.is_mutable_collection('router_state'):
        load = depth_load(cfg, depth)
        bias.value += cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load)
    else:
      routers = [Router(cfg, 1, name=f'router_{r}') for r in range(cfg.num_recursions)]
      aux_routers = ([Router(cfg, 1, name=f'aux_router_{r}') for r in range(cfg.num_recursions)]
                     if cfg.sampling == 'aux_router' else None)
      args = (cfg, x, positions, seg, routers, aux_routers, block)
      if cache is not None or (cfg.causal_routing and not train):
        x, depth, losses = expert_choice_causal(*args)
      else:
        x, depth, losses = expert_choice_topk(*args, step=step if train else None)
    if cfg.num_ends:
      x = end_layer(x, 'last', cfg.num_cache_layers - 1)
    x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name='final_norm')(x)
    aux = {'losses': losses, 'depth': depth}
    if cache is not None:
      layers_kv = ends_kv[:cfg.num_ends] + block.cache_kv + ends_kv[cfg.num_ends:]
      aux['cache'] = dict(new_cache, k=tuple(k for k, _ in layers_kv),
                          v=tuple(v for _, v in layers_kv), depth=block.slot_depth)
    return embedder.decode(x), aux
