"""Job ``repro_pav_toy``: the planted-subsequence toy of "Rewarding progress"
(arXiv:2410.08146, App. B; PAPERS.md §8): online RL with outcome reward alone against the
effective reward Q^pi + alpha A^mu of provers mu_gamma (``rl.envs.planted``, ``rl.pav``).

Policy: an MLP over one-hot (position h, automaton state j) -> next-token logits, output
layer zero-initialised (the initial policy is uniform). The paper's policy sees the raw
prefix; the state is a sufficient statistic of the prefix for the reward, and with it the
policy's success probability is exact (``planted.success_probability`` on its [length,
m + 1, V] table), not sampled.

REINFORCE (Williams 1992), per step: batch of ``batch`` sampled responses, per token h
  advantage_h = (R - b) + alpha A^mu(s_h, a_h),   loss = -mean_b sum_h advantage_h log pi(a_h)
with b the leave-one-out batch mean of the outcome R (``rl.losses.group_advantages``,
RLOO) and A^mu exact from the prover's dynamic programme. ``alpha = 0`` is outcome-only RL.
Seeds are vmapped; each variant (outcome-only, each gamma) is saved when done
(``runs/<variant>.json``) and skipped by a rerun with the same config.

Outputs in the workdir: ``results.md`` (table), ``results.json``, ``pav_toy.png`` (success
against sampled responses, mean +- std over seeds) and ``pav_toy_final.png`` (final success
against gamma).
"""
import json
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config_errors import ConfigError
from rl import losses, pav
from rl.envs import planted
from training import figures
from training import workdir as workdir_lib


OPTIMIZERS = {'adam': optax.adam, 'sgd': optax.sgd}


def task_from_config(config) -> planted.PlantedTask:
  """The task named by ``config``'s vocab_size, length, target_len and task_seed."""
  return planted.make_task(config.vocab_size, config.length, config.target_len,
                           config.task_seed)


# ---------------------------------------------------------------------------------------
# Policy and training.
# ---------------------------------------------------------------------------------------
def init_policy(key, task, hidden):
  """MLP parameters; the zero output layer makes the initial policy uniform."""
  n_in = task.length + task.n_states
  return {'w1': jax.random.normal(key, (n_in, hidden)) / np.sqrt(n_in),
          'b1': jnp.zeros(hidden),
          'w2': jnp.zeros((hidden, task.vocab_size)),
          'b2': jnp.zeros(task.vocab_size)}


def policy_logits(params, task):
  """Logits [length, m + 1, V] for every (position, state)."""
  h, j = np.meshgrid(np.arange(task.length), np.arange(task.n_states), indexing='ij')
  x = jnp.concatenate([jax.nn.one_hot(h, task.length), jax.nn.one_hot(j, task.n_states)], -1)
  return jax.nn.relu(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']


def _sample(key, logits, task, batch):
  """Responses [batch, length] and their states [batch, length + 1] under ``logits``."""
  delta = jnp.asarray(task.transitions)

  def step(s, xs):
    h, k = xs
    a = jax.random.categorical(k, logits[h, s])
    return delta[s, a], (a, s)

  keys = jax.random.split(key, task.length)
  final, (tokens, path) = jax.lax.scan(step, jnp.zeros(batch, jnp.int32),
                                       (jnp.arange(task.length), keys))
  return tokens.T, jnp.concatenate([path.T, final[:, None]], axis=1)


def make_train(task, config, alpha):
  """``train(seed_keys [S], value_table [length + 1, m + 1]) -> success [S, steps + 1]``: the
  exact success probability of the policy before each step and after the last, training
  on the effective reward with prover values ``value_table`` and weight ``alpha``."""
  optimizer = OPTIMIZERS[config.optimizer](config.learning_rate)
  steps = jnp.arange(task.length)

  def loss_fn(params, tokens, path, value_table):
    logits = policy_logits(params, task)[steps, path[:, :-1]]  # [B, length, V]
    logp = losses.token_logprobs(logits, tokens)
    rewards = planted.outcome(task, path)
    q_pi = losses.group_advantages(rewards, jnp.zeros_like(tokens[:, 0]), leave_one_out=True)
    a_mu = pav.step_advantages(planted.trajectory_values(value_table, path))
    advantages = pav.effective_rewards(q_pi, a_mu, alpha)
    return -jnp.mean(jnp.sum(jax.lax.stop_gradient(advantages) * logp, axis=-1))

  def one_seed(key, value_table):
    init_key, key = jax.random.split(key)
    params = init_policy(init_key, task, config.hidden)
    opt_state = optimizer.init(params)

    def step(carry, k):
      params, opt_state = carry
      logits = policy_logits(params, task)
      success = planted.success_probability(task, jax.nn.softmax(logits))
      tokens, path = _sample(jax.random.fold_in(key, k), logits, task, config.batch)
      grads = jax.grad(loss_fn)(params, tokens, path, value_table)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), success

    (params, _), curve = jax.lax.scan(step, (params, opt_state), jnp.arange(config.steps))
    final = planted.success_probability(task, jax.nn.softmax(policy_logits(params, task)))
    return jnp.concatenate([curve, final[None]])

  return jax.jit(jax.vmap(one_seed, in_axes=(0, None)))


