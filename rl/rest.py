"""Supervised warm start and ReST / ReST-EM on any environment of ``rl.envs``.

``sft``: demonstrations written by the environment itself (``env.demonstration``, with
``sft.behaviour``, on the questions of ``sft.splits`` in turn), in equal shares from ``config.env``
updated by each of ``sft.env_variants`` (e.g. both modes of an environment), become
transcripts of each trained role's view; ``sft.pretraining_repeats`` copies of
``env.pretraining_texts()`` (plain text, every token trained) and of each variant's
``pretraining_episodes()`` (conversations, the trained roles' turns) join them; a tokenizer
with the reserved role tokens is built from all the text; the policy is trained with NLL on
its roles' turns. With ``sft.init_workdir``, training starts from that SFT run's tokenizer and
latest checkpoint instead (a fine-tune, e.g. an action-supervised policy from the same
pretrained one).

``rest`` (Gulcehre et al. 2023; ReST-EM, Singh et al. 2023), one iteration:
  Grow     ``prompts`` fresh episodes (of the env split ``grow_splits[iteration % len]``,
           ``train`` by default), ``samples_per_prompt`` rollouts of each from the
           current policy (the trained roles sample; in self-play the policy also plays
           the other model roles), scored by the environment's reward.
  Improve  for each threshold tau_j of ``thresholds`` (raised over Improve steps): keep the
           samples with reward >= tau_j, in the ``top_fraction`` of all samples and within
           ``margin`` of their prompt's best, at most ``max_per_prompt`` per prompt (the
           highest), and fine-tune ``steps_per_improve`` steps with NLL on the trained roles'
           own tokens (each role from its own view; with ``untrained_after_role``, only the
           turns before that role's first turn).
  ReST-EM's ``restart_from_base`` fine-tunes from the initial policy every iteration (on
  samples from the current one).
  With ``pretraining_mix`` > 0, that share of each Improve step's rows is drawn from the
  environment's pretraining data of the kinds in ``rehearsal`` (its ``texts`` and/or its
  ``episodes``; rehearsal, as PPO-ptx mixes pretraining gradients into RLHF, Ouyang et al.
  2022), so fine-tuning on rollouts does not wear away what pretraining taught.
  Evaluate on the environment's evaluation sets; metrics, samples and a checkpoint.
Resuming: an iteration has a fixed number of steps, so the step says where the loop stood;
the Grow output of the running iteration is saved (``grown/iteration_K.npz``) and batch
``k`` of an Improve step is a function of (seed, iteration, k), so SIGTERM and rerunning
the command continue mid-iteration with the same data and RNG.
"""
import copy
import io
import json

from absl import logging
import jax
import numpy as np
from ml_collections import config_dict

from model import decode
from rl import envs
from rl import episodes as ep
from rl import play as play_lib
from training import checkpoint as ckpt_lib
from training import tokenizers
from training import trainer as trainer_lib
from training import workdir as workdir_lib


REHEARSAL_KINDS = ('texts', 'episodes')


def default_sft_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      episodes=4000,  # demonstrations
      roles=('assistant', 'user'),  # whose turns are trained (each from its own view)
      behaviour=config_dict.placeholder(str),  # env.demonstration's; None: the env's default
      env_variants=({},),  # updates of config.env, each giving an equal share of the demos
      pretraining_repeats=0,  # copies of the env's pretraining texts and episodes in the data
      splits=('train',),  # the env splits whose questions the demonstrations ask, in turn
      init_workdir='',  # '': from scratch, own tokenizer; an SFT run: its tokenizer and weights
  ))


