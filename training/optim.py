"""AdamW with warmup-stable-decay or cosine schedules and global-norm clipping (optax)."""
import re

import jax
import jax.numpy as jnp
import optax


def make_schedule(train):
  """Learning-rate schedule from ``config.train``.

  ``wsd``: linear warmup, constant, then linear decay over the last ``decay_fraction`` of
  ``steps`` to ``min_lr_ratio * lr`` (as in the MoR recipe); ``cosine``: warmup then cosine
  to ``min_lr_ratio * lr``; ``constant``: warmup then constant.
  """
  lr, steps, warmup = train.learning_rate, train.steps, train.warmup_steps
  end = lr * train.get('min_lr_ratio', 0.0)
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  kind = train.get('schedule', 'wsd')
  if kind == 'wsd':
    decay = max(int(steps * train.get('decay_fraction', 0.2)), 1)
    stable = max(steps - warmup - decay, 0)
    return optax.join_schedules(
        [warm, optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)],
        [warmup, warmup + stable])
  if kind == 'cosine':
    return optax.join_schedules(
        [warm, optax.cosine_decay_schedule(lr, max(steps - warmup, 1), end / lr if lr else 0.0)],
        [warmup])
  if kind == 'constant':
    return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"config.train.schedule={kind!r}; expected 'wsd', 'cosine' or 'constant'.")


def _decay_mask(params):
  """Weight decay on matrices only: norm scales are excluded."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == 'scale' for k in path), params)


def _keep_trainable(pattern):
  """Zeroes the updates of parameters whose path ('layers_0/attn/q/kernel') does not match
  ``pattern``; the optimizer state keeps its structure."""
  def zero(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u if re.search(pattern, '/'.join(
            str(getattr(k, 'key', k)) for k in path)) else jnp.zeros_like(u), updates)
  return optax.stateless(zero)


def make_optimizer(train):
  """optax chain: clip_by_global_norm -> AdamW(schedule).

  With ``train.trainable`` (a regex over parameter paths) only the matching parameters
  train: the others' gradients are zeroed before clipping and their updates (weight decay
  included) after AdamW.
  """
  schedule = make_schedule(train)
  pattern = train.get('trainable', '')
  parts = [_keep_trainable(pattern)] if pattern else []
  if train.get('grad_clip', 0.0):
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.get('eps', 1e-8),
                           weight_decay=train.weight_decay, mask=_decay_mask))
  if pattern:
    parts.append(_keep_trainable(pattern))
  return optax.chain(*parts), schedule