def variants(config):
  """{name: (gamma or None, alpha)}: outcome-only RL, then each prover."""
  out = {'outcome': (None, 0.0)}
  out.update({f'gamma_{g:g}': (float(g), float(config.alpha)) for g in config.gammas})
  return out


def _run_config(config):
  keys = ('vocab_size', 'length', 'target_len', 'task_seed', 'hidden', 'optimizer',
          'learning_rate', 'batch', 'steps', 'alpha', 'seeds')
  return {k: (list(config[k]) if isinstance(config[k], (tuple, list)) else config[k])
          for k in keys}


def run(config, workdir):
  """Trains (or loads) every variant over the seeds, then writes table, JSON and plots."""
  if config.optimizer not in OPTIMIZERS:
    raise ConfigError(f'config.optimizer={config.optimizer!r}; expected one of '
                      f'{sorted(OPTIMIZERS)}.')
  if config.alpha < 0:
    raise ConfigError(f'config.alpha={config.alpha} must be >= 0.')
  root = workdir_lib.path(workdir)
  (root / 'runs').mkdir(parents=True, exist_ok=True)
  task = task_from_config(config)
  seed_keys = jax.vmap(jax.random.key)(jnp.asarray(config.seeds))
  run_config = _run_config(config)
  curves, timings, trainers = {}, {}, {}
  for name, (gamma, alpha) in variants(config).items():
    path = root / 'runs' / f'{name}.json'
    if path.exists():
      saved = json.loads(path.read_text())
      if saved['config'] == run_config:
        curves[name], timings[name] = np.asarray(saved['success']), saved['seconds']
        continue
    t0 = time.time()
    if gamma is None:
      value_table = jnp.zeros((task.length + 1, task.n_states))
    else:
      value_table = planted.values(task, planted.prover_probs(task, gamma))
    if alpha not in trainers:
      trainers[alpha] = make_train(task, config, alpha)
    curves[name] = np.asarray(trainers[alpha](seed_keys, value_table), np.float64)
    timings[name] = round(time.time() - t0, 1)
    logging.info('repro_pav_toy: %s final success %s (%.1fs)', name,
                 np.round(curves[name][:, -1], 4).tolist(), timings[name])
    if workdir_lib.is_primary():
      workdir_lib.write_text(path, json.dumps({'config': run_config, 'seconds': timings[name],
                                               'success': curves[name].tolist()}))
  results = analyse(config, task, curves)
  results['timings_s'] = timings
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, curves, root / 'pav_toy.png', root / 'pav_toy_final.png')
  logging.info('repro_pav_toy:\n%s', report(results))
  return results