def default_rest_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      init_workdir='',  # the SFT run to start from (its tokenizer and latest checkpoint)
      iterations=4,
      prompts=256,  # per Grow
      samples_per_prompt=8,
      thresholds=(0.0,),  # one per Improve step
      margin=float('inf'),  # keep only samples within this of their prompt's best reward
      top_fraction=1.0,  # keep only the top fraction of all samples by reward
      max_per_prompt=2,
      steps_per_improve=100,
      restart_from_base=False,  # ReST-EM
      trained_roles=('assistant', 'user'),  # each from its own view (self-play: both)
      # '' trains every turn of the trained roles; a role (e.g. 'tool'): the turns after its
      # first turn are left out of the loss, so Improve learns the decisions taken before a
      # tool result, not the retrieved facts (which a small policy would memorise).
      untrained_after_role='',
      eval_episodes=16,  # per evaluation setting, after each iteration
      final_eval_episodes=64,  # per setting, after the last iteration (and by rl_sft)
      eval_sets=('heldout', 'seen'),  # of env.eval_settings()
      # 'sample': at the rollout temperature (a rate is the policy's probability of an
      # action); 'greedy': the argmax policy. Sets other than the first mode's are named
      # '<set>_<mode>'.
      eval_modes=('sample', 'greedy'),
      # share of each Improve step's rows drawn from the environment's pretraining texts and
      # episodes (rehearsal, as PPO-ptx mixes pretraining gradients into RLHF); 0: none
      pretraining_mix=0.0,
      # what the rehearsal rows are: the env's pretraining 'texts' (plain text, every token
      # trained) and/or its pretraining 'episodes' (conversations, the trained roles' turns)
      rehearsal=REHEARSAL_KINDS,
      # the env splits Grow asks, one per iteration in turn (e.g. collab's 'train_0', ...)
      grow_splits=('train',),
  ))


def stage_config(config, name, seed, init_workdir=None):
  """A reproduction's stage: ``config.stages[name]`` (a whole job config, copied) with its
  ``seed`` and, for ReST stages, the workdir of the policy it starts from."""
  stage = copy.deepcopy(config.stages[name])
  stage.unlock()
  stage.seed = int(seed)
  if init_workdir is not None:
    stage.rest.init_workdir = init_workdir
  return stage


def _check(config):
  rest = config.get('rest')
  if rest is not None:
    if not rest.thresholds:
      raise workdir_lib.ConfigError('config.rest.thresholds is empty: give one threshold per '
                                    'Improve step.')
    for field in ('iterations', 'prompts', 'samples_per_prompt', 'max_per_prompt',
                  'steps_per_improve', 'eval_episodes', 'final_eval_episodes'):
      if rest[field] < 1:
        raise workdir_lib.ConfigError(f'config.rest.{field}={rest[field]} must be >= 1.')
    if not 0 <= rest.get('pretraining_mix', 0.0) < 1:
      raise workdir_lib.ConfigError(f'config.rest.pretraining_mix={rest.pretraining_mix} '
                                    'must be in [0, 1).')
    kinds = tuple(rest.get('rehearsal', REHEARSAL_KINDS))
    if not kinds or not set(kinds) <= set(REHEARSAL_KINDS):
      raise workdir_lib.ConfigError(f'config.rest.rehearsal={kinds}: name one or both of '
                                    f'{REHEARSAL_KINDS}.')


def _check_grow_splits(env, splits):
  """Every split of ``rest.grow_splits`` must be one the environment can reset on."""
  if not splits:
    raise workdir_lib.ConfigError('config.rest.grow_splits is empty: name the env split(s) '
                                  'Grow asks.')
  for split in splits:
    try:
      env.reset(np.random.default_rng(0), split)
    except ValueError as e:
      raise workdir_lib.ConfigError(f'config.rest.grow_splits: {e}') from e


def _text_of(env, episodes):
  return [t.text for e in episodes for r in env.speakers for t in env.view(e, r)]


# ---------------------------------------------------------------------------------------
# Evaluation, shared by both jobs.
# ---------------------------------------------------------------------------------------
def eval_names(config):
  """{name: (set, mode)} of every evaluation: the first mode's under the set's name."""
  modes = config.rest.eval_modes
  bad = [m for m in modes if m not in ('sample', 'greedy')]
  if bad or not modes:
    raise workdir_lib.ConfigError(f"config.rest.eval_modes={modes}: use 'sample' and/or "
                                  "'greedy'.")
  return {(s if i == 0 else f'{s}_{m}'): (s, m)
          for i, m in enumerate(modes) for s in config.rest.eval_sets}


def evaluate(player, variables, config, seed, episodes_per_setting):
  """Every evaluation set of the environment in every mode -> ({'eval/<name>/<metric>': mean
  over its settings}, {name: [(setting, summary), ...]}, the first evaluation's episodes)."""
  scalars, details, first = {}, {}, None
  available = player.env.eval_settings()
  unknown = [n for n in config.rest.eval_sets if n not in available]
  if unknown:
    raise workdir_lib.ConfigError(f'config.rest.eval_sets has {unknown}; the environment has '
                                  f'{sorted(available)}.')
  for name, (which, mode) in eval_names(config).items():
    sampling = (decode.SamplingConfig(greedy=True) if mode == 'greedy'
                else decode.SamplingConfig.from_config(config.rollout))
    per_setting, episodes = player.evaluate(variables, available[which], episodes_per_setting,
                                            seed, sampling)
    details[name] = per_setting
    first = episodes if first is None else first
    for metric in per_setting[0][1]:
      scalars[f'eval/{name}/{metric}'] = float(np.mean([s[metric] for _, s in per_setting]))
  return scalars, details, first


