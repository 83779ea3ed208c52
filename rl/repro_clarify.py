"""Job ``repro_clarify``: cost-steerable clarification (arXiv:2512.04068, PAPERS.md §4).

Stages (``configs/repro/clarify.py``), each a resumable workdir under the job's workdir:
``sft`` once, then per seed ``rest_s<seed>`` (ReST, costs sampled per episode from the
training grids) and ``single_s<seed>`` (ReST at one cost). Every policy is evaluated by
``rl.rest.evaluate`` on the held-out cost pairs (sampled at the rollout temperature, so a
rate is the policy's probability of that first action). The analysis:
  * clarify rate against alpha (mean over the held-out betas) and enumerate rate against
    beta (mean over the held-out alphas), with Spearman's rho;
  * reward averaged over held-out costs, against each fixed-action policy and the
    Bayes-optimal one (both exact expectations, ``rl.envs.clarify``, averaged over
    ``baseline_instances`` instances per cost pair);
  * agreement with the Bayes-optimal first action per held-out cost.
Seeds vary ReST (rollouts and fine-tuning order); the SFT policy is shared.
"""
import json
import time

from absl import logging
import numpy as np
from scipy import stats as sp_stats

from rl import envs, rest
from rl.envs import clarify
from training import figures
from training import workdir as workdir_lib

POLICIES = ('steerable', 'single_cost', 'sft')


def _final_eval(workdir, name):
  return json.loads((workdir_lib.path(workdir) / 'eval' / f'{name}.json').read_text())


def run(config, workdir):
  """Runs (or resumes) every stage, then writes the table, JSON and plot."""
  root = workdir_lib.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  timings = {}
  start = time.time()
  sft_dir = root / 'sft'
  rest.sft(rest.stage_config(config, 'sft', config.seeds[0]), sft_dir)
  timings['sft'] = time.time() - start
  # The held-out evaluation of each mode, by its name in the eval files.
  modes = {mode: name for name, (which, mode) in rest.eval_names(config.stages.rest).items()
           if which == 'heldout'}
  evals = {mode: {'sft': [_final_eval(sft_dir, 'final')[name]]} for mode, name in modes.items()}
  for policy, stage in (('steerable', 'rest'), ('single_cost', 'single')):
    for seed in config.seeds:
      t0 = time.time()
      stage_config = rest.stage_config(config, stage, seed, str(sft_dir))
      stage_dir = root / f'{stage}_s{seed}'
      rest.rest(stage_config, stage_dir)
      final = _final_eval(stage_dir, f'iteration_{stage_config.rest.iterations}')
      for mode, name in modes.items():
        evals[mode].setdefault(policy, []).append(final[name])
      timings[f'{stage}_s{seed}'] = time.time() - t0
  env = envs.make_env(config.stages.rest.env)
  results = {mode: analyse(env, evals[mode], config.baseline_instances, seed=config.seeds[0])
             for mode in modes}
  results['single_cost'] = list(config.stages.single.env.single_cost)
  results['timings_s'] = {k: round(v, 1) for k, v in timings.items()}
  results['total_s'] = round(time.time() - start, 1)
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, root / 'clarify.png')
  logging.info('repro_clarify:\n%s', report(results))
  return results


# ---------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------
def baselines(env, alphas, betas, instances, seed):
  """Exact expected reward of each fixed action and of the Bayes-optimal policy, and the
  Bayes-optimal first-action rates, per held-out cost pair."""
  rng = np.random.default_rng([seed, 11])
  out = {}
  for a in alphas:
    for b in betas:
      episodes = [env.reset(rng, 'heldout', alpha=a, beta=b) for _ in range(instances)]
      values = {f'always_{action}': float(np.mean([clarify.fixed_action_value(e, action)
                                                   for e in episodes]))
                for action in clarify.ACTIONS}
      values['bayes_optimal'] = float(np.mean([clarify.bayes_value(e) for e in episodes]))
      for action in clarify.ACTIONS:  # ties split evenly
        values[f'bayes_rate/{action}'] = float(np.mean(
            [(action in o) / len(o) for o in map(clarify.optimal_actions, episodes)]))
      out[(a, b)] = values
  return out