# ---------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------
def samples_to_reach(curve, threshold, batch):
  """Responses sampled before ``curve`` (success before each step) first reaches
  ``threshold``; None if it never does."""
  hit = np.flatnonzero(np.asarray(curve) >= threshold)
  return int(hit[0]) * batch if hit.size else None


def analyse(config, task, curves):
  """Final success (mean, std over seeds) and samples to reach each threshold, per variant;
  thresholds: outcome-only RL's final mean success and ``config.thresholds``."""
  budget = config.steps * config.batch
  outcome_final = float(curves['outcome'][:, -1].mean())
  thresholds = {'outcome_final': outcome_final}
  thresholds.update({f'{t:g}': float(t) for t in config.thresholds})
  results = {
      'task': {'vocab_size': task.vocab_size, 'length': task.length,
               'target': list(task.target)},
      'uniform_success': float(planted.success_probability(task, planted.uniform_probs(task))),
      'optimal_success': float(planted.optimal_values(task)[0, 0]),
      'prover_success': {name: float(planted.success_probability(
          task, planted.prover_probs(task, gamma)))
                         for name, (gamma, _) in variants(config).items() if gamma},
      'budget_samples': budget, 'batch': config.batch, 'seeds': list(config.seeds),
      'alpha': config.alpha, 'optimizer': config.optimizer,
      'learning_rate': config.learning_rate, 'thresholds': thresholds, 'variants': {}}
  for name, curve in curves.items():
    mean = curve.mean(0)
    entry = {'gamma': variants(config)[name][0],
             'final': {'mean': float(mean[-1]), 'std': float(curve[:, -1].std()),
                       'per_seed': curve[:, -1].tolist()},
             'samples_to': {}}
    for key, t in thresholds.items():
      per_seed = [samples_to_reach(c, t, config.batch) for c in curve]
      entry['samples_to'][key] = {'mean_curve': samples_to_reach(mean, t, config.batch),
                                  'per_seed': per_seed}
    results['variants'][name] = entry
  for entry in results['variants'].values():  # speed-up over outcome-only RL
    for key, reached in entry['samples_to'].items():
      mine = reached['mean_curve']
      ref = results['variants']['outcome']['samples_to'][key]['mean_curve']
      if mine is None or mine == 0:
        reached['ratio'] = None
      elif ref is None:  # outcome-only never got there within the budget: a lower bound
        reached['ratio'] = f'>{budget / mine:.0f}'
      else:
        reached['ratio'] = f'{ref / mine:.1f}'
  return results


def _fmt_samples(n, budget):
  return f'>{budget:,}' if n is None else f'{n:,}'


def report(results) -> str:
  """The results table (results.md)."""
  budget = results['budget_samples']
  keys = list(results['thresholds'])
  lines = [
      f"Task: V = {results['task']['vocab_size']}, length {results['task']['length']}, "
      f"y* = {results['task']['target']} (contiguous). Uniform policy success "
      f"{results['uniform_success']:.3e}; optimum {results['optimal_success']:.3f}. "
      f"alpha = {results['alpha']}, {results['optimizer']} (lr "
      f"{results['learning_rate']:g}), batch {results['batch']}, budget {budget:,} sampled "
      f"responses per run, seeds {results['seeds']}.", '',
      '| variant | prover success | final success (mean ± std) | ' + ' | '.join(
          f'samples to {k} ({results["thresholds"][k]:.3g}) [ratio vs outcome]'
          for k in keys) + ' |',
      '|---|---|---|' + '---|' * len(keys)]
  for name, v in results['variants'].items():
    cells = []
    for k in keys:
      s = v['samples_to'][k]
      ratio = f" [{s['ratio']}×]" if s['ratio'] else ''
      cells.append(_fmt_samples(s['mean_curve'], budget) + ratio)
    prover = results['prover_success'].get(name)
    lines.append(f"| {name} | {'–' if prover is None else f'{prover:.3g}'} | "
                 f"{v['final']['mean']:.4f} ± {v['final']['std']:.4f} | " +
                 ' | '.join(cells) + ' |')
  lines += ['', 'Samples are counted on the mean curve over seeds; ">N" = not reached within '
            'the budget.', 'Wall time per variant (s): ' + ', '.join(
                f'{k} {v}' for k, v in results.get('timings_s', {}).items())]
  return '\n'.join(lines) + '\n'