def _write_json(workdir, name, value):
  if workdir_lib.is_primary():
    workdir_lib.write_text(workdir_lib.path(workdir) / name, json.dumps(value, indent=1))


def _log_eval(trainer, player, state, config, step, name, final=False):
  if not config.rest.eval_sets:
    return {}
  n = config.rest.final_eval_episodes if final else config.rest.eval_episodes
  with trainer.context():
    scalars, details, episodes = evaluate(player, trainer_lib.model_variables(state), config,
                                          config.seed, n)
  trainer.writer.write(step, scalars)
  _write_json(trainer.workdir, f'eval/{name}.json', details)
  play_lib.write_samples(trainer.workdir, f'eval_{name}', player.env, episodes,
                         player.trained_roles[0])
  logging.info('step %d eval: %s', step, {k: round(v, 3) for k, v in scalars.items()})
  return scalars


# ---------------------------------------------------------------------------------------
# SFT.
# ---------------------------------------------------------------------------------------
def sft(config, workdir):
  """Job ``rl_sft``: the environment's demonstrations -> tokenizer -> NLL training."""
  _check(config)
  env = envs.make_env(config.env)
  variants = config.sft.get('env_variants', ({},))
  if not variants:
    raise workdir_lib.ConfigError('config.sft.env_variants is empty: use ({},) for config.env '
                                  'alone.')
  splits = tuple(config.sft.get('splits', ('train',)))
  if not splits:
    raise workdir_lib.ConfigError('config.sft.splits is empty: name the env split(s) the '
                                  'demonstrations ask.')
  kwargs = {}
  if config.sft.get('behaviour') is not None:
    kwargs['behaviour'] = config.sft.behaviour
  demos, start = [], 0  # (variant env, its demonstrations); demo i has seed (seed, 1, i)
  for v, update in enumerate(variants):
    variant_config = copy.deepcopy(config.env)
    variant_config.update(dict(update))
    variant = envs.make_env(variant_config)
    n = config.sft.episodes // len(variants) + (v < config.sft.episodes % len(variants))
    demos.append((variant, [variant.demonstration(np.random.default_rng([config.seed, 1, i]),
                                                  splits[i % len(splits)], **kwargs)
                            for i in range(start, start + n)]))
    start += n
  repeats = config.sft.get('pretraining_repeats', 0)
  pretraining = list(env.pretraining_texts()) * repeats
  demos += [(variant, list(variant.pretraining_episodes()) * repeats) for variant, _ in demos]
  if config.sft.get('init_workdir'):
    tokenizer, formatter, _, base = init_policy(config.sft.init_workdir, env, config)
  else:
    texts = [t for variant, d in demos for t in _text_of(variant, d)] + pretraining
    tokenizer, base = sft_tokenizer(config.tokenizer, env, workdir, texts), None
    formatter = ep.Formatter(tokenizer, env.roles, env.markup)
    formatter.check_vocab(config.model.vocab_size)
  items = [ep.text_transcript(formatter, text) for text in pretraining]
  for variant, d in demos:
    variant_formatter = ep.Formatter(tokenizer, variant.roles, variant.markup)
    items += _role_transcripts(variant, d, variant_formatter, config.sft.roles)
  arrays = ep.to_batch(items, config.data.seq_len, tokenizer.pad_id)
  trainer = trainer_lib.Trainer(config, workdir)
  player = play_lib.Player(env, trainer, formatter, config.rollout)
  with trainer:
    state = _restore_or_start(trainer, base)
    _save_tokenizer(trainer, tokenizer)
    batches = ep.epoch_batches(arrays, config.data.batch_size, config.seed,
                               start=int(state['step']))
    result = trainer.fit(state, batches, config.train.steps)
    summary = {'step': result.step, 'preempted': result.preempted,
               'transcripts': len(items)}
    if not result.preempted:
      summary.update(_log_eval(trainer, player, result.state, config, result.step, 'final',
                               final=True))
  _write_json(workdir, 'summary.json', summary)
  return summary


