"""Continuous depth-wise batching for Mixture-of-Recursions (arXiv:2507.10524, §2.3 / §4.2).

Each slot holds one request's current token in one of three phases:

* ``ENTER``: the token needs its embedding, the unique first layer (``middle_cycle``) and the
  routing decision for recursion 1;
* ``RECURSE``: the token runs recursion ``rec`` of the shared block next;
* ``LEAVE``: the token is done; it needs the unique last layer, the final norm and the head,
  and its slot then enters the emitted token at the next position.

An engine step first serves up to ``exit_lanes`` ENTER/LEAVE slots (the longest-waiting
first; the rest wait a step) through the unique layers, then runs the shared block *once*
over all slots, each at its own recursion: tokens of different requests at different depths
share that batched pass, and a token that stopped recursing frees its place at once. So a
step costs ``base_depth`` layers on ``num_slots`` tokens plus 2 unique layers on
``exit_lanes`` tokens, and a token costs as many steps as recursions it takes.

Routing is MoR's causal decoding rule (``model.mor``): expert choice continues to recursion
r while ``mor.causal_keep`` holds (the router or auxiliary router logit at r is >= 0, or
capacity_r = 1); token choice picks its depth once, after the first layer
(``mor.choose_depth``: ``argmax`` of the alpha-scaled router probabilities plus the
loss-free bias). KV follows ``cfg.kv_sharing``: recursion-wise caching writes a token's K/V
at each recursion it runs and attention at recursion r sees only earlier tokens that
reached r (``cache['depth']``); with KV sharing, recursion 1 writes and every recursion
attends over recursion 1's K/V.
Outputs equal ``model.decode.generate`` (greedy) of the same model on each request alone.
Cache slots stay full-size per layer (static shapes), as in ``MoR.init_cache``.
"""
import jax
import jax.numpy as jnp

from model.engine import SlotEngine
from model.layers import DecoderBlock, KVContext, RMSNorm, project_kv
from model.llama import Embedder
from model.mor import (MoR, MoRConfig, Router, _delta, shared_layer,
                       _router_probs, causal_keep, choose_depth)
from model.recursive import apply_layer

ENTER, RECURSE, LEAVE = 0, 1, 2


def _rows(x, idx):
  return jax.tree.map(lambda a: a[idx], x)


def _set_rows(x, idx, values, mask):
  """x[idx] = values where mask [M], for every leaf (rows along axis 0)."""
  def one(a, v):
    m = mask.reshape(mask.shape + (1,) * (v.ndim - 1))
    return a.at[idx].set(jnp.where(m, v.astype(a.dtype), a[idx]))
  return jax.tree.map(one, x, values)


