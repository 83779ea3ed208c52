"""Preference-learning losses: Bradley–Terry reward models, DPO and IPO, and the pessimistic
objectives of PRPO and P3O (Pessimistic RLHF, arXiv:2503.06810; PAPERS.md §7).

Everything is a pure float32 function of per-example scores or sequence log-probabilities
(sums over a response's tokens), so it composes with any model family and with the trainer's
loss-function contract (``training/losses.py``). Preference data: ``load_preferences``.

* Bradley–Terry: ``P(y_w ≻ y_l) = σ(r(y_w) − r(y_l))``; ``bt_nll`` is its mean negative
  log-likelihood on the labelled pairs (a reward model's loss).
* DPO (Rafailov et al. 2023): ``−log σ(β h)`` with the implicit reward margin
  ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``.
  IPO (Azar et al. 2023): ``(h − 1/(2β))²``.
* PRPO [reconstructed: the paper's exact losses were not available; PAPERS.md §7]: the
  adversarial reward model minimises
  ``E_{y~π}[r(y)] − E_{y~μ}[r(y)] + (1/η) L_BT(r; D)`` (``prpo_reward_loss``): it fits the
  data (the BT term) while scoring the policy's own samples as low as the data allows, and the
  policy maximises that pessimistic reward (a policy-gradient loss with ``r`` as reward).
  With ``log_partition=True`` the policy term is taken at the closed-form KL-regularised
  policy ``π_r ∝ π_ref exp(r/β)``: ``β log E_{y~π_ref} exp(r(y)/β)``, approximated by a
  log-mean-exp over K reference samples per prompt.
* P3O [reconstructed, as above]: the same game with a pairwise preference model
  ``P(y ≻ y′)`` (``p3o_preference_loss``): the model minimises
  ``E_{y~π, y′~μ}[P(y ≻ y′)] + (1/η) NLL(P; D)``; the policy maximises
  ``E_{y′~μ} P(y ≻ y′)`` for its samples y. The preference model is any logit of ``P(y ≻ y′)``;
  ``rl/repro_pessimism.py`` builds an antisymmetric pairwise one (``g(y, y′) − g(y′, y)``).
"""
import json

import jax
import jax.numpy as jnp


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _check_positive(name, value):
  if not value > 0:
    raise ValueError(f'{name}={value} must be > 0.')


def bt_nll(score_chosen, score_rejected):
  """Mean Bradley–Terry NLL ``−log σ(s_w − s_l)`` over pairs [N] (a reward model's loss)."""
  score_chosen, score_rejected = _f32(score_chosen, score_rejected)
  return -jnp.mean(jax.nn.log_sigmoid(score_chosen - score_rejected))


def implicit_margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected):
  """DPO's ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`` [N]."""
  logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected = _f32(
      logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected)
  return (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)


def dpo_loss(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta):
  """DPO: mean ``−log σ(β h)`` over pairs, from sequence log-probs [N] of the policy and
  of the frozen reference."""
  _check_positive('beta', beta)
  h = implicit_margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected)
  return -jnp.mean(jax.nn.log_sigmoid(beta * h))


def ipo_loss(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta):
  """IPO: mean ``(h − 1/(2β))²`` over pairs (regresses the margin to a finite target
  instead of pushing it to infinity)."""
  _check_positive('beta', beta)
  h = implicit_margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected)
  return jnp.mean(jnp.square(h - 1.0 / (2.0 * beta)))


def log_partition(ref_scores, beta):
  """``β log mean_k exp(r_k / β)`` over the last axis: K reference samples' rewards
  [..., K] -> the closed-form policy's value ``β log E_{y~π_ref} exp(r(y)/β)`` [...]."""
  _check_positive('beta', beta)
  (ref_scores,) = _f32(ref_scores)
  k = ref_scores.shape[-1]
  if k < 1:
    raise ValueError(f'K={k} reference samples per prompt; need K >= 1.')
  return beta * (jax.nn.logsumexp(ref_scores / beta, axis=-1) - jnp.log(k))


def prpo_reward_loss(policy_scores, data_scores, score_chosen, score_rejected, eta,
                     log_partition_beta=None):
  """The adversarial reward model's objective (minimised):
  ``E_{y~π}[r] − E_{y~μ}[r] + (1/η) L_BT(r; D)``.

  Args:
    policy_scores: r on the policy's samples, [N]; or, with ``log_partition_beta``, r on K
      reference samples per prompt [P, K] (the closed-form policy's term).
    data_scores: r on samples of the data policy μ (the dataset's responses) [M].
    score_chosen, score_rejected: r on the labelled pairs of D [N_D].
    eta: > 0; small η weighs the data fit more (less pessimism).
    log_partition_beta: None, or β > 0 for the log-partition form of the policy term.
  """
  _check_positive('eta', eta)
  (policy_scores, data_scores) = _f32(policy_scores, data_scores)
  if log_partition_beta is None:
    policy_term = jnp.mean(policy_scores)
  else:
    policy_term = jnp.mean(log_partition(policy_scores, log_partition_beta))
  return policy_term - jnp.mean(data_scores) + bt_nll(score_chosen, score_rejected) / eta


def p3o_preference_loss(prob_policy_over_data, logit_chosen_over_rejected, eta):
  """The adversarial preference model's objective (minimised):
  ``E_{y~π, y′~μ}[P(y ≻ y′)] + (1/η) NLL(P; D)``.

  Args:
    prob_policy_over_data: P(y ≻ y′) [N] for policy samples y against data samples y′.
    logit_chosen_over_rejected: the model's logit of P(y_w ≻ y_l) on the labelled pairs
      [N_D] (its NLL is ``−log σ(logit)``).
    eta: > 0.
  """
  _check_positive('eta', eta)
  prob_policy_over_data, logit_chosen_over_rejected = _f32(prob_policy_over_data,
                                                           logit_chosen_over_rejected)
  return (jnp.mean(prob_policy_over_data) +
          bt_nll(logit_chosen_over_rejected, jnp.zeros_like(logit_chosen_over_rejected)) / eta)


def load_preferences(path):
  """Preference pairs from a JSONL file, one ``{"prompt", "chosen", "rejected"}`` object per
  line -> list of (prompt, chosen, rejected) strings. A malformed line, a missing or
  non-string field, or a pair whose two responses are identical is a ValueError naming
  ``path:line``; an empty file is an error too."""
  pairs = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not a JSON object ({e.msg}).') from e
      if not isinstance(row, dict):
        raise ValueError(f'{where}: expected a JSON object, got {type(row).__name__}.')
      fields = []
      for name in ('prompt', 'chosen', 'rejected'):
        if not isinstance(row.get(name), str):
          raise ValueError(f'{where}: field {name!r} must be a string, got {row.get(name)!r}.')
        fields.append(row[name])
      if fields[1] == fields[2]:
        raise ValueError(f'{where}: chosen and rejected are identical; the pair says nothing.')
      pairs.append(tuple(fields))
  if not pairs:
    raise ValueError(f'{path}: no preference pairs.')
  return pairs