def _by_cost(per_setting):
  return {(s['alpha'], s['beta']): summary for s, summary in per_setting}


def _curves(cells, alphas, betas, key_clarify='rate/clarify', key_enum='rate/enumerate'):
  clarify_vs_alpha = [float(np.mean([cells[(a, b)][key_clarify] for b in betas]))
                      for a in alphas]
  enum_vs_beta = [float(np.mean([cells[(a, b)][key_enum] for a in alphas])) for b in betas]
  return clarify_vs_alpha, enum_vs_beta


def _spearman(xs, ys):
  """Spearman's rho; NaN for a constant curve (no order to correlate)."""
  if np.ptp(ys) == 0:
    return float('nan')
  return float(sp_stats.spearmanr(xs, ys).statistic)


def analyse(env, evals, instances, seed):
  """``evals[policy]``: per seed, the held-out evaluation [(setting, summary), ...]."""
  alphas, betas = list(env.heldout_alphas), list(env.heldout_betas)
  base = baselines(env, alphas, betas, instances, seed)
  results = {'alphas': alphas, 'betas': betas, 'policies': {}, 'baselines': {}}
  for name in ('always_answer', 'always_enumerate', 'always_clarify', 'bayes_optimal'):
    results['baselines'][name] = float(np.mean([v[name] for v in base.values()]))
  bayes_cells = {k: {'rate/clarify': v['bayes_rate/clarify'],
                     'rate/enumerate': v['bayes_rate/enumerate']} for k, v in base.items()}
  c, e = _curves(bayes_cells, alphas, betas)
  results['bayes_curves'] = {'clarify_vs_alpha': c, 'enumerate_vs_beta': e,
                             'rho_clarify_alpha': _spearman(alphas, c),
                             'rho_enumerate_beta': _spearman(betas, e)}
  for policy, runs in evals.items():
    per_seed = []
    for per_setting in runs:
      cells = _by_cost(per_setting)
      c, e = _curves(cells, alphas, betas)
      per_seed.append(dict(
          reward=float(np.mean([s['reward'] for s in cells.values()])),
          acc=float(np.mean([s['acc'] for s in cells.values()])),
          agreement=float(np.mean([s['optimal_agreement'] for s in cells.values()])),
          clarify_vs_alpha=c, enumerate_vs_beta=e,
          rho_clarify_alpha=_spearman(alphas, c), rho_enumerate_beta=_spearman(betas, e),
          agreement_by_cost={f'{a:.2f},{b:.3f}': cells[(a, b)]['optimal_agreement']
                             for a in alphas for b in betas}))
    summary = {}
    for key in ('reward', 'acc', 'agreement', 'rho_clarify_alpha', 'rho_enumerate_beta'):
      values = np.asarray([r[key] for r in per_seed])
      summary[key] = {'mean': float(values.mean()), 'std': float(values.std()),
                      'per_seed': values.tolist()}
    for key in ('clarify_vs_alpha', 'enumerate_vs_beta'):
      values = np.asarray([r[key] for r in per_seed])
      summary[key] = {'mean': values.mean(0).tolist(), 'std': values.std(0).tolist()}
    summary['agreement_by_cost'] = {
        k: float(np.mean([r['agreement_by_cost'][k] for r in per_seed]))
        for k in per_seed[0]['agreement_by_cost']}
    results['policies'][policy] = summary
  return results


def report(results) -> str:
  """Both evaluation modes' tables and the run's timings (results.md)."""
  parts = []
  for mode, title in (('sample', 'sampled at temperature 1'), ('greedy', 'greedy')):
    if mode in results:
      parts += [f'### Held-out costs, actions {title}', '', markdown(results[mode])]
  parts.append(f"Single-cost baseline trained at (α, β) = {tuple(results['single_cost'])}. "
               f"Wall time: {results['total_s'] / 60:.1f} min "
               f"({', '.join(f'{k} {v / 60:.1f}' for k, v in results['timings_s'].items())}).")
  return '\n'.join(parts) + '\n'