def make_step(cfg: MoRConfig, exit_lanes: int):
  """``step(variables, state, cache) -> (state, cache, emitted [S], depth [S])``.

  ``state``: ``h`` [S, 1, E] hidden state, ``h0`` [S, 1, E] token choice's state after the
  first layer, ``token``, ``pos``, ``phase``, ``rec`` (recursions done), ``target``
  (token-choice depth), ``gate`` (router logit of the next recursion, or token choice's
  gate), ``wait`` (steps spent waiting for a lane), ``active``; all [S].
  """
  nr, first, last = cfg.num_recursions, 0, cfg.num_cache_layers - 1
  embedder, norm = Embedder(cfg, parent=None), RMSNorm(cfg.norm_eps, cfg.compute_dtype)

  def end_layer(params, name, layer, cache, slots, x, pos, write):
    """A unique layer on lanes ``slots`` at ``pos``; K/V kept only where ``write``."""
    k_rows, v_rows = cache['k'][layer, slots], cache['v'][layer, slots]
    ctx = (pos[:, None], None, KVContext(kv_pos=cache['pos'][slots], write_idx=pos))
    x, (k, v) = apply_layer(cfg, params[name], {}, x, (k_rows, v_rows), ctx)
    lanes = jnp.arange(slots.shape[0])
    return x, {**cache, **{buf: _set_rows(cache[buf], (layer, slots, slice(None), pos),
                                          new[lanes, :, pos], write)
                           for buf, new in (('k', k), ('v', v))}}

  def continues(variables, h, rec, target):
    """(whether each token runs recursion ``rec``, that recursion's router logit)."""
    params = variables['params']
    if cfg.router == 'token_choice':
      return rec < target, jnp.zeros(rec.shape, jnp.float32)
    pick = lambda name: jnp.stack(
        [Router(cfg, 1).apply({'params': params[f'{name}_{r}']}, h / (
            cfg.temperature if name == 'router' else 1.0))[:, 0, 0] for r in range(nr)]
    )[jnp.minimum(rec, nr - 1), jnp.arange(rec.shape[0])]
    logit = pick('router')
    decision = logit if cfg.sampling == 'aux_loss' else pick('aux_router')
    return (rec < nr) & causal_keep(cfg, rec, decision), logit

  def token_depth(variables, x):
    """Token choice: (depth, gate) of ``mor.choose_depth``, with the loss-free bias."""
    logits = Router(cfg, nr).apply({'params': variables['params']['router']},
                                   x / cfg.temperature)[:, 0]
    bias = variables.get('router_state', {}).get('bias')
    return choose_depth(cfg, _router_probs(cfg, logits), bias)

  def serve_lanes(variables, state, cache):
    """LEAVE lanes: last layer + head, emit; then ENTER lanes (and the leavers' next token):
    embedding + first layer + routing."""
    params, s = variables['params'], state['pos'].shape[0]
    slots = jnp.arange(s)
    wants = state['active'] & (state['phase'] != RECURSE)
    _, lane = jax.lax.top_k(jnp.where(wants, state['wait'] * s + s - slots, -1), exit_lanes)
    ok = wants[lane]
    st = _rows(state, lane)
    leaving = ok & (st['phase'] == LEAVE)
    x = st['h']
    if cfg.num_ends:
      x, cache = end_layer(params, 'last', last, cache, lane, x, st['pos'], leaving)
    logits = embedder.apply({'params': params['embedder']},
                            norm.apply({'params': params['final_norm']}, x),
                            method=Embedder.decode)[:, 0]
    new_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    emitted = jnp.full((s,), -1, jnp.int32).at[lane].set(jnp.where(leaving, new_token, -1))
    depth = jnp.zeros((s,), jnp.int32).at[lane].set(st['rec'])
    token = jnp.where(leaving, new_token, st['token'])
    pos = jnp.where(leaving, st['pos'] + 1, st['pos'])
    cache = dict(cache, pos=_set_rows(cache['pos'], (lane, pos), pos, ok),
                 depth=_set_rows(cache['depth'], (lane, pos), jnp.zeros_like(pos), ok))
    x = embedder.apply({'params': params['embedder']}, token[:, None], method=Embedder.encode)
    if cfg.num_ends:
      x, cache = end_layer(params, 'first', first, cache, lane, x, pos, ok)
    rec = jnp.zeros_like(pos)
    if cfg.router == 'token_choice':
      target, gate = token_depth(variables, x)
      run, _ = continues(variables, x, rec, target)
    else:
      target = rec
      run, gate = continues(variables, x, rec, target)
    new = {'h': x, 'h0': x, 'token': token, 'pos': pos, 'rec': rec, 'target': target,
           'gate': gate, 'phase': jnp.where(run, RECURSE, LEAVE), 'wait': rec}
    state = dict(state, **_set_rows({k: state[k] for k in new}, lane, new, ok))
    served = jnp.zeros((s,), bool).at[lane].set(ok)
    state['wait'] = jnp.where(wants & ~served, state['wait'] + 1, state['wait'])
    return state, cache, emitted, depth

  def recurse(variables, state, cache):
    """The shared block once over every RECURSE slot, each at its own recursion."""
    params, s = variables['params'], state['pos'].shape[0]
    slots, pos, rec = jnp.arange(s), state['pos'], state['rec']
    run = state['active'] & (state['phase'] == RECURSE)
    depth_rows = cache['depth'].at[slots, pos].set(jnp.where(run, rec + 1, cache['depth'][
        slots, pos]))
    seen = 0 if cfg.kv_sharing else rec[:, None]
    ctx = (pos[:, None], None, KVContext(jnp.where(depth_rows > seen, cache['pos'], -1)))
    write = run & (rec == 0) if cfg.kv_sharing else run
    x = state['h']
    k_cache, v_cache = cache['k'], cache['v']
    for j in range(cfg.base_depth):
      layer = cfg.num_ends + (j if cfg.kv_sharing else rec * cfg.base_depth + j)
      k, v = project_kv(cfg, shared_layer(params, j), x, pos[:, None])
      k_cache = _set_rows(k_cache, (layer, slots, slice(None), pos), k[:, 0], write)
      v_cache = _set_rows(v_cache, (layer, slots, slice(None), pos), v[:, 0], write)
      x, _ = DecoderBlock(cfg).apply({'params': shared_layer(params, j)}, x,
                                       (k_cache[layer, slots], v_cache[layer, slots]), ctx)
    h = state['h']
    if cfg.router == 'token_choice':
      h = x
    else:
      g = cfg.alpha * _router_probs(cfg, state['gate'])
      h = h + _delta(cfg, g[:, None], x).astype(h.dtype)
    h = jnp.where(run[:, None, None], h, state['h'])
    rec = jnp.where(run, rec + 1, rec)
    more, logit = continues(variables, h, rec, state['target'])
    done = run & ~more
    gate = state['gate']
    if cfg.router == 'token_choice':  # H^1 + alpha * g * f^d(H^1) once the depth is reached
      h = jnp.where(done[:, None, None],
                    state['h0'] + _delta(cfg, gate[:, None], h).astype(h.dtype), h)
    else:  # the next recursion's router logit gates it
      gate = jnp.where(run & more, logit, gate)
    state = dict(state, h=h, rec=rec, gate=gate, phase=jnp.where(done, LEAVE, state['phase']))
    return state, dict(cache, k=k_cache, v=v_cache, depth=depth_rows)

  def step(variables, state, cache):
    state, cache, emitted, depth = serve_lanes(variables, state, cache)
    state, cache = recurse(variables, state, cache)
    return state, cache, emitted, depth

  return step


