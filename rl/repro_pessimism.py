"""Job ``repro_pessimism``: preference hacking and pessimism (PRPO, P3O; arXiv:2503.06810,
PAPERS.md §7) in miniature, on the exact-gold setting of ``rl.envs.prefs``.

Stages 1–3 are drawn from a stage seed and the whole pipeline runs once per seed of
``config.stage_seeds`` (``run_stage_seed``), each in ``<workdir>/stage<seed>`` with its
stages cached (``configs/repro/pessimism.py``):
  1. μ: a tiny Llama (byte tokenizer) fine-tuned on μ's demonstrations (``lm_loss``).
  2. D: ``pairs`` pairs sampled from μ, labelled by Bradley–Terry on the gold reward
     (``prefs.label_pairs``), written as ``prefs.jsonl`` and read back with
     ``preference.load_preferences``; a held-out fraction is kept for accuracy.
  3. The proxy reward model: ``WithValueHead`` on the μ trunk, score = value at the last
     token, fit by ``preference.bt_nll``. P3O's pairwise preference model
     (``config.preference_model``): the same kind of scalar-head model g reading both
     responses jointly, ``[BOS y EOS y′ EOS]`` (``join_pairs``), antisymmetrised,
     ``logit P(y ≻ y′) = g(y, y′) − g(y′, y)``, fit on D by the same NLL (``kind='pair'``,
     cached as ``pair_model.*``); ``kind='difference'`` uses ``σ(f(y) − f(y′))`` with f
     the proxy instead. Both report held-out accuracy.
  4. Policy runs, each from μ, ``steps`` updates:
     * ``reinforce_kl<β>``: REINFORCE (``losses.reinforce_loss``, leave-one-out baseline)
       against the proxy with KL to μ (the step argument ``reference``), swept over β;
     * ``dpo`` / ``ipo``: ``preference.dpo_loss`` / ``ipo_loss`` on D's training pairs;
     * ``prpo`` (``prpo_logz`` with the log-partition form): per step one update of an
       adversarial reward r (from the proxy) on ``preference.prpo_reward_loss``, then one
       REINFORCE update against r with KL to μ;
     * ``p3o``: the same with the preference model (from its fit on D) on
       ``preference.p3o_preference_loss``, on pairs (y ~ π, y′ ∈ D); the policy's reward for
       y is the mean of ``P(y ≻ y′)`` over ``comparisons`` responses y′ of D.
     PRPO and P3O run at ``eta`` over ``pessimistic_kl_coeffs`` and at every η of
     ``eta_sweep`` over its KL coefficients (``<method>_kl<β>_eta<η>``), on the first stage
     seed only unless ``eta_sweep.all_stage_seeds``. Every run for each policy seed of
     ``config.seeds``.
Every ``eval_every`` steps a fresh batch from the policy (the same keys for every run)
gives the gold reward, the proxy reward and KL(π || μ) (the mean over samples of
``Σ_t log π − log μ``, an unbiased sequence-level estimate).

Outputs per stage seed: ``runs/<run>.json`` (curves; a rerun skips a run whose own fields,
``_run_key``, are unchanged), ``results.json``, ``results.md`` (peak and final gold per run,
the done-when checks) and ``pessimism_<method>.png`` / ``pessimism.png`` /
``pessimism_eta.png`` (gold against steps per η). In the workdir: ``results.md`` /
``results.json`` with the per-stage-seed table and the summary across stage seeds
(``summarise``: mean ± sd, and in how many stage seeds each check holds) and
``pessimism_stage_seeds.png``.
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
from training import figures
from training import losses as train_losses, metrics as metrics_lib, tokenizers
from training import trainer as trainer_lib
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


def join_pairs(first, second):
  """Pairs of sequences [N, T] -> the joint sequences [N, 2T − 1] ``BOS y EOS y′ EOS``
  (padding after): EOS never occurs inside a response, so it separates the two."""
  n_first = jnp.sum(first != 0, axis=-1, keepdims=True)
  n_second = jnp.sum(second != 0, axis=-1, keepdims=True)
  t = first.shape[1]
  pos = jnp.arange(2 * t - 1)[None]
  from_first = jnp.take_along_axis(first, jnp.minimum(pos, t - 1), axis=1)
  j = pos - n_first + 1  # index into ``second`` (its BOS at 0 is skipped)
  from_second = jnp.take_along_axis(second, jnp.clip(j, 0, t - 1), axis=1)
  return jnp.where(pos < n_first, from_first, jnp.where(j < n_second, from_second, 0))


def preference_logits(scorer, variables, first, second, kind):
  """The logit of ``P(y ≻ y′)`` for pairs (``first``, ``second`` [N, T]) [N].

  ``kind='pair'``: a pairwise model g reads both responses jointly (``join_pairs``) and is
  antisymmetrised, ``g(y, y′) − g(y′, y)``, so ``P(y ≻ y′) + P(y′ ≻ y) = 1`` and
  ``P(y ≻ y) = 1/2`` for any parameters. ``kind='difference'``: ``f(y) − f(y′)`` with f a
  scalar score (Bradley–Terry; its fit on D is the proxy reward model's)."""
  n = first.shape[0]
  if kind == 'pair':
    both = jnp.concatenate([join_pairs(first, second), join_pairs(second, first)])
  elif kind == 'difference':
    both = jnp.concatenate([first, second])
  else:
    raise ValueError(f"kind={kind!r}; expected 'pair' or 'difference'.")
  s = scores(scorer, variables, both)
  return s[:n] - s[n:]


# ---------------------------------------------------------------------------------------
# Trainer-contract losses (``training.losses``): loss_fn(model, variables, batch, ctx).
# ---------------------------------------------------------------------------------------
def _split(x, sizes):
  return jnp.split(x, np.cumsum(sizes)[:-1])


def preference_fit_loss(kind):
  """NLL of the labels on pairs (``chosen``, ``rejected`` [N, T]): ``−log σ(logit(y_w ≻
  y_l))`` (``preference_logits``); with ``kind='difference'`` the Bradley–Terry reward
  model's loss."""
  def loss_fn(model, variables, batch, ctx):
    del ctx
    logit = preference_logits(model, variables, batch['chosen'], batch['rejected'], kind)
    return preference.bt_nll(logit, jnp.zeros_like(logit)), {'accuracy': jnp.mean(logit > 0)}, {}
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


def adversary_loss(method, eta, log_partition_beta=None, kind='pair'):
  """The adversary's objective on ``chosen``/``rejected`` (D's pairs) and ``policy``,
  ``data`` [N, T]. PRPO's reward model: ``policy`` holds the policy's samples (for
  ``prpo_logz``: K samples of μ) and ``data`` responses of D. P3O's preference model (of
  ``kind``, ``preference_logits``): row i of ``policy`` and of ``data`` is one pair
  (y ~ π, y′ ∈ D)."""
  def loss_fn(model, variables, batch, ctx):
    del ctx
    if method == 'p3o':
      n = batch['policy'].shape[0]
      logit = preference_logits(model, variables,
                                jnp.concatenate([batch['policy'], batch['chosen']]),
                                jnp.concatenate([batch['data'], batch['rejected']]), kind)
      logit_pol, logit_d = logit[:n], logit[n:]
      loss = preference.p3o_preference_loss(jax.nn.sigmoid(logit_pol), logit_d, eta)
      return loss, {'bt_nll': preference.bt_nll(logit_d, jnp.zeros_like(logit_d)),
                    'gap': jnp.mean(jax.nn.sigmoid(logit_pol)) - 0.5}, {}
    parts = [batch[k] for k in ('policy', 'data', 'chosen', 'rejected')]
    s_pol, s_data, s_w, s_l = _split(scores(model, variables, jnp.concatenate(parts)),
                                     [p.shape[0] for p in parts])
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
    self._logit = jax.jit(lambda p, a, b, kind: preference_logits(
        self.scorer, {'params': p}, a, b, kind), static_argnums=3)
    self._compiled = {}

  def compiled(self, name, build):
    """``build()`` (a jit-compiled function) once per ``name`` for the whole job: runs and
    stage seeds with the same loss and settings share one compilation."""
    if name not in self._compiled:
      self._compiled[name] = build()
    return self._compiled[name]

  def init(self, key):
    dummy = jnp.zeros((1, self.length), jnp.int32)
    return nn.unbox(jax.jit(self.model.init)(key, dummy)['params'])

  def init_scorer(self, key, base_params):
    dummy = jnp.zeros((1, self.length), jnp.int32)
    head = nn.unbox(jax.jit(self.scorer.init)(key, dummy)['params'])['value_head']
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

  def logit(self, params, first, second, kind):
    return self._logit(params, first, second, kind)


def _optimizer(learning_rate):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def _save(path, tree):
  if workdir_lib.is_primary():
    with path.open('wb') as f:
      f.write(flax.serialization.to_bytes(tree))


def _load(path, template):
  return flax.serialization.from_bytes(template, path.read_bytes())


def train_mu(setup, seed):
  """μ: the tiny Llama fine-tuned on μ's demonstrations (``lm_loss``), from stage seed
  ``seed``."""
  cfg = setup.config.sft
  rng = np.random.default_rng(seed)
  params = setup.init(jax.random.fold_in(jax.random.key(seed), 0))
  optimizer = _optimizer(cfg.learning_rate)
  opt_state = optimizer.init(params)
  update = setup.compiled('sft', lambda: make_update(setup.model, train_losses.lm_loss(),
                                                      optimizer))
  for step in range(cfg.steps):
    texts = [prefs.sample_demonstration(setup.task, rng) for _ in range(cfg.batch)]
    batch = lm_batch(jnp.asarray(encode(setup.tokenizer, texts, setup.length)))
    params, opt_state, loss, _ = update(params, opt_state, batch, None, step)
    if step % 100 == 0 or step == cfg.steps - 1:
      logging.info('mu sft step %d: nll/token %.3f', step, float(loss))
  return params


def build_dataset(setup, seed, mu_params, path):
  """``pairs`` pairs from μ, Bradley–Terry-labelled on gold (stage seed ``seed``), written
  as JSONL at ``path``."""
  cfg = setup.config.data
  rng = np.random.default_rng([seed, 1])
  key = jax.random.key(seed + 1000)
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


def fit_preference_model(setup, seed, mu_params, train, heldout, key, kind, cfg, stream):
  """A scalar-head model on μ's trunk fit on D's training pairs by ``preference_fit_loss``
  (``kind='difference'``: the proxy reward model; ``'pair'``: P3O's pairwise model) with the
  settings ``cfg`` (steps, batch, learning_rate), the head initialised from ``key`` and the
  minibatch stream ``stream`` of stage seed ``seed``; returns (params, held-out
  accuracies)."""
  params = setup.init_scorer(key, mu_params)
  optimizer = _optimizer(cfg.learning_rate)
  opt_state = optimizer.init(params)
  update = setup.compiled(('fit', kind, cfg.learning_rate), lambda: make_update(
      setup.scorer, preference_fit_loss(kind), optimizer))
  chosen, rejected = pair_arrays(setup, train)
  rng = np.random.default_rng([seed, stream])
  for step in range(cfg.steps):
    idx = rng.choice(len(train), size=min(cfg.batch, len(train)), replace=False)
    params, opt_state, loss, _ = update(params, opt_state,
                                        {'chosen': chosen[idx], 'rejected': rejected[idx]},
                                        None, step)
  wins = np.asarray(setup.logit(params, *pair_arrays(setup, heldout), kind)) > 0
  g_w = setup.gold([c for _, c, _ in heldout])
  g_l = setup.gold([r for _, _, r in heldout])
  decided = g_w != g_l
  stats = {'kind': kind, 'heldout_pairs': len(heldout), 'train_pairs': len(train),
           'final_train_bt_nll': float(loss),
           'heldout_accuracy_vs_labels': float(np.mean(wins)),
           'heldout_accuracy_vs_gold_order': float(np.mean(
               wins[decided] == (g_w > g_l)[decided])),
           'bayes_accuracy_vs_labels': float(np.mean(
               np.where(decided, 1 / (1 + np.exp(-np.abs(g_w - g_l))), 0.5)))}
  return params, stats


def _kl_label(beta):
  return f'{beta:g}'


def run_names(config, eta_sweep=True):
  """{run name: (method, KL coefficient or DPO/IPO beta, η or None)} for ``config.methods``
  and, if ``eta_sweep``, the η sweep (``config.eta_sweep``: names ``<method>_kl<β>_eta<η>``)."""
  names = {}
  for method in config.methods:
    if method == 'reinforce':
      names.update({f'reinforce_kl{_kl_label(b)}': (method, float(b), None)
                    for b in config.kl_coeffs})
    elif method in ('dpo', 'ipo'):
      names[method] = (method, float(config.dpo_beta), None)
    else:
      names.update({f'{method}_kl{_kl_label(b)}': (method, float(b), float(config.eta))
                    for b in config.pessimistic_kl_coeffs})
  sweep = config.eta_sweep
  for method in sweep.methods if eta_sweep else ():
    if method in config.methods:
      names.update({f'{method}_kl{_kl_label(b)}_eta{e:g}': (method, float(b), float(e))
                    for b in sweep.kl_coeffs for e in sweep.etas})
  return names


def train_policy(setup, method, coeff, eta, mu_params, proxy_params, pref_params, train,
                 data_seqs, ref_pool, seed):
  """One run -> curves {step, gold, proxy, kl, ...} evaluated every ``eval_every`` steps.
  ``eta``: PRPO/P3O's pessimism strength 1/η; ``pref_params``: P3O's preference model (of
  ``config.preference_model.kind``), the adversary's start."""
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
    update = setup.compiled((method, coeff), lambda: make_update(
        setup.model, offline_preference_loss(method, coeff), optimizer))
    ref_w, ref_l = setup.logp(mu_params, chosen), setup.logp(mu_params, rejected)
  else:
    update = setup.compiled(('reinforce', coeff), lambda: make_update(
        setup.model, losses.reinforce_loss(kl_coeff=coeff, kl_estimator=cfg.kl_estimator),
        optimizer))
  if method in PESSIMISTIC:
    kind, comparisons = config.preference_model.kind, config.preference_model.comparisons
    adv_params = pref_params if method == 'p3o' else proxy_params
    adv_optimizer = _optimizer(config.adversary.learning_rate)
    adv_state = adv_optimizer.init(adv_params)
    logz_beta = coeff if method == 'prpo_logz' else None
    adv_update = setup.compiled(('adversary', method, eta, logz_beta), lambda: make_update(
        setup.scorer, adversary_loss('p3o' if method == 'p3o' else 'prpo', eta, logz_beta,
                                     kind), adv_optimizer))
    # P3O: sample i meets responses i, i + 1, ..., i + comparisons − 1 of D's batch.
    partner = (np.arange(cfg.batch)[:, None] + np.arange(comparisons)[None]) % cfg.batch
    p3o_reward = setup.compiled('p3o_reward', lambda: jax.jit(
        lambda p, s, d: jnp.mean(jax.nn.sigmoid(preference_logits(
            setup.scorer, {'params': p}, s, d, kind)).reshape(-1, comparisons), -1)))

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
      if method == 'p3o':
        policy, data = jnp.repeat(seqs, comparisons, axis=0), data[partner.reshape(-1)]
      elif method == 'prpo_logz':
        policy = ref_pool[rng.choice(ref_pool.shape[0], size=config.adversary.K, replace=False)]
      else:
        policy = seqs
      for _ in range(config.adversary.steps_per_policy_step):
        adv_params, adv_state, _, _ = adv_update(
            adv_params, adv_state, {'policy': policy, 'data': data, 'chosen': chosen[idx],
                                    'rejected': rejected[idx]}, None, step)
      rewards = (p3o_reward(adv_params, policy, data) if method == 'p3o'
                 else setup.score(adv_params, seqs))
    curves['train_reward'].append(float(np.mean(rewards)))
    params, opt_state, _, _ = update(params, opt_state, rl_batch(seqs, lp, rewards),
                                     {'reference': mu_params}, step)
  evaluate(cfg.steps, params)
  return curves


def _run_config(config):
  return json.loads(config.to_json())


SWEEP_FIELDS = ('methods', 'seeds', 'stage_seeds', 'kl_coeffs', 'pessimistic_kl_coeffs',
                'eta_sweep')


def _run_key(run_config, method, eta=None):
  """The config fields a run of ``method`` depends on (with its own η, if given): saved with
  the run and compared on a rerun, so changing another method's settings keeps it."""
  key = {k: v for k, v in run_config.items() if k not in SWEEP_FIELDS}
  if method not in PESSIMISTIC:
    for k in ('eta', 'adversary'):
      key.pop(k, None)
  elif eta is not None:
    key['eta'] = eta
  if method != 'p3o':
    key.pop('preference_model', None)
  return key


def _check(config):
  for name in ('stage_seeds', 'seeds'):
    seeds = tuple(config[name])
    if not seeds or len(set(seeds)) != len(seeds):
      raise ConfigError(f'config.{name}={seeds}; expected a non-empty tuple of distinct '
                        'seeds.')
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown or not config.methods:
    raise ConfigError(f'config.methods={tuple(config.methods)}; expected a non-empty subset of '
                      f'{METHODS}.')
  for name, etas in (('eta', [config.eta]), ('eta_sweep.etas', config.eta_sweep.etas)):
    bad = [e for e in etas if not e > 0]
    if bad:
      raise ConfigError(f'config.{name} holds {bad[0]}; η must be > 0.')
  if not set(config.eta_sweep.methods) <= set(PESSIMISTIC):
    raise ConfigError(f'config.eta_sweep.methods={tuple(config.eta_sweep.methods)}; expected '
                      f'a subset of {PESSIMISTIC}.')
  if config.adversary.K < 1:
    raise ConfigError(f'config.adversary.K={config.adversary.K} must be >= 1.')
  if config.preference_model.kind not in ('pair', 'difference'):
    raise ConfigError(f'config.preference_model.kind={config.preference_model.kind!r}; '
                      "expected 'pair' or 'difference'.")
  if not 1 <= config.preference_model.comparisons <= config.policy.batch:
    raise ConfigError(f'config.preference_model.comparisons='
                      f'{config.preference_model.comparisons} must be in [1, policy.batch].')
  if not 0 < config.data.heldout_fraction < 1:
    raise ConfigError(f'config.data.heldout_fraction={config.data.heldout_fraction} must be '
                      'in (0, 1).')


def _cached_stage(root, name, stage_config, template, compute):
  """``compute() -> (params, stats)`` cached as ``<name>.msgpack`` + ``<name>.json`` under
  ``stage_config``; returns (params, {'stats', 'seconds'})."""
  meta_path, params_path = root / f'{name}.json', root / f'{name}.msgpack'
  if meta_path.exists() and json.loads(meta_path.read_text())['config'] == stage_config:
    meta = json.loads(meta_path.read_text())
    return _load(params_path, template), meta
  t0 = time.time()
  params, stats = compute()
  meta = {'config': stage_config, 'stats': stats, 'seconds': round(time.time() - t0, 1)}
  _save(params_path, params)
  if workdir_lib.is_primary():
    workdir_lib.write_text(meta_path, json.dumps(meta))
  return params, meta


def run_stage_seed(setup, stage_seed, root, eta_sweep):
  """The pipeline for one stage seed, in its own directory ``root``: μ, D, the proxy and the
  pairwise model from ``stage_seed`` (cached), then every policy run of ``run_names`` (the
  η sweep only if ``eta_sweep``) for each policy seed of ``config.seeds`` (kept in
  ``root/runs``). Writes the stage seed's table, JSON and plots; returns (results, runs)."""
  config = setup.config
  (root / 'runs').mkdir(parents=True, exist_ok=True)
  start = time.time()
  run_config = dict(_run_config(config), seed=stage_seed)
  stage_config = {k: run_config[k] for k in
                  ('seed', 'task', 'model', 'sft', 'data', 'reward_model')}
  stage_file = root / 'stages.json'
  fresh = (not stage_file.exists() or
           json.loads(stage_file.read_text())['config'] != stage_config)
  key = jax.random.key(stage_seed)
  mu_path, proxy_path, data_path = root / 'mu.msgpack', root / 'proxy.msgpack', root / 'prefs.jsonl'
  timings = {}
  if fresh:
    t0 = time.time()
    _save(mu_path, train_mu(setup, stage_seed))
    timings['mu_sft'] = time.time() - t0
  mu_params = _load(mu_path, setup.init(jax.random.fold_in(key, 0)))
  if fresh:
    build_dataset(setup, stage_seed, mu_params, data_path)
  pairs = preference.load_preferences(str(data_path))
  n_heldout = max(1, int(round(config.data.heldout_fraction * len(pairs))))
  train, heldout = pairs[n_heldout:], pairs[:n_heldout]
  if fresh:
    t0 = time.time()
    proxy_params, rm_stats = fit_preference_model(
        setup, stage_seed, mu_params, train, heldout, jax.random.fold_in(key, 1), 'difference',
        config.reward_model, stream=2)
    _save(proxy_path, proxy_params)
    timings['reward_model'] = time.time() - t0
    workdir_lib.write_text(stage_file, json.dumps({'config': stage_config, 'rm': rm_stats,
                                                   'timings_s': timings}))
  stages = json.loads(stage_file.read_text())
  proxy_params = _load(proxy_path, setup.init_scorer(jax.random.fold_in(key, 1), mu_params))
  names = run_names(config, eta_sweep)
  pref_params = proxy_params
  if config.preference_model.kind == 'pair' and any(m == 'p3o' for m, _, _ in names.values()):
    pm = dict(config.preference_model)
    pm.pop('comparisons')
    pref_params, meta = _cached_stage(
        root, 'pair_model', dict(stage_config, preference_model=pm),
        setup.init_scorer(jax.random.fold_in(key, 3), mu_params),
        lambda: fit_preference_model(setup, stage_seed, mu_params, train, heldout,
                                     jax.random.fold_in(key, 3), 'pair',
                                     config.preference_model, stream=4))
    stages = dict(stages, pm=meta['stats'],
                  timings_s=dict(stages['timings_s'], pair_model=meta['seconds']))
    logging.info('repro_pessimism: stage seed %d: pairwise preference model %s', stage_seed,
                 meta['stats'])
  data_seqs = jnp.asarray(encode(setup.tokenizer, sorted({y for _, c, r in train for y in (c, r)}),
                                 setup.length))
  ref_pool = setup.sample(mu_params, jax.random.fold_in(key, 2), config.adversary.pool)[0]
  logging.info('repro_pessimism: stage seed %d: reward model %s', stage_seed, stages['rm'])
  runs = {}
  for name, (method, coeff, eta) in names.items():
    for seed in config.seeds:
      path = root / 'runs' / f'{name}_s{seed}.json'
      if path.exists():
        saved = json.loads(path.read_text())
        if _run_key(saved['config'], method) == _run_key(run_config, method, eta):
          runs.setdefault(name, []).append(dict(saved, eta=eta))
          continue
      t0 = time.time()
      curves = train_policy(setup, method, coeff, eta, mu_params, proxy_params, pref_params,
                            train, data_seqs, ref_pool, seed)
      saved = {'config': _run_key(run_config, method, eta), 'method': method, 'coeff': coeff,
               'eta': eta, 'seed': seed, 'seconds': round(time.time() - t0, 1),
               'curves': curves}
      logging.info('repro_pessimism: stage seed %d, %s seed %d: gold %.2f -> %.2f (peak %.2f), '
                   'proxy %.2f, KL %.2f (%.0fs)', stage_seed, name, seed, curves['gold'][0],
                   curves['gold'][-1], max(curves['gold']), curves['proxy'][-1],
                   curves['kl'][-1], saved['seconds'])
      if workdir_lib.is_primary():
        workdir_lib.write_text(path, json.dumps(saved))
      runs.setdefault(name, []).append(saved)
  results = dict(analyse(setup, stages, runs), stage_seed=stage_seed)
  results['total_s'] = round(time.time() - start, 1)
  results['compute_s'] = round(sum(stages['timings_s'].values()) + sum(
      s['seconds'] for saved in runs.values() for s in saved), 1)
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, runs, root)
  logging.info('repro_pessimism: stage seed %d:\n%s', stage_seed, report(results))
  return results, runs