def plot(results, curves, path, final_path):
  """Success against sampled responses (mean ± std over seeds) per variant; final success
  and samples to success 0.5 against gamma."""
  plt = figures.pyplot()
  batch = results['batch']
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.cm.viridis(np.linspace(0, 0.95, len(curves) - 1))
  for ax, yscale in zip(axes, ('linear', 'log')):
    for i, (name, curve) in enumerate(curves.items()):
      x = np.arange(1, curve.shape[1] + 1) * batch
      mean, std = curve.mean(0), curve.std(0)
      style = dict(color='k', ls='--') if name == 'outcome' else dict(color=colors[i - 1])
      label = ('outcome only' if name == 'outcome'
               else f"γ = {results['variants'][name]['gamma']:g}")
      ax.plot(x, mean, label=label, **style)
      ax.fill_between(x, np.maximum(mean - std, 1e-6), mean + std, alpha=0.2,
                      color=style['color'])
    ax.set(xscale='log', yscale=yscale, xlabel='sampled responses',
           ylabel='exact success probability',
           ylim=(-0.02, 1.02) if yscale == 'linear' else (1e-6, 1.5))
    ax.legend(fontsize=8)
  fig.suptitle(f"planted y*: outcome-only REINFORCE vs effective reward Q^π + "
               f"{results['alpha']:g}·A^μ_γ ({results['optimizer']}; mean ± std over "
               f"{len(results['seeds'])} seeds)", fontsize=10)
  figures.save(fig, path)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  provers = [v for v in results['variants'].values() if v['gamma'] is not None]
  gammas = [v['gamma'] for v in provers]
  outcome = results['variants']['outcome']
  axes[0].errorbar(gammas, [v['final']['mean'] for v in provers],
                   yerr=[v['final']['std'] for v in provers], marker='o', capsize=3,
                   label='effective reward')
  axes[0].axhline(outcome['final']['mean'], color='k', ls='--', label='outcome only')
  axes[0].set(ylim=(-0.02, 1.02), ylabel='final success probability',
              title=f"after {results['budget_samples']:,} sampled responses")
  key = '0.5' if '0.5' in results['thresholds'] else 'outcome_final'
  reached = lambda v: [np.nan if n is None else n for n in v['samples_to'][key]['per_seed']]
  for i in range(len(results['seeds'])):
    axes[1].plot(gammas, [reached(v)[i] for v in provers], 'o', color='C0', alpha=0.4,
                 label='seeds' if i == 0 else None)
  means = [np.mean([n for n in reached(v) if not np.isnan(n)] or [np.nan]) for v in provers]
  axes[1].plot(gammas, means, '-', color='C0', label='mean over the seeds that got there')
  for n in reached(outcome):
    if not np.isnan(n):
      axes[1].axhline(n, color='k', ls='--', lw=0.8)
  axes[1].axhline(results['budget_samples'], color='r', ls=':', lw=0.8, label='budget')
  axes[1].plot([], [], 'k--', lw=0.8, label='outcome only (per seed that got there)')
  axes[1].set(yscale='log', ylabel=f'sampled responses to success {key}',
              title='sample cost against the prover')
  for ax in axes:
    ax.set(xscale='log', xlabel='prover γ')
    ax.legend(fontsize=7)
  figures.save(fig, final_path)