class MoREngine(SlotEngine):
  """Serves a MoR model with continuous depth-wise batching (module docstring), greedily.

  ``variables``: the parameter tree or ``{'params': ..., 'router_state': ...}``.
  ``exit_lanes`` (default ``num_slots``): slots served by the unique layers per step.
  ``stats['exits_per_depth'][d]`` counts emitted tokens that took d recursions.
  """

  def __init__(self, cfg: MoRConfig, variables, num_slots: int, max_len: int,
               exit_lanes=None, stop_tokens=(), static_batching=False):
    exit_lanes = num_slots if exit_lanes is None else exit_lanes
    if not 1 <= exit_lanes <= num_slots:
      raise ValueError(f'exit_lanes={exit_lanes} must be in [1, num_slots={num_slots}].')
    super().__init__(MoR(cfg), variables, num_slots, max_len, stop_tokens, static_batching)
    self.cfg, self.num_depths = cfg, cfg.num_recursions + 1
    self.fresh_slot = {'phase': ENTER, 'rec': 0, 'wait': 0}
    self._step = jax.jit(make_step(cfg, exit_lanes), donate_argnums=(1, 2))

  def _init_state(self, n):
    zeros = lambda dtype: jnp.zeros((n,), dtype)
    hidden = lambda: jnp.zeros((n, 1, self.cfg.embed_dim), self.cfg.compute_dtype)
    return {'h': hidden(), 'h0': hidden(), 'token': zeros(jnp.int32), 'pos': zeros(jnp.int32),
            'phase': zeros(jnp.int32), 'rec': zeros(jnp.int32), 'target': zeros(jnp.int32),
            'gate': zeros(jnp.float32), 'wait': zeros(jnp.int32), 'active': zeros(bool)}
