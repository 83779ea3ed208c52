"""Continuous depth-wise batching (CDB) for Recursive Transformers (arXiv:2410.20672, §3.5).

A serving loop over a queue of requests with ``num_slots`` slots. Every engine step runs
the shared block (``block_size`` layers) once on all slots; each slot holds one request's
current token at its own loop depth, so a batch mixes tokens of different requests at
different depths (the paper simulated this; this engine runs it). A token leaves a slot's
loop either after the last loop or, with ``exit_threshold``, as soon as its exit's maximal
softmax probability reaches the threshold (§3.4); the slot then takes the request's next
token at depth 0, and a finished request's slot is refilled from the queue at once
(prefilled by the full model, then inserted into the slot's cache rows).

Missing KV of an early exit (PAPERS.md §1, the open problem): when a token exits after loop
d, its exit hidden state is propagated through the remaining loops' K/V projections only —
for every deeper layer, K/V = RoPE(W_k/v · attn_norm(h_exit)), as if the skipped layers
were identity maps — so later tokens at deeper loops attend to it like to any other token.

Baselines in the same code: a vanilla Llama is the recursive family with one loop
(``single_loop``); ``static_batching=True`` refills slots only when all are free (static
batching), otherwise slots refill at once (continuous sequence-wise batching).
Greedy decoding; requires ``cycle`` sharing, shared norms and no LoRA (all loops then use
identical weights).
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import kv_cache
from model.layers import KVContext, ModelConfig, RMSNorm, project_kv
from model.llama import Embedder
from model.recursive import PROJECTIONS, Recursive, RecursiveConfig, apply_layer


def single_loop(vanilla_cfg: ModelConfig) -> RecursiveConfig:
  """The one-loop recursive config whose parameters are exactly a vanilla Llama's."""
  values = {f: getattr(vanilla_cfg, f) for f in vanilla_cfg.__dataclass_fields__}
  return RecursiveConfig(**{**values, 'name': 'recursive', 'num_loops': 1})


@dataclasses.dataclass
class Request:
  prompt: list
  max_new_tokens: int


def make_step(cfg: RecursiveConfig, exit_threshold):
  """``step(params, state, cache) -> (state, cache, emitted [S], exit_depth [S])``.

  ``state``: ``h`` [S, 1, E] hidden state, ``token`` [S] current token, ``pos`` [S] its
  position, ``depth`` [S] its loop, ``active`` [S]. ``emitted`` is the greedy next token of
  slots whose token exited this step, else -1.
  """
  size, loops = cfg.block_size, cfg.num_loops

  def step(params, state, cache):
    slots = jnp.arange(state['pos'].shape[0])
    pos, depth = state['pos'], state['depth']
    embedder = Embedder(cfg, parent=None)
    embed = embedder.apply({'params': params['embedder']}, state['token'][:, None],
                           method=Embedder.encode)
    x = jnp.where((depth == 0)[:, None, None], embed, state['h'])
    kv_pos = cache['pos'].at[slots, pos].set(pos)
    ctx = (pos[:, None], None, KVContext(kv_pos=kv_pos, write_idx=pos))
    k_cache, v_cache = cache['k'], cache['v']
    for j in range(size):
      layer = depth * size + j
      x, (k, v) = apply_layer(cfg, params[f'layers_{j}'], {}, x,
                              (k_cache[layer, slots], v_cache[layer, slots]), ctx)
      # Only the new entries go back (writing whole rows would copy the cache every step).
      k_cache = k_cache.at[layer, slots, :, pos].set(k[slots, :, pos])
      v_cache = v_cache.at[layer, slots, :, pos].set(v[slots, :, pos])
    normed = RMSNorm(cfg.norm_eps, cfg.compute_dtype).apply({'params': params['final_norm']}, x)
    logits = embedder.apply({'params': params['embedder']}, normed, method=Embedder.decode)[:, 0]
    exits = depth == loops - 1
    if exit_threshold is not None:
      exits |= jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= exit_threshold
    exits &= state['active']
    # Early exits: K/V of every deeper layer from the exit hidden state (module docstring).
    for layer in range(size, size * loops):
      k, v = project_kv(cfg, params[f'layers_{layer % size}'], x, pos[:, None])
      fill = exits & (layer >= (depth + 1) * size)
      k_cache = k_cache.at[layer, slots, :, pos].set(
          jnp.where(fill[:, None, None], k[:, 0], k_cache[layer, slots, :, pos]))
      v_cache = v_cache.at[layer, slots, :, pos].set(
          jnp.where(fill[:, None, None], v[:, 0], v_cache[layer, slots, :, pos]))
    emitted = jnp.where(exits, jnp.argmax(logits, axis=-1).astype(jnp.int32), -1)
    new_state = dict(state, h=x, token=jnp.where(exits, emitted, state['token']),
                     pos=jnp.where(exits, pos + 1, pos), depth=jnp.where(exits, 0, depth + 1))
    return new_state, dict(cache, k=k_cache, v=v_cache, pos=kv_pos), emitted, depth

  return step


