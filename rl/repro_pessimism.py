"""Job ``repro_pessimism``: preference hacking and pessimism (PRPO, P3O; arXiv:2503.06810,
PAPERS.md §7) in miniature, on the exact-gold setting of ``rl.envs.prefs``.

Stages (``configs/repro/pessimism.py``), each cached in the workdir:
  1. μ: a tiny Llama (byte tokenizer) fine-tuned on μ's demonstrations (``lm_loss``).
  2. D: ``pairs`` pairs sampled from μ, labelled by Bradley–Terry on the gold reward
     (``prefs.label_pairs``), written as ``prefs.jsonl`` and read back with
     ``preference.load_preferences``; a held-out fraction is kept for accuracy.
  3. The proxy reward model: ``WithValueHead`` on the μ trunk, score = value at the last
     token, fit by ``preference.bt_nll``. The pairwise preference model of P3O is
     ``P(y ≻ y′) = σ(f(y) − f(y′))`` with f a scalar-head model of the same kind; its
     maximum-likelihood fit on D is the same BT objective, so it starts from the proxy.
  4. Policy runs, each from μ, ``steps`` updates:
     * ``reinforce_kl<β>``: REINFORCE (``losses.reinforce_loss``, leave-one-out baseline)
       against the proxy with KL to μ (the step argument ``reference``), swept over β;
     * ``dpo`` / ``ipo``: ``preference.dpo_loss`` / ``ipo_loss`` on D's training pairs;
     * ``prpo`` (``prpo_logz`` with the log-partition form): per step one update of an
       adversarial reward r (from the proxy) on ``preference.prpo_reward_loss``, then one
       REINFORCE update against r with KL to μ;
     * ``p3o``: the same with the preference model on ``preference.p3o_preference_loss``;
       the policy's reward for y is ``mean_{y′~D} σ(f(y) − f(y′))``.
Every ``eval_every`` steps a fresh batch from the policy (the same keys for every run)
gives the gold reward, the proxy reward and KL(π || μ) (the mean over samples of
``Σ_t log π − log μ``, an unbiased sequence-level estimate).

Outputs: ``runs/<run>.json`` (curves; a rerun with the same config skips them),
``results.json``, ``results.md`` (peak and final gold per run, the done-when checks) and
``pessimism_<method>.png`` / ``pessimism.png``.
"""
import dataclasses
import json
import time

from absl import logging
import flax.serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import decode, registry
from model.config_errors import ConfigError
from rl import losses, preference, value as value_lib
from rl.envs import prefs
from training import losses as train_losses, tokenizers, trainer as trainer_lib
from training import workdir as workdir_lib

METHODS = ('reinforce', 'dpo', 'ipo', 'prpo', 'prpo_logz', 'p3o')
PESSIMISTIC = ('prpo', 'prpo_logz', 'p3o')


# ---------------------------------------------------------------------------------------
# Text <-> arrays. Sequences are [B, T] = BOS, the response's bytes, EOS, padding (0).
# ---------------------------------------------------------------------------------------
def encode(tokenizer, texts, length):
  """Responses -> sequences [B, length] (BOS + bytes + EOS, right-padded)."""
  seqs = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = [tokenizer.bos_id] + tokenizer.encode(text)[:length - 2] + [tokenizer.eos_id]
    seqs[i, :len(ids)] = ids
  return seqs


def decode_texts(tokenizer, generated):
  """Generated tokens [B, N] -> texts (up to the first EOS)."""
  texts = []
  for row in np.asarray(generated).tolist():
    if tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(row))
  return texts


def _positions(seqs):
  return jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)


def lm_batch(seqs):
  """Trainer fields for next-token prediction on sequences [B, T]: every target after BOS
  up to and including EOS is a policy token."""
  tokens, targets = seqs[:, :-1], seqs[:, 1:]
  return {'tokens': tokens, 'targets': targets, 'positions': _positions(tokens),
          'segment_ids': (tokens != 0).astype(jnp.int32),
          'loss_mask': (targets != 0).astype(jnp.float32)}


