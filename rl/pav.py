"""Process advantage verifiers: progress under a prover (Setlur et al., arXiv:2410.08146).

A step's process reward is its *progress*: the change in the prover mu's probability of
success before and after the step, i.e. mu's advantage (Sec. 3)
  A^mu(s_h, a_h) = Q^mu(s_h, a_h) - Q^mu(s_{h-1}, a_{h-1}),
and RL maximises per step the effective reward (Sec. 3)
  Q^pi(s_h, a_h) + alpha * A^mu(s_h, a_h).
The prover class analysed in Sec. 3 is Best-of-K of a base policy: its success probability
from a state where the base policy succeeds with probability q is 1 - (1 - q)^K.

Pure jnp functions on arrays whose last axis is the step; the same functions serve the toy
(``rl.envs.planted``, exact Q^mu) and a learned verifier's predictions.
"""
import jax.numpy as jnp


def best_of_k_q(q, k):
  """Success probability of Best-of-K from a state where one sample succeeds with
  probability ``q``: ``1 - (1 - q)^k``. ``k`` >= 1 (real k interpolates)."""
  if k < 1:
    raise ValueError(f'k={k} must be >= 1.')
  return 1.0 - jnp.power(1.0 - jnp.asarray(q, jnp.float32), k)


def step_advantages(q_mu):
  """Per-step prover advantages A_h = Q_h - Q_{h-1}.

  Args:
    q_mu: [..., H + 1]: ``q_mu[..., 0]`` is the prover's value of the state before the first
      step (the empty prefix, Q_{-1}); ``q_mu[..., h + 1]`` is Q^mu(s_h, a_h), the prover's
      success probability after step h.

  Returns:
    [..., H]; they telescope: ``sum_h A_h = q_mu[..., -1] - q_mu[..., 0]``.
  """
  q_mu = jnp.asarray(q_mu, jnp.float32)
  if q_mu.ndim < 1 or q_mu.shape[-1] < 2:
    raise ValueError(f'q_mu has shape {q_mu.shape}; expected [..., H + 1] with H >= 1 (the '
                     'value before the first step, then one Q per step).')
  return q_mu[..., 1:] - q_mu[..., :-1]


def effective_rewards(q_pi, a_mu, alpha):
  """Per-step effective reward ``q_pi + alpha * a_mu``, [..., H].

  ``q_pi`` is the policy's own per-step estimate (the paper's Q^pi; in a policy gradient
  typically the Monte Carlo return minus a baseline); [..., H], or [...] (one value per
  sequence, broadcast over the steps). ``a_mu`` [..., H] from ``step_advantages``.
  ``alpha`` >= 0 (0 is outcome-only RL).
  """
  if alpha < 0:
    raise ValueError(f'alpha={alpha} must be >= 0.')
  q_pi = jnp.asarray(q_pi, jnp.float32)
  a_mu = jnp.asarray(a_mu, jnp.float32)
  if q_pi.shape == a_mu.shape[:-1]:
    q_pi = q_pi[..., None]
  elif q_pi.shape != a_mu.shape:
    raise ValueError(f'q_pi has shape {q_pi.shape}; expected a_mu\'s shape {a_mu.shape} or '
                     f'{a_mu.shape[:-1]} (one value per sequence).')
  return q_pi + alpha * a_mu