class SlotEngine:
  """The serving loop every engine shares: a queue of ``Request``s, ``num_slots`` slots,
  greedy outputs and throughput stats. A subclass sets ``self._step`` (jit-compiled
  ``(variables, state, cache) -> (state, cache, emitted [S], depth [S])``: ``emitted`` is the
  token each slot emitted this step or -1, ``depth`` how deep that token went),
  ``fresh_slot`` (state fields of a newly filled slot) and ``_init_state(n)``.
  ``static_batching=True`` refills slots only when all are free (static batching),
  otherwise at once (continuous batching). The engine keeps the model's cache with its
  layers stacked (``kv_cache.stack_layers``: [L, B, Hkv, S, D]), since a step picks each
  slot's cache layer by its traced depth.
  """
  num_depths: int  # length of stats['exits_per_depth']
  fresh_slot: dict

  def __init__(self, model, variables, num_slots, max_len, stop_tokens=(),
               static_batching=False):
    self.model, self.num_slots, self.max_len = model, num_slots, max_len
    variables = variables if 'params' in variables else {'params': variables}
    self.variables = jax.device_put(variables)  # once, not a host copy per step
    self.stop_tokens, self.static_batching = set(stop_tokens), static_batching
    self._prefill = jax.jit(self._prefill_fn)
    self._insert = jax.jit(self._insert_fn, donate_argnums=(0, 1))

  def _prefill_fn(self, variables, tokens, length):
    """Cache row of one prompt's first ``length`` tokens (the last one is fed by a step)."""
    steps = jnp.arange(tokens.shape[0])
    _, aux = self.model.apply(variables, tokens[None], positions=steps[None],
                              segment_ids=(steps < length)[None].astype(jnp.int32),
                              cache=self.model.init_cache(1, self.max_len))
    return self._engine_cache(aux['cache'])

  def _engine_cache(self, cache):
    """The model's cache as the engine keeps it: layers stacked, no shared write slot."""
    return {k: v for k, v in kv_cache.stack_layers(cache).items() if k != 'end'}

  def _insert_fn(self, state, cache, row, slot, token, pos):
    """Puts a prefilled cache row into ``slot`` ([L, B, ...] buffers or [B, ...] ones)."""
    cache = jax.tree.map(lambda buf, new: (buf.at[:, slot].set(new[:, 0]) if buf.ndim == 5 else
                                           buf.at[slot].set(new[0])), cache, row)
    fresh = dict(self.fresh_slot, token=token, pos=pos, active=True)
    return dict(state, **{k: state[k].at[slot].set(v) for k, v in fresh.items()}), cache

  def _init_state(self, n):
    raise NotImplementedError

  def run(self, requests):
    """Serves all requests; returns (generated token lists, stats dict); ``stats['depths'][i]``
    holds the depth of each token of request i (its recursions, or its layers' depth)."""
    n = self.num_slots
    prompt_len = max(len(r.prompt) for r in requests)
    for r in requests:
      if len(r.prompt) + r.max_new_tokens > self.max_len:
        raise ValueError(f'A request needs {len(r.prompt) + r.max_new_tokens} positions; '
                         f'max_len={self.max_len}.')
    state = self._init_state(n)
    cache = self._engine_cache(self.model.init_cache(n, self.max_len))
    queue, owner = list(range(len(requests)))[::-1], [None] * n
    outputs, depths = [[] for _ in requests], [[] for _ in requests]
    exit_counts = np.zeros(self.num_depths, np.int64)
    steps, start = 0, time.perf_counter()

    def fill(state, cache, slot):
      i = queue.pop()
      prompt = np.zeros((prompt_len,), np.int32)
      prompt[:len(requests[i].prompt)] = requests[i].prompt
      length = len(requests[i].prompt) - 1
      row = self._prefill(self.variables, jnp.asarray(prompt), length)
      owner[slot] = i
      return self._insert(state, cache, row, slot, int(prompt[length]), length)

    while queue or any(o is not None for o in owner):
      if not self.static_batching or all(o is None for o in owner):
        for slot in range(n):
          if owner[slot] is None and queue:
            state, cache = fill(state, cache, slot)
      state, cache, emitted, depth = self._step(self.variables, state, cache)
      steps += 1
      emitted, depth = np.asarray(emitted), np.asarray(depth)
      for slot in np.nonzero(emitted >= 0)[0]:
        i = owner[slot]
        exit_counts[depth[slot]] += 1
        outputs[i].append(int(emitted[slot]))
        depths[i].append(int(depth[slot]))
        if (len(outputs[i]) >= requests[i].max_new_tokens or
            int(emitted[slot]) in self.stop_tokens):
          owner[slot] = None
          state = dict(state, active=state['active'].at[slot].set(False))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    tokens = int(exit_counts.sum())
    return outputs, {'tokens': tokens, 'steps': steps, 'seconds': seconds,
                     'tokens_per_s': tokens / seconds, 'exits_per_depth': exit_counts.tolist(),
                     'early_exit_rate': float(exit_counts[:-1].sum() / max(tokens, 1)),
                     'depths': depths}


