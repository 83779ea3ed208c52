"""Token-level losses in float32, and the loss functions the trainer core takes.

A loss function is ``loss_fn(model, variables, batch, ctx) -> (loss, metrics, model_state)``:
``variables`` are ``{'params': ..., **model_state}``, ``batch`` one micro-batch, ``ctx`` a
``trainer.StepContext`` (rng, step, the whole batch's target-token count ``n_tokens``,
``accum`` micro-batches, and ``args``: the step's extra arguments, e.g. teacher or
reference parameters). It returns this micro-batch's *contribution* to the batch loss and
to each metric (sums over tokens divided by ``ctx.n_tokens``, per-micro-batch means
divided by ``ctx.accum``), so contributions add up over micro-batches to the full-batch
value, plus the model's updated non-parameter collections.
"""
import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, mask, z_loss=0.0):
  """Sums over masked tokens of CE and (optionally) the z-loss term ``log(Z)^2``.

  Returns (ce_sum, z_sum, token_count); divide by a token count to average. The z-loss
  (PaLM) keeps the softmax normaliser near 1: ``z_loss * mean(logsumexp(logits)^2)``.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce_sum = jnp.sum((log_z - target_logit) * mask)
  z_sum = z_loss * jnp.sum(jnp.square(log_z) * mask)
  return ce_sum, z_sum, jnp.sum(mask)


def scored(model, batch):
  """``batch`` with ``loss_mask`` limited to the targets the model predicts: a family with a
  ``target_mask(positions)`` method (the Block Transformer without a first-block context)
  leaves some targets unpredicted, and they must not count as tokens of the loss."""
  if not hasattr(model, 'target_mask'):
    return batch
  mask = batch['loss_mask']
  return dict(batch, loss_mask=mask * model.target_mask(batch['positions']).astype(mask.dtype))


def apply_model(model, variables, batch, ctx):
  """Training-mode forward pass -> (logits, aux, updated non-parameter collections)."""
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  out = model.apply(variables, batch['tokens'], positions=batch['positions'],
                    segment_ids=batch['segment_ids'], train=True, targets=batch['targets'],
                    loss_mask=batch['loss_mask'], step=ctx.step, rngs={'dropout': ctx.rng},
                    mutable=list(model_state) if model_state else False)
  (logits, aux), model_state = out if model_state else (out, model_state)
  return logits, aux, model_state


def lm_loss(z_loss=0.0, extra=None):
  """Next-token cross-entropy (+ z-loss) plus the model's auxiliary losses.

  ``extra(batch, logits, ctx) -> {name: scaled per-micro-batch mean}`` adds more terms
  (e.g. ``distillation``). Metrics: ``loss`` (the CE), ``z_loss`` and ``aux/<name>``.
  """
  def loss_fn(model, variables, batch, ctx):
    logits, aux, model_state = apply_model(model, variables, batch, ctx)
    ce, z, _ = cross_entropy_sums(logits, batch['targets'], batch['loss_mask'], z_loss)
    aux_losses = {**aux.get('losses', {}), **(extra(batch, logits, ctx) if extra else {})}
    metrics = {'loss': ce / ctx.n_tokens, 'z_loss': z / ctx.n_tokens,
               **{f'aux/{k}': v / ctx.accum for k, v in aux_losses.items()}}
    loss = (ce + z) / ctx.n_tokens + sum(aux_losses.values(), 0.0) / ctx.accum
    return loss, metrics, model_state
  return loss_fn


def distillation(teacher, coeff, arg='teacher'):
  """``extra`` term: ``coeff`` x mean over target tokens of KL(p_teacher || p_model).

  The teacher's parameters are the step argument ``ctx.args[arg]`` (sharded like the
  policy, not constants compiled into the step).
  """
  def extra(batch, logits, ctx):
    t_logits, _ = teacher.apply({'params': ctx.args[arg]}, batch['tokens'],
                                positions=batch['positions'], segment_ids=batch['segment_ids'])
    t = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits).astype(jnp.float32))
    kl = jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(logits.astype(jnp.float32))), axis=-1)
    mask = batch['loss_mask'].astype(jnp.float32)
    return {'kd': coeff * jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)}
  return extra