def sequence_logprobs(model, variables, seqs):
  """Σ_t log π(y_t | y_<t) over each response's tokens (EOS included) [B]."""
  batch = lm_batch(seqs)
  logits, _ = model.apply(variables, batch['tokens'], positions=batch['positions'],
                          segment_ids=batch['segment_ids'])
  return jnp.sum(losses.token_logprobs(logits, batch['targets']) * batch['loss_mask'], -1)


def scores(scorer, variables, seqs):
  """A ``WithValueHead`` model's scalar score per sequence [B]: the value at the last real
  token (EOS), which attends to the whole response."""
  _, aux = scorer.apply(variables, seqs, positions=_positions(seqs),
                        segment_ids=(seqs != 0).astype(jnp.int32))
  last = jnp.sum(seqs != 0, axis=-1) - 1
  return jnp.take_along_axis(aux['values'], last[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------------------
# Trainer-contract losses (``training.losses``): loss_fn(model, variables, batch, ctx).
# ---------------------------------------------------------------------------------------
def _split(x, sizes):
  return jnp.split(x, np.cumsum(sizes)[:-1])


def bt_reward_loss():
  """Bradley–Terry NLL of a scalar-head model on pairs (``chosen``, ``rejected`` [N, T])."""
  def loss_fn(model, variables, batch, ctx):
    del ctx
    n = batch['chosen'].shape[0]
    s_w, s_l = _split(scores(model, variables, jnp.concatenate(
        [batch['chosen'], batch['rejected']])), [n, n])
    return preference.bt_nll(s_w, s_l), {'accuracy': jnp.mean(s_w > s_l)}, {}
  return loss_fn


def offline_preference_loss(kind, beta):
  """DPO or IPO on pairs, with the reference's sequence log-probs precomputed
  (``ref_chosen``, ``ref_rejected`` [N])."""
  objective = {'dpo': preference.dpo_loss, 'ipo': preference.ipo_loss}[kind]

  def loss_fn(model, variables, batch, ctx):
    del ctx
    n = batch['chosen'].shape[0]
    lp_w, lp_l = _split(sequence_logprobs(model, variables, jnp.concatenate(
        [batch['chosen'], batch['rejected']])), [n, n])
    margin = preference.implicit_margin(lp_w, lp_l, batch['ref_chosen'], batch['ref_rejected'])
    return (objective(lp_w, lp_l, batch['ref_chosen'], batch['ref_rejected'], beta),
            {'margin': jnp.mean(margin)}, {})
  return loss_fn


def adversary_loss(method, eta, log_partition_beta=None):
  """The adversary's objective: PRPO's reward model or P3O's preference model, on
  ``policy`` (the policy's samples; for ``prpo_logz``, K samples of μ), ``data`` (responses
  of D) and the pairs ``chosen``/``rejected``."""
  def loss_fn(model, variables, batch, ctx):
    del ctx
    parts = [batch[k] for k in ('policy', 'data', 'chosen', 'rejected')]
    s_pol, s_data, s_w, s_l = _split(scores(model, variables, jnp.concatenate(parts)),
                                     [p.shape[0] for p in parts])
    if method == 'p3o':
      loss = preference.p3o_preference_loss(jax.nn.sigmoid(s_pol - s_data), s_w - s_l, eta)
    else:
      loss = preference.prpo_reward_loss(
          s_pol[None] if log_partition_beta else s_pol, s_data, s_w, s_l, eta,
          log_partition_beta)
    return loss, {'bt_nll': preference.bt_nll(s_w, s_l),
                  'gap': jnp.mean(s_pol) - jnp.mean(s_data)}, {}
  return loss_fn


def make_update(model, loss_fn, optimizer):
  """``update(params, opt_state, batch, args, step) -> (params, opt_state, loss, metrics)``:
  one jit-compiled gradient step of a trainer-contract loss."""
  @jax.jit
  def update(params, opt_state, batch, args, step):
    n_tokens = jnp.maximum(jnp.sum(batch['loss_mask']), 1.0) if 'loss_mask' in batch else 1.0
    ctx = trainer_lib.StepContext(jax.random.key(0), step, n_tokens, 1, args)

    def objective(p):
      loss, metrics, _ = loss_fn(model, {'params': p}, batch, ctx)
      return loss, metrics
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics
  return update


def rl_batch(seqs, behaviour_logprobs, rewards):
  """A REINFORCE batch for on-policy samples: leave-one-out baseline (RLOO) over the batch,
  advantages broadcast to the response's tokens."""
  batch = lm_batch(seqs)
  rewards = jnp.asarray(rewards, jnp.float32)
  adv = losses.group_advantages(rewards, jnp.zeros(rewards.shape, jnp.int32), leave_one_out=True)
  behaviour = jnp.zeros(batch['targets'].shape, jnp.float32)
  behaviour = behaviour.at[:, :behaviour_logprobs.shape[1]].set(behaviour_logprobs)
  return dict(batch, behaviour_logprobs=behaviour * batch['loss_mask'], rewards=rewards,
              advantages=losses.sequence_advantages_to_tokens(adv, batch['loss_mask']))


# ---------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------
class Setup:
  """The task, tokenizer, models and jit-compiled helpers shared by every stage."""

  def __init__(self, config):
    self.config = config
    try:
      self.task = prefs.PrefsTask(**config.task)
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.task: {e}') from None
    self.tokenizer = tokenizers.ByteTokenizer()
    self.model = registry.build_model(config.model)
    self.scorer = value_lib.WithValueHead(self.model)
    self.length = self.task.max_len + 2
    self.sampling = decode.SamplingConfig()
    self._logp = jax.jit(lambda p, s: sequence_logprobs(self.model, {'params': p}, s))
    self._score = jax.jit(lambda p, s: scores(self.scorer, {'params': p}, s))

  def init(self, key):
    dummy = jnp.zeros((1, self.length), jnp.int32)
    return nn.unbox(self.model.init(key, dummy)['params'])

  def init_scorer(self, key, base_params):
    dummy = jnp.zeros((1, self.length), jnp.int32)
    head = nn.unbox(self.scorer.init(key, dummy)['params'])['value_head']
    return value_lib.wrap_params(base_params, head)

  def sample(self, params, key, n):
    """n responses of the policy -> (sequences [n, T], texts, policy log-probs [n, N])."""
    prompts = jnp.full((n, 1), self.tokenizer.bos_id, jnp.int32)
    out = decode.generate(self.model, params, prompts, self.task.max_len, self.sampling, key,
                          stop_tokens=(self.tokenizer.eos_id,), pad_id=0)
    seqs = np.zeros((n, self.length), np.int32)
    seqs[:, 0] = self.tokenizer.bos_id
    seqs[:, 1:1 + self.task.max_len] = np.asarray(out.tokens)
    return jnp.asarray(seqs), decode_texts(self.tokenizer, out.tokens), out.policy_logprobs

  def gold(self, texts):
    return np.asarray([prefs.gold_reward(self.task, t) for t in texts])

  def logp(self, params, seqs):
    return self._logp(params, seqs)

  def score(self, params, seqs):
    return self._score(params, seqs)


def _optimizer(learning_rate):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def _save(path, tree):
  if workdir_lib.is_primary():
    with path.open('wb') as f:
      f.write(flax.serialization.to_bytes(tree))


def _load(path, template):
  return flax.serialization.from_bytes(template, path.read_bytes())


def train_mu(setup, key):
  """μ: the tiny Llama fine-tuned on μ's demonstrations (``lm_loss``)."""
  cfg = setup.config.sft
  rng = np.random.default_rng(setup.config.seed)
  params = setup.init(key)
  optimizer = _optimizer(cfg.learning_rate)
  opt_state = optimizer.init(params)
  update = make_update(setup.model, train_losses.lm_loss(), optimizer)
  for step in range(cfg.steps):
    texts = [prefs.sample_demonstration(setup.task, rng) for _ in range(cfg.batch)]
    batch = lm_batch(jnp.asarray(encode(setup.tokenizer, texts, setup.length)))
    params, opt_state, loss, _ = update(params, opt_state, batch, None, step)
    if step % 100 == 0 or step == cfg.steps - 1:
      logging.info('mu sft step %d: nll/token %.3f', step, float(loss))
  return params


def build_dataset(setup, mu_params, path):
  """``pairs`` pairs from μ, Bradley–Terry-labelled on gold, written as JSONL at ``path``."""
  cfg = setup.config.data
  rng = np.random.default_rng([setup.config.seed, 1])
  key = jax.random.key(setup.config.seed + 1000)
  rows = []
  while len(rows) < cfg.pairs:
    key, k = jax.random.split(key)
    _, texts, _ = setup.sample(mu_params, k, 2 * cfg.pairs)
    rows += prefs.label_pairs(setup.task, texts[::2], texts[1::2], rng)
  if workdir_lib.is_primary():
    workdir_lib.write_text(path, ''.join(json.dumps(r) + '\n' for r in rows[:cfg.pairs]))


def pair_arrays(setup, pairs):
  chosen = jnp.asarray(encode(setup.tokenizer, [c for _, c, _ in pairs], setup.length))
  rejected = jnp.asarray(encode(setup.tokenizer, [r for _, _, r in pairs], setup.length))
  return chosen, rejected


def fit_reward_model(setup, mu_params, train, heldout, key):
  """The proxy: BT on D's training pairs; returns (params, held-out accuracies)."""
  cfg = setup.config.reward_model
  params = setup.init_scorer(key, mu_params)
  optimizer = _optimizer(cfg.learning_rate)
  opt_state = optimizer.init(params)
  update = make_update(setup.scorer, bt_reward_loss(), optimizer)
  chosen, rejected = pair_arrays(setup, train)
  rng = np.random.default_rng([setup.config.seed, 2])
  for step in range(cfg.steps):
    idx = rng.choice(len(train), size=min(cfg.batch, len(train)), replace=False)
    params, opt_state, loss, _ = update(params, opt_state,
                                        {'chosen': chosen[idx], 'rejected': rejected[idx]},
                                        None, step)
  h_chosen, h_rejected = pair_arrays(setup, heldout)
  s_w, s_l = np.asarray(setup.score(params, h_chosen)), np.asarray(setup.score(params, h_rejected))
  g_w = setup.gold([c for _, c, _ in heldout])
  g_l = setup.gold([r for _, _, r in heldout])
  decided = g_w != g_l
  stats = {'heldout_pairs': len(heldout), 'train_pairs': len(train),
           'final_train_bt_nll': float(loss),
           'heldout_accuracy_vs_labels': float(np.mean(s_w > s_l)),
           'heldout_accuracy_vs_gold_order': float(np.mean(
               (s_w > s_l)[decided] == (g_w > g_l)[decided])),
           'bayes_accuracy_vs_labels': float(np.mean(
               np.where(decided, 1 / (1 + np.exp(-np.abs(g_w - g_l))), 0.5)))}
  return params, stats


def _kl_label(beta):
  return f'{beta:g}'


def run_names(config):
  """{run name: (method, KL coefficient or DPO/IPO beta)} for ``config.methods``."""
  names = {}
  for method in config.methods:
    if method == 'reinforce':
      names.update({f'reinforce_kl{_kl_label(b)}': (method, float(b)) for b in config.kl_coeffs})
    elif method in ('dpo', 'ipo'):
      names[method] = (method, float(config.dpo_beta))
    else:
      names.update({f'{method}_kl{_kl_label(b)}': (method, float(b))
                    for b in config.pessimistic_kl_coeffs})
  return names


def train_policy(setup, method, coeff, mu_params, proxy_params, train, data_seqs, ref_pool,
                 seed):
  """One run -> curves {step, gold, proxy, kl, ...} evaluated every ``eval_every`` steps."""
  config, cfg = setup.config, setup.config.policy
  key = jax.random.key(seed)
  eval_key = jax.random.key(10_000 + seed)
  rng = np.random.default_rng([seed, 3])
  params = mu_params
  optimizer = _optimizer(cfg.learning_rate)
  opt_state = optimizer.init(params)
  chosen, rejected = pair_arrays(setup, train)
  curves = {k: [] for k in ('step', 'gold', 'proxy', 'kl', 'length', 'train_reward')}

  def evaluate(step, params):
    seqs, texts, lp = setup.sample(params, jax.random.fold_in(eval_key, step), cfg.eval_batch)
    curves['step'].append(step)
    curves['gold'].append(float(setup.gold(texts).mean()))
    curves['proxy'].append(float(np.mean(setup.score(proxy_params, seqs))))
    curves['kl'].append(float(np.mean(np.sum(np.asarray(lp), -1) -
                                      np.asarray(setup.logp(mu_params, seqs)))))
    curves['length'].append(float(np.mean([len(t) for t in texts])))

  if method in ('dpo', 'ipo'):
    update = make_update(setup.model, offline_preference_loss(method, coeff), optimizer)
    ref_w, ref_l = setup.logp(mu_params, chosen), setup.logp(mu_params, rejected)
  else:
    update = make_update(setup.model, losses.reinforce_loss(
        kl_coeff=coeff, kl_estimator=cfg.kl_estimator), optimizer)
  if method in PESSIMISTIC:
    adv_params = proxy_params
    adv_optimizer = _optimizer(config.adversary.learning_rate)
    adv_state = adv_optimizer.init(adv_params)
    adv_update = make_update(setup.scorer, adversary_loss(
        'p3o' if method == 'p3o' else 'prpo', config.eta,
        coeff if method == 'prpo_logz' else None), adv_optimizer)
    p3o_reward = jax.jit(lambda p, s, d: jnp.mean(jax.nn.sigmoid(
        scores(setup.scorer, {'params': p}, s)[:, None] -
        scores(setup.scorer, {'params': p}, d)[None]), -1))

  for step in range(cfg.steps):
    if step % cfg.eval_every == 0:
      evaluate(step, params)
    k = jax.random.fold_in(key, step)
    if method in ('dpo', 'ipo'):
      idx = rng.choice(len(train), size=min(cfg.batch, len(train)), replace=False)
      params, opt_state, _, _ = update(
          params, opt_state, {'chosen': chosen[idx], 'rejected': rejected[idx],
                              'ref_chosen': ref_w[idx], 'ref_rejected': ref_l[idx]}, None, step)
      continue
    seqs, _, lp = setup.sample(params, k, cfg.batch)
    if method == 'reinforce':
      rewards = setup.score(proxy_params, seqs)
    else:
      data = data_seqs[rng.choice(data_seqs.shape[0], size=cfg.batch, replace=False)]
      idx = rng.choice(len(train), size=min(cfg.batch, len(train)), replace=False)
      policy = (ref_pool[rng.choice(ref_pool.shape[0], size=config.adversary.K, replace=False)]
                if method == 'prpo_logz' else seqs)
      for _ in range(config.adversary.steps_per_policy_step):
        adv_params, adv_state, _, _ = adv_update(
            adv_params, adv_state, {'policy': policy, 'data': data, 'chosen': chosen[idx],
                                    'rejected': rejected[idx]}, None, step)
      rewards = (p3o_reward(adv_params, seqs, data) if method == 'p3o'
                 else setup.score(adv_params, seqs))
    curves['train_reward'].append(float(np.mean(rewards)))
    params, opt_state, _, _ = update(params, opt_state, rl_batch(seqs, lp, rewards),
                                     {'reference': mu_params}, step)
  evaluate(cfg.steps, params)
  return curves


def _run_config(config):
  return json.loads(config.to_json())


def _check(config):
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown or not config.methods:
    raise ConfigError(f'config.methods={tuple(config.methods)}; expected a non-empty subset of '
                      f'{METHODS}.')
  if not config.eta > 0:
    raise ConfigError(f'config.eta={config.eta} must be > 0.')
  if config.adversary.K < 1:
    raise ConfigError(f'config.adversary.K={config.adversary.K} must be >= 1.')
  if not 0 < config.data.heldout_fraction < 1:
    raise ConfigError(f'config.data.heldout_fraction={config.data.heldout_fraction} must be '
                      'in (0, 1).')


def run(config, workdir):
  """Runs (or reuses) every stage and run, then writes the table, JSON and plots."""
  _check(config)
  root = workdir_lib.path(workdir)
  (root / 'runs').mkdir(parents=True, exist_ok=True)
  setup = Setup(config)
  start = time.time()
  stage_config = {k: _run_config(config)[k] for k in
                  ('seed', 'task', 'model', 'sft', 'data', 'reward_model')}
  stage_file = root / 'stages.json'
  fresh = (not stage_file.exists() or
           json.loads(stage_file.read_text())['config'] != stage_config)
  key = jax.random.key(config.seed)
  mu_path, proxy_path, data_path = root / 'mu.msgpack', root / 'proxy.msgpack', root / 'prefs.jsonl'
  timings = {}
  if fresh:
    t0 = time.time()
    _save(mu_path, train_mu(setup, jax.random.fold_in(key, 0)))
    timings['mu_sft'] = time.time() - t0
  mu_params = _load(mu_path, setup.init(jax.random.fold_in(key, 0)))
  if fresh:
    build_dataset(setup, mu_params, data_path)
  pairs = preference.load_preferences(str(data_path))
  n_heldout = max(1, int(round(config.data.heldout_fraction * len(pairs))))
  train, heldout = pairs[n_heldout:], pairs[:n_heldout]
  if fresh:
    t0 = time.time()
    proxy_params, rm_stats = fit_reward_model(setup, mu_params, train, heldout,
                                              jax.random.fold_in(key, 1))
    _save(proxy_path, proxy_params)
    timings['reward_model'] = time.time() - t0
    workdir_lib.write_text(stage_file, json.dumps({'config': stage_config, 'rm': rm_stats,
                                                   'timings_s': timings}))
  stages = json.loads(stage_file.read_text())
  proxy_params = _load(proxy_path, setup.init_scorer(jax.random.fold_in(key, 1), mu_params))
  data_seqs = jnp.asarray(encode(setup.tokenizer, sorted({y for _, c, r in train for y in (c, r)}),
                                 setup.length))
  ref_pool = setup.sample(mu_params, jax.random.fold_in(key, 2), config.adversary.pool)[0]
  logging.info('repro_pessimism: reward model %s', stages['rm'])
  run_config = _run_config(config)
  for k in ('methods', 'seeds', 'kl_coeffs', 'pessimistic_kl_coeffs'):  # not a run's own
    run_config.pop(k)
  runs = {}
  for name, (method, coeff) in run_names(config).items():
    for seed in config.seeds:
      path = root / 'runs' / f'{name}_s{seed}.json'
      if path.exists():
        saved = json.loads(path.read_text())
        if saved['config'] == run_config:
          runs.setdefault(name, []).append(saved)
          continue
      t0 = time.time()
      curves = train_policy(setup, method, coeff, mu_params, proxy_params, train, data_seqs,
                            ref_pool, seed)
      saved = {'config': run_config, 'method': method, 'coeff': coeff, 'seed': seed,
               'seconds': round(time.time() - t0, 1), 'curves': curves}
      logging.info('repro_pessimism: %s seed %d: gold %.2f -> %.2f (peak %.2f), proxy %.2f, '
                   'KL %.2f (%.0fs)', name, seed, curves['gold'][0], curves['gold'][-1],
                   max(curves['gold']), curves['proxy'][-1], curves['kl'][-1], saved['seconds'])
      if workdir_lib.is_primary():
        workdir_lib.write_text(path, json.dumps(saved))
      runs.setdefault(name, []).append(saved)
  results = analyse(setup, stages, runs)
  results['total_s'] = round(time.time() - start, 1)
  results['compute_s'] = round(sum(stages['timings_s'].values()) + sum(
      s['seconds'] for saved in runs.values() for s in saved), 1)
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, runs, root)
  logging.info('repro_pessimism:\n%s', report(results))
  return results


# ---------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------
def _mean_curve(saved, key):
  return np.mean([s['curves'][key] for s in saved], axis=0)


def analyse(setup, stages, runs):
  """Peak and final gold per run (seed-mean curves) and the done-when checks."""
  task = setup.task
  results = {'task': dataclasses.asdict(task),
             'gold_optimum': float(task.max_good_len), 'reward_model': stages['rm'],
             'runs': {}}
  for name, saved in runs.items():
    gold, proxy, kl = (_mean_curve(saved, k) for k in ('gold', 'proxy', 'kl'))
    peak = int(np.argmax(gold))
    results['runs'][name] = {
        'method': saved[0]['method'], 'coeff': saved[0]['coeff'],
        'seeds': [s['seed'] for s in saved], 'seconds': [s['seconds'] for s in saved],
        'gold_start': float(gold[0]), 'gold_peak': float(gold[peak]),
        'peak_step': int(saved[0]['curves']['step'][peak]), 'gold_final': float(gold[-1]),
        'proxy_at_peak': float(proxy[peak]), 'proxy_final': float(proxy[-1]),
        'kl_final': float(kl[-1]), 'length_final': float(_mean_curve(saved, 'length')[-1]),
        'final_over_peak': float(gold[-1] / gold[peak]) if gold[peak] > 0 else None,
        'gold_peak_per_seed': [max(s['curves']['gold']) for s in saved],
        'gold_final_per_seed': [s['curves']['gold'][-1] for s in saved]}
  r = results['runs']
  baselines = {n: v for n, v in r.items() if v['method'] not in PESSIMISTIC}
  reinforce = {n: v for n, v in r.items() if v['method'] == 'reinforce'}
  checks = {}
  if reinforce:
    low = min(reinforce, key=lambda n: reinforce[n]['coeff'])
    v = reinforce[low]
    checks['low_kl_baseline_hacked'] = {
        'run': low, 'proxy_rises_after_gold_peak': v['proxy_final'] > v['proxy_at_peak'],
        'gold_falls_after_peak': v['gold_final'] < v['gold_peak'] - 0.05 * abs(v['gold_peak'])}
  best_baseline = max((v['gold_peak'] for v in baselines.values()), default=None)
  for name, v in r.items():
    if v['method'] in PESSIMISTIC:
      checks[name] = {
          'final_ge_95pct_of_peak': v['gold_final'] >= 0.95 * v['gold_peak'],
          'best_ge_best_baseline_best': (None if best_baseline is None
                                         else v['gold_peak'] >= best_baseline)}
  results['best_baseline_peak'] = best_baseline
  results['checks'] = checks
  return results


def report(results) -> str:
  """The table of peak and final gold per run (results.md)."""
  rm = results['reward_model']
  lines = [f"Gold optimum {results['gold_optimum']:g}. Proxy reward model: "
           f"{rm['train_pairs']} training pairs, held-out accuracy "
           f"{rm['heldout_accuracy_vs_labels']:.3f} against the BT labels (the gold reward's "
           f"own accuracy on them: {rm['bayes_accuracy_vs_labels']:.3f} expected), "
           f"{rm['heldout_accuracy_vs_gold_order']:.3f} against the gold order "
           f"({rm['heldout_pairs']} held-out pairs).", '',
           'Curves are means over seeds; sd = spread of the per-seed final gold.', '',
           '| run | coeff (KL β; DPO/IPO β) | seeds | gold start | gold peak (step) | '
           'gold final | final/peak | proxy at peak → final | KL(π‖μ) final | length final |',
           '|---|---|---|---|---|---|---|---|---|---|']
  spread = lambda xs: f' (sd {np.std(xs):.2f})' if len(xs) > 1 else ''
  for name, v in results['runs'].items():
    ratio = '–' if v['final_over_peak'] is None else f"{v['final_over_peak']:.2f}"
    lines.append(f"| {name} | {v['coeff']:g} | {v['seeds']} | {v['gold_start']:.2f} | "
                 f"{v['gold_peak']:.2f} ({v['peak_step']}) | {v['gold_final']:.2f}"
                 f"{spread(v['gold_final_per_seed'])} | {ratio} | "
                 f"{v['proxy_at_peak']:.2f} → {v['proxy_final']:.2f} | {v['kl_final']:.2f} | "
                 f"{v['length_final']:.1f} |")
  lines += ['', 'Done-when checks: ' + json.dumps(results['checks']),
            f"Best baseline peak gold: {results['best_baseline_peak']}.",
            f"Compute: {results['compute_s'] / 60:.1f} min (stages and runs as first computed; "
            f"this call {results['total_s'] / 60:.1f} min)."]
  return '\n'.join(lines) + '\n'


def plot(results, runs, root):
  """Per method: gold and proxy against steps and against KL(π‖μ); all runs on one
  summary figure (gold against steps and against KL)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  optimum = results['gold_optimum']
  by_method = {}
  for name, v in results['runs'].items():
    by_method.setdefault(v['method'], []).append(name)

  def save(fig, path):
    fig.tight_layout()
    with path.open('wb') as f:
      fig.savefig(f, dpi=100)
    plt.close(fig)

  for method, names in by_method.items():
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
      steps = runs[name][0]['curves']['step']
      gold, proxy, kl = (_mean_curve(runs[name], k) for k in ('gold', 'proxy', 'kl'))
      for ax, x in zip(axes, (steps, kl)):
        ax.plot(x, gold, '-', color=f'C{i}', label=f'{name} gold')
        ax.plot(x, proxy, '--', color=f'C{i}', label=f'{name} proxy')
    for ax, xlabel in zip(axes, ('optimisation step', 'KL(π ‖ μ) (nats per response)')):
      ax.axhline(optimum, color='k', lw=0.6, ls=':', label='gold optimum')
      ax.set(xlabel=xlabel, ylabel='reward (mean over samples)')
      ax.legend(fontsize=7)
    fig.suptitle(f'{method}: gold (solid) and proxy (dashed) reward', fontsize=10)
    save(fig, root / f'pessimism_{method}.png')

  fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
  colors = plt.cm.tab20(np.linspace(0, 1, 20))
  for i, (name, saved) in enumerate(runs.items()):
    steps = saved[0]['curves']['step']
    gold, kl = _mean_curve(saved, 'gold'), _mean_curve(saved, 'kl')
    style = '-' if results['runs'][name]['method'] in PESSIMISTIC else '--'
    axes[0].plot(steps, gold, style, color=colors[i % 20], label=name)
    axes[1].plot(kl, gold, style, color=colors[i % 20], label=name)
  for ax, xlabel in zip(axes, ('optimisation step', 'KL(π ‖ μ)')):
    ax.axhline(optimum, color='k', lw=0.6, ls=':')
    ax.set(xlabel=xlabel, ylabel='gold reward')
  axes[1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
  fig.suptitle('gold reward (mean over seeds): baselines (dashed) and pessimistic methods '
               '(solid); dotted: the gold optimum', fontsize=10)
  save(fig, root / 'pessimism.png')
