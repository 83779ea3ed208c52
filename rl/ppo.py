"""Job ``rl_ppo``: PPO (Schulman et al. 2017) with a value head, GAE and a KL penalty to
the starting policy, on any environment of ``rl.envs``; Plantain's RL stage
(arXiv:2512.03176, Sec. 4) uses it with ``rl.envs.plantain``'s format-gated reward.

The policy is ``rl.value.WithValueHead`` on the SFT policy of ``ppo.init_workdir`` (the
critic shares the trunk; its head starts at zero); the reference is that SFT policy, frozen.
One iteration:
  Rollout  ``prompts`` x ``samples_per_prompt`` episodes of the current policy
           (``rl.play.Player``), scored by the environment.
  Targets  the values V_t of the rollout policy at every token; the episode's reward on the
           trained role's last token; ``rl.losses.gae`` (Eq. 16 of Schulman et al. 2016,
           ``gamma``, ``lam``) -> advantages (whitened over the rollout with
           ``normalize_advantages``) and returns.
  Update   ``epochs`` passes over the rollout in batches of ``data.batch_size``:
           ``rl.losses.ppo_loss`` (clipped ratio, Eq. 7; value loss, Eq. 9, optionally
           clipped; ``kl_coeff`` x the KL estimate to the reference; entropy bonus).
Metrics per iteration: ``rollout/*`` (reward and the environment's summary) and the
trainer's ``train/*`` (``pg_loss``, ``value_loss``, ``clip_frac``, ``kl``, ``ratio``...).
Evaluation uses ``config.rest``'s evaluation fields (``rl.rest.evaluate``).
Resuming: an iteration has a fixed number of steps and its rollout is saved
(``grown/iteration_K.npz``), as in ``rl.rest``.
"""
import json

import jax
import numpy as np
from ml_collections import config_dict

from rl import envs
from rl import episodes as ep
from rl import losses
from rl import play as play_lib
from rl import rest
from rl import value as value_lib
from training import sharding
from training import trainer as trainer_lib
from training import workdir as workdir_lib


def default_ppo_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      init_workdir='',  # the SFT run to start from (its tokenizer and latest checkpoint)
      iterations=4,
      prompts=64,  # per rollout
      samples_per_prompt=4,
      epochs=2,  # passes over each rollout
      clip_eps=0.2,
      value_clip=config_dict.placeholder(float),  # None: unclipped value loss
      gamma=1.0,
      lam=0.95,
      value_coeff=0.5,
      kl_coeff=0.05,
      kl_estimator='k3',
      entropy_coeff=0.0,
      normalize_advantages=True,
      trained_role='assistant',
  ))


def check_config(config):
  """Invalid PPO settings as a ``ConfigError`` naming the field, before anything compiles."""
  cfg = config.ppo
  error = workdir_lib.ConfigError
  if not cfg.clip_eps > 0:
    raise error(f'config.ppo.clip_eps={cfg.clip_eps} must be > 0.')
  for name in ('gamma', 'lam'):
    if not 0 <= cfg[name] <= 1:
      raise error(f'config.ppo.{name}={cfg[name]} must be in [0, 1].')
  if cfg.value_clip is not None and not cfg.value_clip > 0:
    raise error(f'config.ppo.value_clip={cfg.value_clip} must be > 0 (or None).')
  for name in ('value_coeff', 'kl_coeff', 'entropy_coeff'):
    if cfg[name] < 0:
      raise error(f'config.ppo.{name}={cfg[name]} must be >= 0.')
  if cfg.kl_estimator not in losses.KL_ESTIMATORS:
    raise error(f'config.ppo.kl_estimator={cfg.kl_estimator!r} must be one of '
                f'{losses.KL_ESTIMATORS}.')
  for name in ('iterations', 'prompts', 'samples_per_prompt', 'epochs'):
    if cfg[name] < 1:
      raise error(f'config.ppo.{name}={cfg[name]} must be >= 1.')
  if not cfg.init_workdir:
    raise error('config.ppo.init_workdir is empty: name the SFT workdir to start from '
                '(job rl_sft).')


