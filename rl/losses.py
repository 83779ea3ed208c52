"""Policy-gradient pieces shared by the RL loops (ReST, REINFORCE/RLOO, GRPO-style, PPO).

Pure float32 functions on [B, T] arrays (mask them with ``loss_mask``), then
``reinforce_loss`` and ``ppo_loss`` (with ``gae`` for its advantages): trainer loss functions
(``training.losses`` describes the contract).
ReST's improve step is plain NLL on the policy's tokens: ``training.losses.lm_loss()``
(re-exported here as ``nll_loss``), whose cross-entropy is already masked by ``loss_mask``.

RL batches hold, besides the language-model fields: ``behaviour_logprobs`` [B, T] (the
log-prob of each target token under the distribution it was sampled from), and either
``advantages`` [B, T] (per token; ``sequence_advantages_to_tokens`` broadcasts per-sequence
ones) or ``rewards`` [B] (with a learned value baseline), plus optional ``group_ids`` [B]
(prompt ids) for the group baselines.

KL to a frozen reference (J. Schulman, "Approximating KL divergence", 2020), with
r = log q_ref(x) - log pi(x) on tokens x ~ pi:
  k1 = -r                 unbiased for KL(pi || ref), can be negative;
  k2 = r^2 / 2            biased, low variance;
  k3 = exp(r) - r - 1     unbiased for KL(pi || ref) and >= 0.
Used as a loss (differentiated through log pi at the sampled tokens), their expected
gradients differ: k1's is 0, k2's is grad KL(pi || ref) and k3's is grad KL(ref || pi).
"""
import jax
import jax.numpy as jnp

from model import decode
from rl import value as value_lib
from training import losses as train_losses

nll_loss = train_losses.lm_loss  # ReST's improve step (Gulcehre et al. 2023, Sec. 2).
token_logprobs = decode.token_logprobs  # log softmax(logits)[target], float32: [B, T]

KL_ESTIMATORS = ('k1', 'k2', 'k3')


