"""One sampler for every model family: batched prefill, then a jit-compiled decode loop.

``generate`` prefills a batch of right-padded prompts in one call (padding has segment id
0, so it is invisible), then a ``lax.while_loop`` feeds one token per row per step: first
each row's last prompt token, then its previous sample, at position ``prompt_length - 1 +
step``. A row stops at a stop token; the loop exits as soon as every row has stopped.
``sample_logits`` and ``filter_logits`` are the pure sampling functions it uses (greedy,
temperature, top-k, top-p). For RL, every generated token comes with two exact log-probs:
under the distribution it was drawn from (``sample_logprobs``) and under the unmodified
policy (``policy_logprobs``); see ``GenerateOutput``.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token. ``top_k=0`` and ``top_p=1`` disable those filters."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f'sampling.temperature={self.temperature} must be > 0 '
                       '(use greedy=True for argmax decoding).')
    if self.top_k < 0:
      raise ValueError(f'sampling.top_k={self.top_k} must be >= 0 (0 disables it).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'sampling.top_p={self.top_p} must be in (0, 1] (1 disables it).')

  @classmethod
  def from_config(cls, cfg) -> 'SamplingConfig':
    """From a config section with any of ``temperature, top_k, top_p, greedy``."""
    defaults = cls()
    return cls(**{f: cfg.get(f, getattr(defaults, f))
                  for f in ('temperature', 'top_k', 'top_p', 'greedy')})


class GenerateOutput(NamedTuple):
  """What ``generate`` returns; all [B, N] fields are 0 at padding.

  ``tokens`` [B, N]: generated tokens, ``pad_id`` after a row stops.
  ``sample_logprobs`` [B, N] float32: log-prob of each token under the distribution it was
    drawn from (the softmax of ``filter_logits``: temperature, top-k and top-p applied);
    0 (= log 1) for greedy decoding, whose choice is deterministic.
  ``policy_logprobs`` [B, N] float32: log-prob of each token under the unmodified policy
    (the model's log-softmax: temperature 1, no filtering).
  ``lengths`` [B]: tokens generated per row, including the stop token.
  """
  tokens: jax.Array
  sample_logprobs: jax.Array
  policy_logprobs: jax.Array
  lengths: jax.Array


def filter_logits(logits, sampling: SamplingConfig):
  """Logits [..., V] scaled by 1/temperature, with tokens outside top-k / top-p set to -inf.

  Top-k keeps exactly k tokens (ties broken by index); top-p then keeps the smallest set
  of most likely tokens whose probability mass (after top-k) is >= top_p.
  """
  logits = logits.astype(jnp.float32) / sampling.temperature
  vocab = logits.shape[-1]
  use_k = 0 < sampling.top_k < vocab
  if not use_k and sampling.top_p >= 1:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  keep = jnp.broadcast_to(jnp.arange(vocab) < (sampling.top_k if use_k else vocab),
                          sorted_logits.shape)
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  if sampling.top_p < 1:
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < sampling.top_p)
  keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def token_logprobs(logits, tokens):
  """log softmax(logits)[token] in float32, for logits [..., V] and tokens [...]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def sample_with_logprobs(logits, rng, sampling: SamplingConfig):
  """Samples token ids [...] from logits [..., V] -> (tokens, sample_logprobs,
  policy_logprobs), as ``GenerateOutput`` defines them.

  Greedy: argmax, sample log-prob 0. Otherwise ``jax.random.categorical`` draws from
  softmax(``filter_logits``) and the sample log-prob is that distribution's log-softmax.
  """
  if sampling.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_logprobs = jnp.zeros(tokens.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, sampling)
    tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    sample_logprobs = token_logprobs(filtered, tokens)
  return tokens, sample_logprobs, token_logprobs(logits, tokens)


def sample_logits(logits, rng, sampling: SamplingConfig):
  """Samples token ids [...] from logits [..., V]: argmax if greedy, else filtered softmax."""
  return sample_with_logprobs(logits, rng, sampling)[0]


def pick_next(logits, rng, sampling, done, stop_tokens, pad_id):
  """One step for every row -> (tokens, sample_logprobs, policy_logprobs, done after it);
  done rows get pad_id and log-probs 0."""
  tokens, sample_lp, policy_lp = sample_with_logprobs(logits, rng, sampling)
  tokens = jnp.where(done, pad_id, tokens)
  sample_lp, policy_lp = (jnp.where(done, 0.0, lp) for lp in (sample_lp, policy_lp))
  stopped = done | jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else done
  return tokens, sample_lp, policy_lp, stopped


def _generate(model, params, prompts, prompt_lengths, rng, max_new_tokens, sampling,
              stop_tokens, pad_id, max_len):
  batch, prompt_len = prompts.shape
  # A full variables dict (params plus e.g. MoR's 'router_state') or the bare param tree.
  variables = params if 'params' in params else {'params': params}
  apply = lambda tokens, positions, segment_ids, cache: model.apply(
      variables, tokens, positions=positions, segment_ids=segment_ids, cache=cache)
  # Prefill every real prompt token but the last, which the first loop step feeds: the
  # prefill's [B, P, V] logits are then unused and compiled away.
  steps = jnp.arange(prompt_len)
  segment_ids = (steps[None] < prompt_lengths[:, None] - 1).astype(jnp.int32)
  _, aux = apply(prompts, jnp.broadcast_to(steps, prompts.shape), segment_ids,
                 model.init_cache(batch, max_len))
  last = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]

  def cond(state):
    step, *_, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, prev, outputs, lengths, done = state
    logits, aux = apply(prev[:, None], (prompt_lengths - 1 + step)[:, None], None, cache)
    *picked, new_done = pick_next(logits[:, 0], jax.random.fold_in(rng, step), sampling, done,
                              stop_tokens, pad_id)
    outputs = tuple(out.at[:, step].set(new) for out, new in zip(outputs, picked))
    return step + 1, aux['cache'], picked[0], outputs, lengths + ~done, new_done

  zeros = jnp.zeros((batch, max_new_tokens), jnp.float32)
  outputs = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32), zeros, zeros)
  state = (jnp.int32(0), aux['cache'], last, outputs, jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch,), bool))
  _, _, _, outputs, lengths, _ = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(*outputs, lengths)