def run(config, workdir):
  """Runs (or reuses) ``run_stage_seed`` for every seed of ``config.stage_seeds`` (in
  ``<workdir>/stage<seed>``; the η sweep on the first stage seed only unless
  ``eta_sweep.all_stage_seeds``), then writes the per-stage-seed table and the summary across
  stage seeds (``summarise``: results.md, results.json, pessimism_stage_seeds.png)."""
  _check(config)
  root = workdir_lib.path(workdir)
  setup = Setup(config)
  start = time.time()
  per_seed, low_kl_curves, timings = {}, {}, {}
  for i, stage_seed in enumerate(config.stage_seeds):
    t0 = time.time()
    per_seed[stage_seed], runs = run_stage_seed(
        setup, stage_seed, root / f'stage{stage_seed}',
        eta_sweep=i == 0 or config.eta_sweep.all_stage_seeds)
    timings[f'stage seed {stage_seed}'] = time.time() - t0
    low = per_seed[stage_seed]['checks'].get('low_kl_baseline_hacked')
    if low:
      low_kl_curves[str(stage_seed)] = dict(
          {k: _mean_curve(runs[low['run']], k).tolist() for k in ('gold', 'proxy')},
          step=runs[low['run']][0]['curves']['step'], run=low['run'])
  results = {'per_stage_seed': {str(s): r for s, r in per_seed.items()},
             'summary': summarise(per_seed), 'low_kl_curves': low_kl_curves,
             'total_s': round(time.time() - start, 1),
             'timings_s': {k: round(v, 1) for k, v in timings.items()}}
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', stage_seed_report(results))
    plot_stage_seeds(results, root)
  logging.info('repro_pessimism:\n%s', stage_seed_report(results))
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
             'preference_model': stages.get('pm'),
             'runs': {}}
  for name, saved in runs.items():
    gold, proxy, kl = (_mean_curve(saved, k) for k in ('gold', 'proxy', 'kl'))
    peak = int(np.argmax(gold))
    results['runs'][name] = {
        'method': saved[0]['method'], 'coeff': saved[0]['coeff'], 'eta': saved[0]['eta'],
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
    rises = v['proxy_final'] > v['proxy_at_peak']
    falls = v['gold_final'] < v['gold_peak'] - 0.05 * abs(v['gold_peak'])
    checks['low_kl_baseline_hacked'] = {'run': low, 'proxy_rises_after_gold_peak': rises,
                                        'gold_falls_after_peak': falls,
                                        'hacked': rises and falls}
  best_baseline = max((v['gold_peak'] for v in baselines.values()), default=None)
  results['best_baseline_run'] = max(baselines, key=lambda n: baselines[n]['gold_peak'],
                                     default=None)
  results['mu_gold'] = float(np.mean([v['gold_start'] for v in r.values()]))
  for name, v in r.items():
    if v['method'] in PESSIMISTIC:
      checks[name] = {
          'final_ge_95pct_of_peak': v['gold_final'] >= 0.95 * v['gold_peak'],
          'best_ge_best_baseline_best': (None if best_baseline is None
                                         else v['gold_peak'] >= best_baseline)}
  checks['pessimistic_runs_passing_both'] = sorted(
      n for n, c in checks.items() if isinstance(c, dict) and
      c.get('final_ge_95pct_of_peak') and c.get('best_ge_best_baseline_best'))
  results['best_baseline_peak'] = best_baseline
  results['checks'] = checks
  return results


def _mean_sd(values):
  """{'mean', 'sd', 'values'}; sd is the sample standard deviation (ddof 1), 0 for one value."""
  values = [float(v) for v in values]
  return {'mean': float(np.mean(values)), 'values': values,
          'sd': float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _tally(flags):
  flags = [bool(f) for f in flags]
  return {'holds': sum(flags), 'of': len(flags)}


def summarise(per_seed):
  """Across stage seeds ({stage seed: ``analyse`` results}): mean ± sd of the held-out
  accuracies, μ's gold and each run's peak and final gold (over the stage seeds that ran it),
  and in how many stage seeds each done-when check holds."""
  res = list(per_seed.values())
  stages = {'proxy_heldout_accuracy': _mean_sd(
                r['reward_model']['heldout_accuracy_vs_labels'] for r in res),
            'mu_gold': _mean_sd(r['mu_gold'] for r in res)}
  if all(r['best_baseline_run'] for r in res):
    stages['best_baseline_peak'] = _mean_sd(r['best_baseline_peak'] for r in res)
  if all(r['preference_model'] for r in res):
    stages['pair_heldout_accuracy'] = _mean_sd(
        r['preference_model']['heldout_accuracy_vs_labels'] for r in res)
  runs = {}
  for name in dict.fromkeys(n for r in res for n in r['runs']):
    ran = {s: r for s, r in per_seed.items() if name in r['runs']}
    runs[name] = {'stage_seeds': list(ran)}
    for field in ('gold_peak', 'gold_final'):
      runs[name][field] = _mean_sd(r['runs'][name][field] for r in ran.values())
    if name in next(iter(ran.values()))['checks']:
      checks = [r['checks'][name] for r in ran.values()]
      runs[name].update({c: _tally(x[c] for x in checks) for c in
                         ('final_ge_95pct_of_peak', 'best_ge_best_baseline_best')})
      runs[name]['both'] = _tally(name in r['checks']['pessimistic_runs_passing_both']
                                  for r in ran.values())
  hacked = [r['checks']['low_kl_baseline_hacked'] for r in res
            if 'low_kl_baseline_hacked' in r['checks']]
  return {'stage_seeds': list(per_seed), 'stages': stages, 'runs': runs, 'criteria': {
      'low_kl_baseline_hacked': _tally(h['hacked'] for h in hacked),
      'some_pessimistic_run_passes_both': _tally(
          r['checks']['pessimistic_runs_passing_both'] for r in res)}}


def _accuracy_line(name, m):
  return (f"{name} ({m['train_pairs']} training pairs): held-out accuracy "
          f"{m['heldout_accuracy_vs_labels']:.3f} against the BT labels (the gold reward's own "
          f"accuracy on them: {m['bayes_accuracy_vs_labels']:.3f} expected), "
          f"{m['heldout_accuracy_vs_gold_order']:.3f} against the gold order "
          f"({m['heldout_pairs']} held-out pairs).")


def report(results) -> str:
  """The table of peak and final gold per run (results.md)."""
  lines = [f"Gold optimum {results['gold_optimum']:g}.",
           _accuracy_line('Proxy reward model', results['reward_model'])]
  if results['preference_model']:
    lines.append(_accuracy_line('Pairwise preference model (P3O)', results['preference_model']))
  lines += ['', 'Curves are means over seeds; sd = spread of the per-seed final gold.', '',
            '| run | coeff (KL β; DPO/IPO β) | η | seeds | gold start | gold peak (step) | '
            'gold final | final/peak | proxy at peak → final | KL(π‖μ) final | length final |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  spread = lambda xs: f' (sd {np.std(xs):.2f})' if len(xs) > 1 else ''
  for name, v in results['runs'].items():
    ratio = '–' if v['final_over_peak'] is None else f"{v['final_over_peak']:.2f}"
    eta = '–' if v['eta'] is None else f"{v['eta']:g}"
    lines.append(f"| {name} | {v['coeff']:g} | {eta} | {v['seeds']} | {v['gold_start']:.2f} | "
                 f"{v['gold_peak']:.2f} ({v['peak_step']}) | {v['gold_final']:.2f}"
                 f"{spread(v['gold_final_per_seed'])} | {ratio} | "
                 f"{v['proxy_at_peak']:.2f} → {v['proxy_final']:.2f} | {v['kl_final']:.2f} | "
                 f"{v['length_final']:.1f} |")
  lines += ['', 'Done-when checks: ' + json.dumps(results['checks']),
            f"Best baseline peak gold: {results['best_baseline_peak']}.",
            f"Compute: {results['compute_s'] / 60:.1f} min (stages and runs as first computed; "
            f"this call {results['total_s'] / 60:.1f} min)."]
  return '\n'.join(lines) + '\n'


def stage_seed_report(results) -> str:
  """The per-stage-seed table, each run's peak / final gold per stage seed and the summary
  across stage seeds (the job's results.md)."""
  per_seed, summary = results['per_stage_seed'], results['summary']
  pm = lambda x: f"{x['mean']:.2f} ± {x['sd']:.2f}"
  policy_seeds = sorted({s for r in per_seed.values() for v in r['runs'].values()
                         for s in v['seeds']})
  lines = [f'Per stage seed (μ, D, the proxy and the pairwise model); policy seeds '
           f'{policy_seeds}.', '',
           '| stage seed | proxy held-out acc (labels / gold order) | pairwise model acc | '
           'μ gold | low-KL REINFORCE: gold peak (step) → final, proxy at peak → final | hacked | '
           'best baseline (peak) | pessimistic runs: final ≥ 95% of peak / best ≥ best '
           'baseline / both |',
           '|---|---|---|---|---|---|---|---|']
  for seed, r in per_seed.items():
    rm, pair = r['reward_model'], r['preference_model']
    pair_text = '–' if not pair else f"{pair['heldout_accuracy_vs_labels']:.3f}"
    low = r['checks'].get('low_kl_baseline_hacked')
    if low:
      v = r['runs'][low['run']]
      low_text = (f"{low['run']}: {v['gold_peak']:.2f} ({v['peak_step']}) → "
                  f"{v['gold_final']:.2f}, {v['proxy_at_peak']:.2f} → {v['proxy_final']:.2f}")
      hacked = 'yes' if low['hacked'] else 'no'
    else:
      low_text, hacked = '–', '–'
    pess = [c for c in r['checks'].values() if 'final_ge_95pct_of_peak' in c]
    best = (f"{r['best_baseline_run']} ({r['best_baseline_peak']:.2f})"
            if r['best_baseline_run'] else '–')
    lines.append(
        f"| {seed} | {rm['heldout_accuracy_vs_labels']:.3f} / "
        f"{rm['heldout_accuracy_vs_gold_order']:.3f} | {pair_text} | {r['mu_gold']:.2f} | "
        f"{low_text} | {hacked} | {best} | "
        f"{sum(bool(c['final_ge_95pct_of_peak']) for c in pess)} / "
        f"{sum(bool(c['best_ge_best_baseline_best']) for c in pess)} / "
        f"{len(r['checks']['pessimistic_runs_passing_both'])} of {len(pess)} |")
  seeds = list(per_seed)
  lines += ['', 'Gold peak / final per run and stage seed (curves are means over policy '
            'seeds); mean ± sd over the stage seeds that ran it (sd with ddof 1); the checks '
            'count stage seeds.', '',
            '| run | ' + ' | '.join(f'stage seed {s}' for s in seeds) +
            ' | peak | final | final ≥ 95% of peak | best ≥ best baseline | both |',
            '|---|' + '---|' * (len(seeds) + 5)]
  tally = lambda t: f"{t['holds']}/{t['of']}" if t else '–'
  for name, v in summary['runs'].items():
    cells = [(f"{per_seed[s]['runs'][name]['gold_peak']:.2f} / "
              f"{per_seed[s]['runs'][name]['gold_final']:.2f}")
             if name in per_seed[s]['runs'] else '–' for s in seeds]
    lines.append(f"| {name} | {' | '.join(cells)} | {pm(v['gold_peak'])} | "
                 f"{pm(v['gold_final'])} | {tally(v.get('final_ge_95pct_of_peak'))} | "
                 f"{tally(v.get('best_ge_best_baseline_best'))} | {tally(v.get('both'))} |")
  st, crit = summary['stages'], summary['criteria']
  lines += ['', 'Summary over stage seeds (mean ± sd): proxy held-out accuracy '
            f"{pm(st['proxy_heldout_accuracy'])}"
            + (f", pairwise model {pm(st['pair_heldout_accuracy'])}"
               if 'pair_heldout_accuracy' in st else '')
            + f", μ gold {pm(st['mu_gold'])}"
            + (f", best baseline peak {pm(st['best_baseline_peak'])}"
               if 'best_baseline_peak' in st else '') + '.',
            f"Low-KL REINFORCE hacked (proxy up after the gold peak, gold falls > 5%): "
            f"{tally(crit['low_kl_baseline_hacked'])} stage seeds. Some pessimistic run with "
            f"final ≥ 95% of peak and best ≥ the best baseline: "
            f"{tally(crit['some_pessimistic_run_passes_both'])} stage seeds.",
            metrics_lib.wall_time_text(results['total_s'], results['timings_s'])]
  return '\n'.join(lines) + '\n'


def plot(results, runs, root):
  """Per method: gold and proxy against steps and against KL(π‖μ); all runs on one
  summary figure (gold against steps and against KL)."""
  plt = figures.pyplot()
  optimum = results['gold_optimum']
  by_method = {}
  for name, v in results['runs'].items():
    by_method.setdefault(v['method'], []).append(name)

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
    figures.save(fig, root / f'pessimism_{method}.png', dpi=100)

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
  figures.save(fig, root / 'pessimism.png', dpi=100)

  sweep = sorted({(v['method'], v['coeff']) for n, v in results['runs'].items()
                  if v['method'] in PESSIMISTIC and n.rsplit('_', 1)[-1].startswith('eta')})
  if sweep:
    fig, axes = plt.subplots(1, len(sweep), figsize=(4 * len(sweep), 3.6), squeeze=False)
    for ax, (method, coeff) in zip(axes[0], sweep):
      same = sorted((v['eta'], n) for n, v in results['runs'].items()
                    if (v['method'], v['coeff']) == (method, coeff))
      for i, (eta, name) in enumerate(same):
        ax.plot(runs[name][0]['curves']['step'], _mean_curve(runs[name], 'gold'),
                color=f'C{i}', label=f'η = {eta:g}')
      if results['best_baseline_peak'] is not None:
        ax.axhline(results['best_baseline_peak'], color='k', lw=0.8, ls='--',
                   label='best baseline peak')
      ax.set(title=f'{method}, KL β = {coeff:g}', xlabel='optimisation step',
             ylabel='gold reward')
      ax.legend(fontsize=7)
    figures.save(fig, root / 'pessimism_eta.png', dpi=100)


def plot_stage_seeds(results, root):
  """pessimism_stage_seeds.png: per stage seed, the low-KL REINFORCE run's gold and proxy
  against steps (left), and every run's peak and final gold (right)."""
  plt = figures.pyplot()
  per_seed = results['per_stage_seed']
  names = list(results['summary']['runs'])
  fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={'width_ratios': [1, 2]})
  for i, (seed, c) in enumerate(results['low_kl_curves'].items()):
    axes[0].plot(c['step'], c['gold'], '-', color=f'C{i}', label=f'stage seed {seed} gold')
    axes[0].plot(c['step'], c['proxy'], '--', color=f'C{i}', label=f'stage seed {seed} proxy')
    axes[0].set_title(f"{c['run']}: gold (solid), proxy (dashed)", fontsize=9)
  axes[0].set(xlabel='optimisation step', ylabel='reward')
  axes[0].legend(fontsize=7)
  x = np.arange(len(names))
  for i, (seed, r) in enumerate(per_seed.items()):
    ran = [j for j, n in enumerate(names) if n in r['runs']]
    offset = 0.1 * (i - (len(per_seed) - 1) / 2)
    axes[1].plot(x[ran] + offset, [r['runs'][names[j]]['gold_peak'] for j in ran], 'o',
                 color=f'C{i}', label=f'stage seed {seed}: peak')
    axes[1].plot(x[ran] + offset, [r['runs'][names[j]]['gold_final'] for j in ran], 'x',
                 color=f'C{i}', label=f'stage seed {seed}: final')
  axes[1].set_xticks(x, names, rotation=60, ha='right', fontsize=7)
  axes[1].set(ylabel='gold reward')
  axes[1].axhline(next(iter(per_seed.values()))['gold_optimum'], color='k', lw=0.6, ls=':')
  axes[1].legend(fontsize=7, ncol=len(per_seed))
  fig.suptitle('Stage seeds (μ, D, proxy, pairwise model): low-KL hacking and each run\'s '
               'peak (o) and final (x) gold; dotted: the gold optimum', fontsize=10)
  figures.save(fig, root / 'pessimism_stage_seeds.png', dpi=100)