def steps_per_iteration(config) -> int:
  cfg = config.ppo
  return cfg.epochs * max(1, cfg.prompts * cfg.samples_per_prompt // config.data.batch_size)


def make_loss(config):
  cfg = config.ppo
  return losses.ppo_loss(clip_eps=cfg.clip_eps, value_coeff=cfg.value_coeff,
                         value_clip=cfg.value_clip, kl_coeff=cfg.kl_coeff,
                         kl_estimator=cfg.kl_estimator, entropy_coeff=cfg.entropy_coeff)


def terminal_rewards(rewards, loss_mask):
  """Per-token rewards [B, T]: each row's reward on its last policy token, 0 elsewhere."""
  mask = np.asarray(loss_mask) > 0
  out = np.zeros(mask.shape, np.float32)
  rows = np.flatnonzero(mask.any(1))
  last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
  out[rows, last] = np.asarray(rewards, np.float32)[rows]
  return out


def whiten(advantages, mask, eps=1e-6):
  """Advantages standardised over the masked tokens (0 outside the mask)."""
  mask = np.asarray(mask) > 0
  values = np.asarray(advantages, np.float64)[mask]
  std = values.std() if values.size > 1 else 1.0
  return np.where(mask, (advantages - values.mean()) / (std + eps), 0.0).astype(np.float32)


def ppo(config, workdir):
  """Job ``rl_ppo``: PPO iterations from the SFT policy in ``config.ppo.init_workdir``."""
  check_config(config)
  cfg = config.ppo
  env = envs.make_env(config.env)
  tokenizer, formatter, base_model, base = rest.init_policy(cfg.init_workdir, env, config)
  model = value_lib.WithValueHead(base_model)
  trainer = trainer_lib.Trainer(config, workdir, model=model, loss_fn=make_loss(config))
  player = play_lib.Player(env, trainer, formatter, config.rollout, (cfg.trained_role,))
  per_iteration = steps_per_iteration(config)
  head = {'kernel': np.zeros((config.model.embed_dim, 1), np.float32),
          'bias': np.zeros((1,), np.float32)}
  forward = jax.jit(lambda variables, batch: model.apply(
      variables, batch['tokens'], positions=batch['positions'],
      segment_ids=batch['segment_ids'])[1]['values'])
  with trainer:
    state = trainer.restore_or_init(init_params=value_lib.wrap_params(base['params'], head))
    rest._save_tokenizer(trainer, tokenizer)  # pylint: disable=protected-access
    reference = trainer.shard_params(base['params'], base_model)
    step = int(state['step'])
    iteration, position = divmod(step, per_iteration)
    preempted = False
    with trainer_lib.Preemption() as preemption:
      while iteration < cfg.iterations and not preempted:
        grown = trainer.workdir / 'grown' / f'iteration_{iteration + 1}.npz'
        if position == 0 or not grown.exists():
          arrays, scalars = rollout(player, trainer, state, config, iteration, tokenizer,
                                    forward)
          rest._save_arrays(grown, arrays)  # pylint: disable=protected-access
          trainer.writer.write(step, scalars)
        arrays = rest._load_arrays(grown)  # pylint: disable=protected-access
        preempted = preemption.requested(step)
        if preempted:
          break
        end = (iteration + 1) * per_iteration
        batches = ep.epoch_batches({k: arrays[k] for k in TRAIN_FIELDS}, config.data.batch_size,
                                   (config.seed, iteration), start=step - iteration * per_iteration)
        result = trainer.fit(state, batches, end, args={'reference': reference})
        state, step, preempted = result.state, result.step, result.preempted
        if not preempted:
          iteration, position = iteration + 1, 0
          rest._log_eval(trainer, player, state, config, step,  # pylint: disable=protected-access
                         f'iteration_{iteration}', final=iteration == cfg.iterations)
    summary = {'step': step, 'preempted': preempted, **trainer.writer.last('eval/')[1]}
  if workdir_lib.is_primary():
    workdir_lib.write_text(workdir_lib.path(workdir) / 'summary.json',
                           json.dumps(summary, indent=1))
  return summary


TRAIN_FIELDS = ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask',
                'behaviour_logprobs', 'advantages', 'returns', 'old_values')


def rollout(player, trainer, state, config, iteration, tokenizer, forward):
  """The rollout of ``iteration`` and its PPO targets -> (arrays, metrics)."""
  cfg = config.ppo
  np_rng = np.random.default_rng([config.seed, 2, iteration])
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
  variables = trainer_lib.model_variables(state)
  with trainer.context():
    episodes, groups = player.grow(np_rng, cfg.prompts, cfg.samples_per_prompt, variables, rng)
  items = [t for t in ep.transcripts(player.env, episodes, player.formatter, cfg.trained_role,
                                     (cfg.trained_role,), groups)
           if len(t.tokens) <= config.data.seq_len + 1 and t.policy_mask.any()]
  arrays = ep.to_batch(items, config.data.seq_len, tokenizer.pad_id)
  values = []
  with trainer.context():
    for start in range(0, len(items), config.data.batch_size):
      chunk = {k: arrays[k][start:start + config.data.batch_size]
               for k in ('tokens', 'positions', 'segment_ids')}
      n = len(chunk['tokens'])
      pad = (-n) % config.data.batch_size
      chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
      values.append(np.asarray(jax.device_get(
          forward(variables, sharding.shard_batch(chunk, trainer.mesh))))[:n])
  mask = arrays['loss_mask']
  old_values = np.where(mask > 0, np.concatenate(values), 0.0).astype(np.float32)
  advantages, returns = jax.device_get(losses.gae(
      terminal_rewards(arrays['rewards'], mask), old_values, mask, cfg.gamma, cfg.lam))
  advantages = np.asarray(advantages, np.float32)
  if cfg.normalize_advantages:
    advantages = whiten(advantages, mask)
  arrays.update(advantages=advantages, returns=np.asarray(returns, np.float32),
                old_values=old_values)
  play_lib.write_samples(trainer.workdir, f'rollout_{iteration + 1}', player.env, episodes,
                         cfg.trained_role)
  summary = {**ep.summarize_rewards(episodes), **player.env.summary(episodes)}
  scalars = {f'rollout/{k}': v for k, v in summary.items()}
  scalars.update({'rollout/iteration': iteration + 1,
                  'rollout/kept': len(items) / len(episodes),
                  'rollout/value_mean': float(old_values[mask > 0].mean())})
  return arrays, scalars