class DepthwiseEngine(SlotEngine):
  """Serves a recursive model (see the module docstring); ``stats['exits_per_depth'][d]``
  counts tokens that left after loop d + 1."""

  def __init__(self, cfg: RecursiveConfig, params, num_slots: int, max_len: int,
               exit_threshold=None, stop_tokens=(), static_batching=False):
    if cfg.sharing != 'cycle' or not cfg.ln_share or any(cfg.rank(p) for p in PROJECTIONS):
      raise ValueError('DepthwiseEngine needs sharing="cycle", ln_share=True and no LoRA '
                       f'(got sharing={cfg.sharing!r}, ln_share={cfg.ln_share}, '
                       f'lora_rank={cfg.lora_rank}, lora_ranks={cfg.lora_ranks}).')
    super().__init__(Recursive(cfg), params, num_slots, max_len, stop_tokens, static_batching)
    self.cfg, self.num_depths = cfg, cfg.num_loops
    self.fresh_slot = {'depth': 0}
    step = make_step(cfg, exit_threshold)
    self._step = jax.jit(lambda variables, state, cache: step(variables['params'], state, cache),
                         donate_argnums=(1, 2))

  def _init_state(self, n):
    return {'h': jnp.zeros((n, 1, self.cfg.embed_dim), self.cfg.compute_dtype),
            'token': jnp.zeros((n,), jnp.int32), 'pos': jnp.zeros((n,), jnp.int32),
            'depth': jnp.zeros((n,), jnp.int32), 'active': jnp.zeros((n,), bool)}


class BlockEngine(SlotEngine):
  """Continuous batching for the Block Transformer (``model.block_transformer``): every
  engine step is one cached decode step of all slots, each at its own position (the model
  runs its block decoder only when some slot finishes a block); a finished request's slot is
  refilled at once. Greedy outputs equal ``decode.generate``'s on each request alone."""

  def __init__(self, model, params, num_slots: int, max_len: int, stop_tokens=(),
               static_batching=False):
    super().__init__(model, params, num_slots, max_len, stop_tokens, static_batching)
    self.num_depths, self.fresh_slot = 1, {}

    def step(variables, state, cache):
      logits, aux = model.apply(variables, state['token'][:, None],
                                positions=state['pos'][:, None], cache=cache)
      active = state['active']
      emitted = jnp.where(active, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), -1)
      state = dict(state, token=jnp.where(active, emitted, state['token']),
                   pos=state['pos'] + active)
      return state, aux['cache'], emitted, jnp.zeros_like(emitted)

    self._step = jax.jit(step, donate_argnums=(1, 2))

  def _engine_cache(self, cache):
    return cache  # per-row slots already; every buffer is batch-major

  def _init_state(self, n):
    return {'token': jnp.zeros((n,), jnp.int32), 'pos': jnp.zeros((n,), jnp.int32),
            'active': jnp.zeros((n,), bool)}