def markdown(results) -> str:
  """One evaluation mode's table (``analyse``'s output)."""
  fmt = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
  lines = ['| policy | seeds | reward (held-out costs) | acc | agreement with Bayes-optimal | '
           'ρ(clarify rate, α) | ρ(enumerate rate, β) |', '|---|---|---|---|---|---|---|']
  for name, s in results['policies'].items():
    lines.append(f"| {name} | {len(s['reward']['per_seed'])} | {fmt(s['reward'])} | "
                 f"{fmt(s['acc'])} | {fmt(s['agreement'])} | {fmt(s['rho_clarify_alpha'])} | "
                 f"{fmt(s['rho_enumerate_beta'])} |")
  bayes = results['bayes_curves']
  for name, value in results['baselines'].items():
    extra = (f" | | 1.000 | {bayes['rho_clarify_alpha']:.3f} | "
             f"{bayes['rho_enumerate_beta']:.3f} |" if name == 'bayes_optimal' else ' | | | | |')
    lines.append(f'| {name} (exact) | – | {value:.3f}{extra}')
  lines += ['', '| policy | clarify rate at held-out α = ' +
            ', '.join(f'{a:.2f}' for a in results['alphas']) +
            ' | enumerate rate at held-out β = ' + ', '.join(f'{b:.3f}' for b in results['betas']) +
            ' |', '|---|---|---|']
  curves = {n: (s['clarify_vs_alpha']['mean'], s['enumerate_vs_beta']['mean'])
            for n, s in results['policies'].items()}
  curves['bayes_optimal'] = (bayes['clarify_vs_alpha'], bayes['enumerate_vs_beta'])
  for name, (by_alpha, by_beta) in curves.items():
    lines.append(f'| {name} | ' + ', '.join(f'{v:.2f}' for v in by_alpha) + ' | ' +
                 ', '.join(f'{v:.2f}' for v in by_beta) + ' |')
  return '\n'.join(lines) + '\n'


def plot(all_results, path):
  """Rates against the held-out costs (sampled actions: the policies' probabilities) and
  the mean reward of every policy and baseline, in each evaluation mode."""
  plt = figures.pyplot()
  modes = [m for m in ('sample', 'greedy') if m in all_results]
  fig, axes = plt.subplots(1, 2 + len(modes), figsize=(5 * (2 + len(modes)), 4))
  results = all_results[modes[0]]
  panels = (('clarify_vs_alpha', 'alphas', 'held-out α (cost per question)', 'clarify rate'),
            ('enumerate_vs_beta', 'betas', 'held-out β (cost per word)', 'enumerate rate'))
  for ax, (key, xs, xlabel, ylabel) in zip(axes, panels):
    x = results[xs]
    for name, s in results['policies'].items():
      ax.errorbar(x, s[key]['mean'], yerr=s[key]['std'], marker='o', capsize=3, label=name)
    ax.plot(x, results['bayes_curves'][key], 'k--', label='Bayes-optimal')
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    ax.set_title(f'held-out costs, {modes[0]}d actions', fontsize=9)
  for ax, mode in zip(axes[2:], modes):
    results = all_results[mode]
    names = list(results['policies']) + list(results['baselines'])
    means = [results['policies'][n]['reward']['mean'] if n in results['policies']
             else results['baselines'][n] for n in names]
    errs = [results['policies'][n]['reward']['std'] if n in results['policies'] else 0
            for n in names]
    ax.bar(range(len(names)), means, yerr=errs, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=35, ha='right', fontsize=8)
    ax.set(ylabel='mean reward, held-out costs', ylim=(0.5, 0.9),
           title=f'{mode} actions (policies: mean ± std over seeds)')
  figures.save(fig, path)