_generate_jit = jax.jit(_generate, static_argnames=(
    'model', 'max_new_tokens', 'sampling', 'stop_tokens', 'pad_id', 'max_len'))


def generate(model, params, prompts, max_new_tokens: int, sampling: SamplingConfig, rng,
             stop_tokens=(), pad_id: int = 0, prompt_lengths=None, max_len=None) -> GenerateOutput:
  """Samples up to ``max_new_tokens`` tokens after each prompt.

  Args:
    model: a family module with ``init_cache(batch, max_len)`` and the cache-aware
      ``apply({'params': params}, tokens, positions, segment_ids, cache)``.
    params: the model's parameter tree (the inside of ``{'params': ...}``), or a full
      variables dict ``{'params': ..., <other collections>}`` for families that keep
      non-parameter state (MoR's loss-free router bias).
    prompts: int [B, P] right-padded prompts.
    max_new_tokens: static number of decode steps N.
    sampling: a SamplingConfig (static).
    rng: a PRNG key; step i uses ``fold_in(rng, i)``.
    stop_tokens: token ids that end a row (the stop token is kept, then ``pad_id``).
    pad_id: the id written after a row stops.
    prompt_lengths: int [B] real tokens per prompt (each >= 1); default: all P.
    max_len: KV-cache slots per row; default P + N. Must be >= P + N.

  Returns:
    GenerateOutput(tokens, sample_logprobs, policy_logprobs [B, N], lengths [B]); see
    GenerateOutput.
  The whole call is jit-compiled (static N, sampling, stop_tokens, pad_id, max_len) and
  may itself be traced inside a caller's ``jax.jit``.
  """
  batch, prompt_len = prompts.shape
  max_len = prompt_len + max_new_tokens if max_len is None else max_len
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if prompt_len + max_new_tokens > max_len:
    raise ValueError(f'prompt length {prompt_len} + max_new_tokens {max_new_tokens} = '
                     f'{prompt_len + max_new_tokens} exceeds the KV-cache size max_len={max_len}.')
  if prompt_lengths is None:
    prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32)
  return _generate_jit(model, params, jnp.asarray(prompts, jnp.int32),
                       jnp.asarray(prompt_lengths, jnp.int32), rng, max_new_tokens=max_new_tokens,
                       sampling=sampling, stop_tokens=tuple(int(t) for t in stop_tokens),
                       pad_id=int(pad_id), max_len=int(max_len))