def entropy(logits):
  """Exact entropy [B, T] of softmax(logits) at each position (finite logits)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def exact_kl(logits, ref_logits):
  """KL(softmax(logits) || softmax(ref_logits)) [B, T], summed over the vocabulary."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kl_estimate(logp, ref_logp, estimator='k3'):
  """Per-token KL(pi || ref) estimate from log-probs of tokens sampled from pi (module doc)."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f'kl_estimator={estimator!r}; expected one of {KL_ESTIMATORS}.')
  r = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  if estimator == 'k1':
    return -r
  if estimator == 'k2':
    return 0.5 * jnp.square(r)
  return jnp.expm1(r) - r


def importance_ratio(logp, behaviour_logprobs):
  """pi(x) / mu(x) = exp(logp - behaviour_logprobs) for tokens x sampled from mu."""
  return jnp.exp(logp.astype(jnp.float32) - behaviour_logprobs.astype(jnp.float32))


def clipped_surrogate(ratio, advantages, eps):
  """PPO's clipped objective (Schulman et al. 2017, Eq. 7), per token, to maximise:
  ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``.

  Returns (objective, clipped): ``clipped`` is 1.0 where the clipped term is the strictly
  smaller one (the token's gradient is zero there); its masked mean is the clip fraction.
  """
  if eps <= 0:
    raise ValueError(f'eps={eps} must be > 0.')
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * advantages
  return jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def _same_group(group_ids):
  return (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)


def group_mean_baseline(rewards, group_ids, leave_one_out=False):
  """Per-prompt mean reward [B] of the samples sharing ``group_ids``.

  ``leave_one_out`` (RLOO, Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline
  is the mean of the *other* samples of its prompt (0 for a prompt with one sample), which
  keeps the baseline independent of the sample it is subtracted from.
  """
  rewards = rewards.astype(jnp.float32)
  same = _same_group(group_ids)
  total, count = same @ rewards, same.sum(-1)
  if not leave_one_out:
    return total / count
  others = count - 1
  return jnp.where(others > 0, (total - rewards) / jnp.maximum(others, 1), 0.0)


def group_advantages(rewards, group_ids, leave_one_out=False, normalize=False, eps=1e-6):
  """``rewards - group_mean_baseline(...)`` [B]; ``normalize`` divides by the prompt's reward
  standard deviation (+ ``eps``), as GRPO (Shao et al. 2024, Sec. 4.1.2); prompts with one
  sample are left unnormalised."""
  rewards = rewards.astype(jnp.float32)
  adv = rewards - group_mean_baseline(rewards, group_ids, leave_one_out)
  if normalize:
    same = _same_group(group_ids)
    count = same.sum(-1)
    mean = same @ rewards / count
    std = jnp.sqrt(same @ jnp.square(rewards) / count - jnp.square(mean)).clip(0.0)
    adv = adv / jnp.where(count > 1, std + eps, 1.0)
  return adv


def sequence_advantages_to_tokens(advantages, loss_mask):
  """Per-sequence advantages [B] -> per-token [B, T], on the policy's tokens only."""
  return advantages.astype(jnp.float32)[:, None] * loss_mask.astype(jnp.float32)


def _require(batch, name, shape, caller='reinforce_loss'):
  if name not in batch:
    raise ValueError(f'{caller}: the batch has no {name!r} field (fields: {sorted(batch)}).')
  if tuple(batch[name].shape) != tuple(shape):
    raise ValueError(f'{caller}: batch[{name!r}] has shape {tuple(batch[name].shape)}; '
                     f'expected {tuple(shape)}.')
  return batch[name].astype(jnp.float32)


def reinforce_loss(kl_coeff=0.0, kl_estimator='k3', entropy_coeff=0.0,
                   importance_weighting=True, clip_ratio=None, reference_model=None,
                   baseline=None, value_coeff=0.5):
  """REINFORCE (Williams 1992) as a trainer loss function, with an optional KL penalty to a
  frozen reference, an entropy bonus and a learned value baseline.

  Per policy token t (``loss_mask``), with A_t the advantage and w_t =
  stop_gradient(min(pi/mu, clip_ratio)) (truncated importance weight; 1 when
  ``importance_weighting`` is off):
    loss = sum_t [-w_t A_t log pi_t + kl_coeff w_t k_t - entropy_coeff H_t] / n_tokens
  (+ ``value_coeff`` x the value loss). k_t is ``kl_estimator`` on the sampled token against
  the reference: the step argument ``ctx.args['reference']`` (params, or a variables dict
  with other collections) applied with ``reference_model`` (default: the policy's model, or
  its ``base`` for a ``WithValueHead``) on the same batch, without gradient.

  ``baseline=None``: A_t is ``batch['advantages']`` [B, T]. ``baseline='value'``: the model
  is a ``rl.value.WithValueHead``; A_t = G_t - stop_gradient(V_t) with G_t the per-token
  return ``batch['returns']`` [B, T] when the batch has it (dense rewards, e.g.
  ``rl.pav.step_token_returns``), else R = ``batch['rewards']`` [B] (the sequence's terminal
  reward, undiscounted) at every token, and V_t the value at token t's position, trained per
  token with ``value_coeff`` x 1/2 (V_t - G_t)^2.

  The model's own auxiliary losses (``aux['losses']``) are added as in ``lm_loss``.
  Metrics: ``pg_loss``, ``kl``, ``entropy``, ``ratio`` (token means of pi/mu),
  ``clip_frac`` (with ``clip_ratio``: tokens whose weight was truncated), ``reward`` (batch
  mean, when ``rewards`` is present), ``value_loss``, ``aux/<name>``.
  """
  _check_coefficients(kl_estimator, kl_coeff, entropy_coeff, value_coeff)
  if baseline not in (None, 'value'):
    raise ValueError(f"baseline={baseline!r}; expected None or 'value'.")
  if clip_ratio is not None and clip_ratio <= 0:
    raise ValueError(f'clip_ratio={clip_ratio} must be > 0 (or None).')

  def loss_fn(model, variables, batch, ctx):
    b, t = batch['targets'].shape
    mask = batch['loss_mask'].astype(jnp.float32)
    logits, aux, model_state = train_losses.apply_model(model, variables, batch, ctx)
    logp = token_logprobs(logits, batch['targets'])
    token_sum = lambda x: jnp.sum(x * mask) / ctx.n_tokens
    metrics = {}

    if importance_weighting:
      ratio = importance_ratio(logp, _require(batch, 'behaviour_logprobs', (b, t)))
      metrics['ratio'] = token_sum(ratio)
      w = ratio if clip_ratio is None else jnp.minimum(ratio, clip_ratio)
      if clip_ratio is not None:
        metrics['clip_frac'] = token_sum((ratio > clip_ratio).astype(jnp.float32))
      w = jax.lax.stop_gradient(w)
    else:
      w = jnp.ones_like(logp)

    loss = 0.0
    if baseline == 'value':
      if 'values' not in aux:
        raise ValueError("reinforce_loss(baseline='value') needs a model whose aux holds "
                         "'values' (rl.value.WithValueHead).")
      returns = (_require(batch, 'returns', (b, t)) if 'returns' in batch
                 else _require(batch, 'rewards', (b,))[:, None])
      values = aux['values'].astype(jnp.float32)
      advantages = returns - jax.lax.stop_gradient(values)
      metrics['value_loss'] = token_sum(0.5 * jnp.square(values - returns))
      loss += value_coeff * metrics['value_loss']
    else:
      advantages = _require(batch, 'advantages', (b, t))
    if 'rewards' in batch:
      metrics['reward'] = jnp.mean(batch['rewards'].astype(jnp.float32)) / ctx.accum

    metrics['pg_loss'] = token_sum(-w * advantages * logp)
    loss += metrics['pg_loss']
    loss += _regularisers(model, batch, ctx, logits, logp, w, aux, metrics, token_sum,
                          kl_coeff, kl_estimator, entropy_coeff, reference_model, 'reinforce_loss')
    return loss, metrics, model_state
  return loss_fn


def _check_coefficients(kl_estimator, kl_coeff, entropy_coeff, value_coeff):
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f'kl_estimator={kl_estimator!r}; expected one of {KL_ESTIMATORS}.')
  if kl_coeff < 0 or entropy_coeff < 0 or value_coeff < 0:
    raise ValueError(f'kl_coeff={kl_coeff}, entropy_coeff={entropy_coeff} and '
                     f'value_coeff={value_coeff} must be >= 0.')


def _regularisers(model, batch, ctx, logits, logp, w, aux, metrics, token_sum, kl_coeff,
                  kl_estimator, entropy_coeff, reference_model, caller):
  """The terms every policy-gradient loss adds: ``kl_coeff`` x the KL estimate to the frozen
  reference (step argument ``ctx.args['reference']``, weighted by ``w``), minus
  ``entropy_coeff`` x the entropy, plus the model's own auxiliary losses; fills ``metrics``."""
  loss = 0.0
  if kl_coeff:
    if not ctx.args or 'reference' not in ctx.args:
      raise ValueError(f"{caller}(kl_coeff > 0) needs the step argument "
                       "args={'reference': params}.")
    ref = ctx.args['reference']
    ref_vars = ref if 'params' in ref else {'params': ref}
    ref_model = reference_model or (
        model.base if isinstance(model, value_lib.WithValueHead) else model)
    ref_logits, _, _ = train_losses.apply_model(ref_model, ref_vars, batch, ctx)
    ref_logp = token_logprobs(jax.lax.stop_gradient(ref_logits), batch['targets'])
    metrics['kl'] = token_sum(w * kl_estimate(logp, ref_logp, kl_estimator))
    loss += kl_coeff * metrics['kl']
  metrics['entropy'] = token_sum(entropy(logits))
  loss -= entropy_coeff * metrics['entropy']
  aux_losses = aux.get('losses', {})
  metrics.update({f'aux/{k}': v / ctx.accum for k, v in aux_losses.items()})
  return loss + sum(aux_losses.values(), 0.0) / ctx.accum


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
  """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) along each row's policy
  tokens: ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``, where
  "next" is the row's next policy token (``mask``): tokens outside the mask (another role's
  turn between two of the policy's) are skipped, and the value after a row's last policy
  token is 0 (the episode ends). Inputs [B, T]; returns (advantages, returns = A + V), both
  0 outside the mask."""
  if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
    raise ValueError(f'gamma={gamma} and lam={lam} must be in [0, 1].')
  rewards, values = (jnp.asarray(x, jnp.float32) for x in (rewards, values))
  mask = jnp.asarray(mask).astype(bool)

  def step(carry, x):
    next_value, next_adv = carry
    r, v, m = x
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    return (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv)), jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T
  return adv, jnp.where(mask, adv + values, 0.0)