def _role_transcripts(env, episodes, formatter, roles):
  """Each role's transcript of each finished episode it spoke in (its turns trained)."""
  return [t for role in roles if role in env.speakers
          for t in ep.transcripts(env, episodes, formatter, role, (role,), demonstration=True)
          if t.policy_mask.any()]


def pretraining_items(env, formatter, roles, kinds=REHEARSAL_KINDS):
  """The environment's pretraining texts and/or its pretraining episodes as ``roles`` see
  them (``kinds``): one copy of that part of SFT's pretraining share (ReST's rehearsal
  data)."""
  texts = env.pretraining_texts() if 'texts' in kinds else []
  episodes = env.pretraining_episodes() if 'episodes' in kinds else []
  return ([ep.text_transcript(formatter, text) for text in texts] +
          _role_transcripts(env, episodes, formatter, roles))


def sft_tokenizer(tokenizer_config, env, workdir, texts):
  """``rl_sft``'s tokenizer: ``tokenizer_config`` with the env's ``whole_words`` added,
  trained on ``texts`` (or reloaded from ``workdir``); not saved yet."""
  tokenizer_config = copy.deepcopy(tokenizer_config)
  tokenizer_config.whole_words = (tuple(tokenizer_config.get('whole_words', ())) +
                                  env.whole_words())
  return tokenizers.make_tokenizer(tokenizer_config, workdir, texts=texts, save=False)


def _save_tokenizer(trainer, tokenizer):
  directory = trainer.workdir / tokenizers.TOKENIZER_SUBDIR
  if workdir_lib.is_primary() and not (directory / tokenizers.MARKER_FILE).exists():
    tokenizer.save(directory)


# ---------------------------------------------------------------------------------------
# ReST.
# ---------------------------------------------------------------------------------------
def improve_filter(rewards, groups, threshold, margin, max_per_prompt, top_fraction=1.0):
  """Indices kept by one Improve step (see the module docstring), in a fixed order.
  ``top_fraction`` < 1 also drops samples below that upper quantile of all rewards."""
  rewards, groups = np.asarray(rewards, np.float64), np.asarray(groups)
  if not 0 < top_fraction <= 1:
    raise ValueError(f'config.rest.top_fraction={top_fraction} must be in (0, 1].')
  threshold = max(threshold, np.quantile(rewards, 1 - top_fraction, method='higher'))
  kept = []
  for g in np.unique(groups):
    idx = np.flatnonzero(groups == g)
    best = rewards[idx].max()
    order = idx[np.argsort(-rewards[idx], kind='stable')]
    good = [i for i in order if rewards[i] >= threshold and rewards[i] >= best - margin]
    kept += good[:max_per_prompt]
  return np.asarray(sorted(kept), np.int64)


def with_rehearsal(data, rehearsal, mix, rng):
  """``data``'s rows followed by rows of ``rehearsal`` drawn by ``rng`` (without
  replacement while there are enough), so that they make up the share ``mix`` of the
  result."""
  n = round(len(data['tokens']) * mix / (1 - mix))
  pick = rng.choice(len(rehearsal['tokens']), n, replace=n > len(rehearsal['tokens']))
  return {k: np.concatenate([data[k], rehearsal[k][pick]]) for k in data}


def _save_arrays(path, arrays):
  if workdir_lib.is_primary():
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def _load_arrays(path):
  with np.load(io.BytesIO(path.read_bytes())) as data:
    return {k: data[k] for k in data.files}


