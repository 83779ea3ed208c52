"""Token-level losses, in float32."""
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