def ppo_terms(logp, behaviour_logprobs, advantages, values, returns, clip_eps,
              old_values=None, value_clip=None):
  """Per-token PPO terms (Schulman et al. 2017, Eqs. 7 and 9): ``pg`` = -min(rho A,
  clip(rho, 1 +- clip_eps) A) with rho = pi / pi_old; ``value`` = 1/2 (V - R)^2, or with
  ``value_clip`` the larger of that and 1/2 (V_old + clip(V - V_old, +-value_clip) - R)^2;
  ``clipped`` (1 where the clipped policy term is active) and ``ratio``."""
  ratio = importance_ratio(logp, behaviour_logprobs)
  surrogate, clipped = clipped_surrogate(ratio, advantages, clip_eps)
  values, returns = values.astype(jnp.float32), returns.astype(jnp.float32)
  value = 0.5 * jnp.square(values - returns)
  if value_clip is not None:
    if value_clip <= 0:
      raise ValueError(f'value_clip={value_clip} must be > 0 (or None).')
    limited = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    value = jnp.maximum(value, 0.5 * jnp.square(limited - returns))
  return {'pg': -surrogate, 'value': value, 'clipped': clipped, 'ratio': ratio}


def ppo_loss(clip_eps=0.2, value_coeff=0.5, value_clip=None, kl_coeff=0.0, kl_estimator='k3',
             entropy_coeff=0.0, reference_model=None):
  """PPO as a trainer loss function for a ``rl.value.WithValueHead`` policy (the critic is
  the value head): sum over policy tokens of ``ppo_terms``' pg + ``value_coeff`` x value,
  plus the KL to a frozen reference and the entropy bonus as ``reinforce_loss``, over
  ``ctx.n_tokens``. The batch holds ``behaviour_logprobs``, ``advantages`` and ``returns``
  [B, T] (from ``gae`` on the rollout's rewards and values), and ``old_values`` [B, T] with
  ``value_clip``. Metrics: ``pg_loss``, ``value_loss``, ``clip_frac``, ``ratio``, ``kl``,
  ``entropy``, ``aux/<name>``."""
  if clip_eps <= 0:
    raise ValueError(f'clip_eps={clip_eps} must be > 0.')
  _check_coefficients(kl_estimator, kl_coeff, entropy_coeff, value_coeff)

  def loss_fn(model, variables, batch, ctx):
    b, t = batch['targets'].shape
    mask = batch['loss_mask'].astype(jnp.float32)
    logits, aux, model_state = train_losses.apply_model(model, variables, batch, ctx)
    if 'values' not in aux:
      raise ValueError("ppo_loss needs a model whose aux holds 'values' "
                       '(rl.value.WithValueHead).')
    logp = token_logprobs(logits, batch['targets'])
    fields = {name: _require(batch, name, (b, t), 'ppo_loss') for name in
              ('behaviour_logprobs', 'advantages', 'returns') +
              (('old_values',) if value_clip is not None else ())}
    terms = ppo_terms(logp, fields['behaviour_logprobs'], fields['advantages'], aux['values'],
                      fields['returns'], clip_eps, fields.get('old_values'), value_clip)
    token_sum = lambda x: jnp.sum(x * mask) / ctx.n_tokens
    metrics = {'pg_loss': token_sum(terms['pg']), 'value_loss': token_sum(terms['value']),
               'clip_frac': token_sum(terms['clipped']), 'ratio': token_sum(terms['ratio'])}
    loss = metrics['pg_loss'] + value_coeff * metrics['value_loss']
    loss += _regularisers(model, batch, ctx, logits, logp, jnp.ones_like(logp), aux, metrics,
                          token_sum, kl_coeff, kl_estimator, entropy_coeff, reference_model,
                          'ppo_loss')
    return loss, metrics, model_state
  return loss_fn