def rest(config, workdir):
  """Job ``rl_rest``: ReST iterations from the SFT policy in ``config.rest.init_workdir``."""
  _check(config)
  cfg = config.rest
  if not cfg.init_workdir:
    raise workdir_lib.ConfigError('config.rest.init_workdir is empty: name the SFT workdir '
                                  'to start from (job rl_sft).')
  env = envs.make_env(config.env)
  _check_grow_splits(env, cfg.get('grow_splits', ('train',)))
  if cfg.get('untrained_after_role') and cfg.untrained_after_role not in env.roles:
    raise workdir_lib.ConfigError(f'config.rest.untrained_after_role='
                                  f'{cfg.untrained_after_role!r} is not a role of the '
                                  f'environment {env.roles}.')
  tokenizer, formatter, _, base = init_policy(cfg.init_workdir, env, config)
  trainer = trainer_lib.Trainer(config, workdir)
  player = play_lib.Player(env, trainer, formatter, config.rollout, cfg.trained_roles)
  mix = cfg.get('pretraining_mix', 0.0)
  rehearsal = None
  if mix:
    kinds = tuple(cfg.get('rehearsal', REHEARSAL_KINDS))
    items = pretraining_items(env, formatter, cfg.trained_roles, kinds)
    if not items:
      raise workdir_lib.ConfigError(f'config.rest.pretraining_mix={mix}, but the environment '
                                    f'{config.env.name!r} has no pretraining {kinds}.')
    rehearsal = ep.to_batch(items, config.data.seq_len, tokenizer.pad_id)
  per_iteration = len(cfg.thresholds) * cfg.steps_per_improve
  with trainer:
    state = _restore_or_start(trainer, base)
    _save_tokenizer(trainer, tokenizer)
    step = int(state['step'])
    iteration, position = divmod(step, per_iteration)
    last_eval = trainer.writer.last('eval/')[0]
    if position == 0 and (last_eval is None or last_eval < step):  # stopped before its eval
      _log_eval(trainer, player, state, config, step, f'iteration_{iteration}',
                final=iteration == cfg.iterations)
    # SIGTERM outside ``fit`` (during Grow or evaluation) stops the loop at the next
    # boundary; the last checkpoint and the saved Grow output are where it resumes.
    with trainer_lib.Preemption() as preemption:
      preempted = False
      while iteration < cfg.iterations:
        preempted = preemption.requested(step)
        if not preempted:
          state, step, preempted = _iteration(trainer, player, state, step, iteration,
                                              position, base, config, tokenizer,
                                              preemption, rehearsal)
        if preempted:
          break
        iteration, position = iteration + 1, 0
        _log_eval(trainer, player, state, config, step, f'iteration_{iteration}',
                  final=iteration == cfg.iterations)
    summary = {'step': step, 'preempted': preempted, **trainer.writer.last('eval/')[1]}
  _write_json(workdir, 'summary.json', summary)
  return summary


def init_policy(init_workdir, env, config):
  """(tokenizer, formatter, model, variables as host arrays) of the SFT run in
  ``init_workdir`` (its tokenizer and latest checkpoint), the tokenizer checked against
  ``config.model.vocab_size``."""
  init = workdir_lib.path(init_workdir)
  model, variables = ckpt_lib.load_model(init)  # first: it says when init is no workdir
  tokenizer = tokenizers.load_tokenizer(init / tokenizers.TOKENIZER_SUBDIR)
  formatter = ep.Formatter(tokenizer, env.roles, env.markup)
  formatter.check_vocab(config.model.vocab_size)
  return tokenizer, formatter, model, jax.device_get(variables)


def _restore_or_start(trainer, base):
  """The latest checkpoint of ``trainer``'s workdir, else a fresh state: from the variables
  ``base`` when given, else from the seed."""
  if base is None:
    return trainer.restore_or_init()
  state = trainer.restore_or_init(init_params=base['params'])
  return _with_base_state(trainer, state, base) if trainer.start_step == 0 else state


def _with_base_state(trainer, state, base):
  """``state`` with the initial policy's non-parameter collections (e.g. MoR's router
  bias), which ``restore_or_init`` and ``with_params`` leave at their initial values."""
  extra = {k: v for k, v in base.items() if k != 'params'}
  if not extra or 'model_state' not in state:
    return state
  return dict(state, model_state=jax.device_put(extra, trainer.shardings['model_state']))


