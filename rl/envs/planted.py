"""The planted-subsequence toy of "Rewarding progress" (arXiv:2410.08146, App. B), exactly.

A response is ``length`` tokens over ``vocab_size`` tokens; its reward is 1 if the planted
sequence y* (``target``) occurs in it as a contiguous substring, else 0. Whether it has
occurred so far is tracked by the string-matching automaton of y* (Knuth-Morris-Pratt):
state j < m = |y*| is the length of the longest prefix of y* that is a suffix of the
response so far; state m means y* has occurred and is absorbing. The state after h tokens
is a sufficient statistic for the future reward, so every policy here acts on
(position h, state j), and values are exact dynamic programmes over the [length + 1, m + 1]
grid instead of the V^length responses:
  V(h, j) = sum_a p(a | h, j) V(h + 1, delta(j, a)),   V(length, j) = 1[j = m],
  Q(h, j, a) = V(h + 1, delta(j, a)).
With length >= m the optimum is 1 (emit y* at once).

Prover mu_gamma (our reading of "weight gamma on the next token of y*"): in state j < m
the next token of y*, y*[j], has probability gamma / (gamma + V - 1) and every other token
1 / (gamma + V - 1); in state m it is uniform. gamma = 1 is the uniform policy; gamma -> inf
emits y* deterministically after any prefix.

Pure numpy/jnp: tables are numpy, values are jnp (float32) so they run under jit.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PlantedTask:
  """Responses of ``length`` tokens in [0, vocab_size); reward 1 iff ``target`` occurs."""
  vocab_size: int
  length: int
  target: tuple

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f'vocab_size={self.vocab_size} must be >= 2.')
    if not self.target:
      raise ValueError('target must hold at least one token.')
    if any(not 0 <= t < self.vocab_size for t in self.target):
      raise ValueError(f'target={self.target} has tokens outside [0, {self.vocab_size}).')
    if self.length < 1:
      raise ValueError(f'length={self.length} must be >= 1.')

  @property
  def n_states(self) -> int:
    return len(self.target) + 1

  @property
  def transitions(self) -> np.ndarray:
    """delta [m + 1, V] (int32): the automaton state after emitting a in state j."""
    y, m = list(self.target), len(self.target)
    delta = np.full((m + 1, self.vocab_size), m, np.int32)
    for j in range(m):
      for a in range(self.vocab_size):
        seen = y[:j] + [a]
        delta[j, a] = next(k for k in range(min(j + 1, m), -1, -1)
                           if k == 0 or seen[-k:] == y[:k])
    return delta


def make_task(vocab_size, length, target_len, seed) -> PlantedTask:
  """A task whose target is ``target_len`` distinct tokens drawn with ``seed``."""
  if not 1 <= target_len <= vocab_size:
    raise ValueError(f'target_len={target_len} must be in [1, vocab_size={vocab_size}].')
  rng = np.random.default_rng(seed)
  target = rng.choice(vocab_size, size=target_len, replace=False)
  return PlantedTask(vocab_size, length, tuple(int(t) for t in target))


def prover_probs(task: PlantedTask, gamma) -> np.ndarray:
  """mu_gamma's next-token distribution [m + 1, V] per automaton state (module doc)."""
  if gamma <= 0:
    raise ValueError(f'gamma={gamma} must be > 0.')
  m, v = len(task.target), task.vocab_size
  weights = np.ones((m + 1, v))
  weights[np.arange(m), list(task.target)] = gamma
  return weights / weights.sum(-1, keepdims=True)


def uniform_probs(task: PlantedTask) -> np.ndarray:
  """The uniform policy [m + 1, V] (mu_1)."""
  return np.full((task.n_states, task.vocab_size), 1.0 / task.vocab_size)


def _per_step(task, probs):
  probs = jnp.asarray(probs, jnp.float32)
  shape = (task.n_states, task.vocab_size)
  if probs.shape == shape:
    probs = jnp.broadcast_to(probs, (task.length,) + shape)
  if probs.shape != (task.length,) + shape:
    raise ValueError(f'probs has shape {probs.shape}; expected {shape} (the same at every '
                     f'step) or {(task.length,) + shape}.')
  return probs


def values(task: PlantedTask, probs) -> jax.Array:
  """V [length + 1, m + 1]: success probability from (h tokens emitted, state j) when the
  tokens follow ``probs`` ([length, m + 1, V] per step, or [m + 1, V] at every step)."""
  probs = _per_step(task, probs)
  delta = jnp.asarray(task.transitions)
  v = (jnp.arange(task.n_states) == task.n_states - 1).astype(jnp.float32)
  out = [v]
  for h in reversed(range(task.length)):
    v = jnp.sum(probs[h] * v[delta], axis=-1)
    out.append(v)
  return jnp.stack(out[::-1])


def q_values(task: PlantedTask, probs) -> jax.Array:
  """Q [length, m + 1, V]: success probability after emitting a at (h, j), then ``probs``."""
  v = values(task, probs)
  return v[1:][:, jnp.asarray(task.transitions)]


def success_probability(task: PlantedTask, probs) -> jax.Array:
  """Exact probability that a response sampled from ``probs`` contains the target."""
  return values(task, probs)[0, 0]


def optimal_values(task: PlantedTask) -> jax.Array:
  """V* [length + 1, m + 1] of the best policy (max over tokens instead of the average)."""
  delta = jnp.asarray(task.transitions)
  v = (jnp.arange(task.n_states) == task.n_states - 1).astype(jnp.float32)
  out = [v]
  for _ in range(task.length):
    v = jnp.max(v[delta], axis=-1)
    out.append(v)
  return jnp.stack(out[::-1])


def states(task: PlantedTask, tokens) -> jax.Array:
  """Automaton states [..., length + 1] along responses ``tokens`` [..., length]."""
  delta = jnp.asarray(task.transitions)
  tokens = jnp.asarray(tokens)
  s = jnp.zeros(tokens.shape[:-1], jnp.int32)
  out = [s]
  for h in range(tokens.shape[-1]):
    s = delta[s, tokens[..., h]]
    out.append(s)
  return jnp.stack(out, axis=-1)


def trajectory_values(value_table, state_path) -> jax.Array:
  """[..., length + 1]: ``value_table[h, state_path[..., h]]``: entry 0 is the value of the
  empty prefix, entry h + 1 is Q(s_h, a_h) (the value after step h), as
  ``rl.pav.step_advantages`` takes them."""
  h = jnp.arange(state_path.shape[-1])
  return value_table[h, state_path]


def outcome(task: PlantedTask, state_path) -> jax.Array:
  """Reward [...]: 1.0 where the response's final state is m (the target occurred)."""
  return (state_path[..., -1] == task.n_states - 1).astype(jnp.float32)