def _iteration(trainer, player, state, step, iteration, position, base, config,
               tokenizer, preemption, rehearsal=None):
  """Grow (or its saved output, mid-iteration) and the Improve steps of ``iteration`` from
  ``step``; returns (state, step, preempted). A SIGTERM during Grow stops before the first
  Improve step (``fit`` handles one that arrives during training). ``rehearsal``: the
  pretraining rows that ``rest.pretraining_mix`` of each Improve step's rows are drawn from."""
  cfg = config.rest
  per_iteration = len(cfg.thresholds) * cfg.steps_per_improve
  grown_file = trainer.workdir / 'grown' / f'iteration_{iteration + 1}.npz'
  if position == 0 or not grown_file.exists():
    arrays, scalars = _grow(player, trainer, state, config, iteration, tokenizer)
    _save_arrays(grown_file, arrays)
    trainer.writer.write(step, scalars)
    if preemption.requested(step):
      return state, step, True
    if cfg.restart_from_base and position == 0:
      state = _with_base_state(trainer, trainer.with_params(state, base['params']), base)
  arrays = _load_arrays(grown_file)
  for j, threshold in enumerate(cfg.thresholds):
    end = iteration * per_iteration + (j + 1) * cfg.steps_per_improve
    if step >= end:
      continue
    candidates = arrays.get('ep_candidates', True)  # Grow files saved before relabel: all
    rewards = np.where(candidates, arrays['ep_rewards'], -np.inf)
    kept = improve_filter(rewards, arrays['ep_groups'], threshold, cfg.margin,
                          cfg.max_per_prompt, cfg.top_fraction)
    rows = np.flatnonzero(np.isin(arrays['episode_ids'], kept))
    if not len(rows):
      raise ValueError(
          f'Iteration {iteration + 1}, Improve step {j + 1}: no sample has reward >= '
          f'{threshold} (best {arrays["ep_rewards"].max():.3f}); lower '
          'config.rest.thresholds. The Grow output is saved; rerunning resumes here.')
    trainer.writer.write(step, {'improve/kept': len(kept), 'improve/rows': len(rows),
                                'improve/threshold': threshold,
                                'improve/kept_reward': float(arrays['ep_rewards'][kept].mean())})
    data = {k: arrays[k][rows] for k in ep.BATCH_FIELDS}
    if rehearsal is not None:
      data = with_rehearsal(data, rehearsal, cfg.pretraining_mix,
                            np.random.default_rng([config.seed, 3, iteration, j]))
    batches = ep.epoch_batches(data, config.data.batch_size, (config.seed, iteration, j),
                               start=step - (end - cfg.steps_per_improve))
    result = trainer.fit(state, batches, end)
    state, step = result.state, result.step
    if result.preempted:
      return state, step, True
  return state, step, False


def _grow(player, trainer, state, config, iteration, tokenizer):
  """Grow for ``iteration``: rollouts of the current policy -> (arrays, metrics).

  The arrays hold one row per (episode as ``env.relabel`` rewrites it, trained role) with
  the role's own turns as the loss mask (each role learns from its own view: the self-play
  user from the one holding the intent), ``episode_ids`` mapping rows to episodes, and
  per-episode ``ep_rewards``, ``ep_groups`` and ``ep_candidates`` for the Improve filter (an
  episode ``relabel`` rejects has no rows and is never kept). Rows without a trained token
  (a role that did not speak) or longer than ``data.seq_len`` (rambling turns) are left out.
  """
  cfg = config.rest
  np_rng = np.random.default_rng([config.seed, 2, iteration])
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
  splits = cfg.get('grow_splits', ('train',))
  with trainer.context():
    episodes, groups = player.grow(np_rng, cfg.prompts, cfg.samples_per_prompt,
                                   trainer_lib.model_variables(state), rng,
                                   splits[iteration % len(splits)])
  relabelled = [player.env.relabel(e, np_rng) for e in episodes]
  candidates = [i for i, e in enumerate(relabelled) if e is not None]
  items, owners, too_long = [], [], 0
  for role in cfg.trained_roles:
    transcripts = ep.transcripts(player.env, [relabelled[i] for i in candidates],
                                 player.formatter, role, (role,), [groups[i] for i in candidates],
                                 untrained_after=cfg.get('untrained_after_role') or None)
    for i, t in zip(candidates, transcripts):
      if len(t.tokens) > config.data.seq_len + 1:
        too_long += 1
      elif t.policy_mask.any():
        items.append(t)
        owners.append(i)
  arrays = ep.to_batch(items, config.data.seq_len, tokenizer.pad_id)
  arrays.update(episode_ids=np.asarray(owners, np.int32),
                ep_rewards=np.asarray([e.reward for e in episodes], np.float32),
                ep_candidates=np.asarray([e is not None for e in relabelled]),
                ep_groups=np.asarray(groups, np.int32))
  play_lib.write_samples(trainer.workdir, f'grow_{iteration + 1}', player.env, episodes,
                         cfg.trained_roles[0])
  scalars = {f'grow/{k}': v for k, v in {**ep.summarize_rewards(episodes),
                                         **player.env.summary(episodes)}.items()}
  return arrays, {**scalars, 'rest/iteration': iteration + 1,
                  'grow/too_long': too_long / max(1, len(episodes) * len(cfg.trained_roles))}
