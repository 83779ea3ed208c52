"""Job ``repro_plantain``: interleaved plan-first reasoning against think-then-answer
(Plantain, arXiv:2512.03176, PAPERS.md §5), in miniature.

Stages (``configs/repro/plantain.py``), each a resumable workdir under the job's:
``sft_<format>`` (job ``rl_sft`` on the environment's demonstrations in that format; seed
``seeds[0]``) and, per seed, ``ppo_<format>_s<seed>`` (job ``rl_ppo`` from it, reward
``r_format (1 + r_correct + r_plan)``), for the formats ``interleaved`` and ``think``.
Evaluation on ``test_problems`` held-out problems (the same for every policy):
  * greedy pass@1, format rate, TTFR (Sec. 3) and response tokens of every policy;
  * for each interleaved PPO policy, sampled on the first ``inference.problems`` of them at
    each of ``inference.temperatures`` (a higher one makes wrong plans common enough to
    rewind): one response, best-of-N plans, rewind-and-repeat at the plan, rewinding at the final
    answer with the plan judge and with an oracle (Sec. 5), each with its pass@1 and
    generated tokens per problem.
Outputs in the workdir: ``results.md``, ``results.json``, ``plantain.png`` (TTFR and
pass@1; inference tokens and pass@1) and ``plantain_ppo.png`` (PPO learning curves).
"""
import copy
import json
import time

from absl import logging
import jax
import numpy as np

from model import decode
from rl import envs, plantain, ppo, rest
from rl import episodes as ep
from rl import value as value_lib
from training import checkpoint as ckpt_lib
from training import figures
from training import metrics as metrics_lib
from training import tokenizers
from training import workdir as workdir_lib

FORMATS = ('interleaved', 'think')
CURVES = ('rollout/reward', 'train/kl', 'train/value_loss', 'train/clip_frac')


def _stage(config, name, seed, init_workdir=None):
  stage = copy.deepcopy(config.stages[name])
  stage.unlock()
  stage.seed = int(seed)
  if init_workdir is not None:
    stage.ppo.init_workdir = str(init_workdir)
  return stage


def run(config, workdir):
  """Runs (or resumes) every stage, then the evaluations; writes tables, JSON and plots."""
  root = workdir_lib.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  timings, start = {}, time.time()
  for fmt in FORMATS:
    t0 = time.time()
    rest.sft(_stage(config, f'sft_{fmt}', config.seeds[0]), root / f'sft_{fmt}')
    timings[f'sft_{fmt}'] = time.time() - t0
    for seed in config.seeds:
      t0 = time.time()
      ppo.ppo(_stage(config, f'ppo_{fmt}', seed, root / f'sft_{fmt}'),
              root / f'ppo_{fmt}_s{seed}')
      timings[f'ppo_{fmt}_s{seed}'] = time.time() - t0
  t0 = time.time()
  results = evaluate(config, root)
  timings['evaluate'] = time.time() - t0
  results['curves'] = {fmt: [learning_curves(root / f'ppo_{fmt}_s{s}') for s in config.seeds]
                       for fmt in FORMATS}
  results.update(seeds=list(config.seeds), timings_s={k: round(v, 1) for k, v in timings.items()},
                 total_s=round(time.time() - start, 1))
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, root / 'plantain.png', root / 'plantain_ppo.png')
  logging.info('repro_plantain:\n%s', report(results))
  return results


def load_policy(workdir):
  """(tokenizer, model, variables) of an SFT or PPO workdir (a PPO policy keeps its value
  head: ``WithValueHead`` generates as its base)."""
  root = workdir_lib.path(workdir)
  tokenizer = tokenizers.load_tokenizer(root / tokenizers.TOKENIZER_SUBDIR)
  model, variables = ckpt_lib.load_model(root)
  if 'value_head' in variables['params']:
    model = value_lib.WithValueHead(model)
  return tokenizer, model, variables


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std()), 'per_seed': values.tolist()}


def evaluate(config, root):
  """Greedy pass@1 / TTFR of every policy; the inference procedures of the interleaved
  PPO policies."""
  inf = config.inference
  out = {'policies': {}, 'inference': {}}
  for fmt in FORMATS:
    env = envs.make_env(config.stages[f'ppo_{fmt}'].env)
    problems = [env.reset(np.random.default_rng([config.seeds[0], 1000 + i]), 'test')
                for i in range(config.test_problems)]
    policies = {f'sft_{fmt}': [root / f'sft_{fmt}'],
                f'ppo_{fmt}': [root / f'ppo_{fmt}_s{s}' for s in config.seeds]}
    for name, workdirs in policies.items():
      rows = []
      for workdir in workdirs:
        tokenizer, model, variables = load_policy(workdir)
        formatter = ep.Formatter(tokenizer, env.roles, env.markup)
        greedy = plantain.PolicyGenerator(model, variables, formatter,
                                          decode.SamplingConfig(greedy=True), inf.batch)
        done, tokens = plantain.sample_responses(env, problems, greedy, formatter,
                                                 jax.random.PRNGKey(0), inf.max_new_tokens)
        rows.append(dict(acc=np.mean([e.info['acc'] for e in done]),
                         format=np.mean([e.info['format'] for e in done]),
                         plan_ok=np.mean([e.info['plan_ok'] for e in done]),
                         ttfr=np.mean([plantain.ttfr(e.turns[-1].ids, formatter) for e in done]),
                         tokens=float(tokens.mean())))
        for temperature in (inf.temperatures if name == 'ppo_interleaved' else ()):
          sampler = plantain.PolicyGenerator(
              model, variables, formatter, decode.SamplingConfig(temperature=temperature),
              inf.batch)
          seed, runs = len(rows) - 1, out['inference'].setdefault(f'T={temperature}', {})
          for method, result in procedures(env, problems[:inf.problems], sampler, formatter,
                                           inf, jax.random.PRNGKey(100 + seed)).items():
            runs.setdefault(method, []).append(
                {k: float(np.mean(v)) for k, v in result.items()})
          logging.info('inference, seed %d, T=%s: %s', seed, temperature,
                       {m: v[-1] for m, v in runs.items()})
      out['policies'][name] = {k: _mean_std([r[k] for r in rows]) for k in rows[0]}
      logging.info('%s: %s', name, out['policies'][name])
  out['inference'] = {t: {m: {k: _mean_std([r[k] for r in runs]) for k in runs[0]}
                          for m, runs in methods.items()}
                      for t, methods in out['inference'].items()}
  think, inter = out['policies']['ppo_think'], out['policies']['ppo_interleaved']
  out['ttfr_reduction'] = 1.0 - inter['ttfr']['mean'] / think['ttfr']['mean']
  out['rewind'] = {}
  for t, methods in out['inference'].items():
    plan_r, ans_r = methods['rewind_plan'], methods['rewind_answer_plan_judge']
    single = methods['single']['tokens']['mean']
    out['rewind'][t] = dict(
        token_ratio=ans_r['tokens']['mean'] / plan_r['tokens']['mean'],
        overhead_ratio=(ans_r['tokens']['mean'] - single) /
        max(plan_r['tokens']['mean'] - single, 1e-9))
  return out


def procedures(env, problems, sampler, formatter, inf, rng):
  """Every inference procedure of one policy on ``problems`` -> {name: per-problem arrays}."""
  args = (env, problems, sampler, formatter)
  done, tokens = plantain.sample_responses(*args, jax.random.fold_in(rng, 0),
                                           inf.max_new_tokens)
  results = {'single': dict(correct=np.asarray([e.info['acc'] for e in done]),
                            plan_ok=np.asarray([e.info['plan_ok'] for e in done]),
                            tokens=tokens.astype(np.float64), rewinds=np.zeros(len(done)))}
  for n in inf.best_of:
    results[f'best_of_{n}_plans'] = plantain.best_of_n_plans(
        *args, jax.random.fold_in(rng, n), n, inf.plan_tokens, inf.max_new_tokens)
  results['rewind_plan'] = plantain.rewind_at_plan(
      *args, jax.random.fold_in(rng, 1000), inf.max_rewinds, inf.plan_tokens,
      inf.max_new_tokens)
  for judge in plantain.JUDGES:
    results[f'rewind_answer_{judge}_judge'] = plantain.rewind_at_answer(
        *args, jax.random.fold_in(rng, 2000), inf.max_rewinds, inf.max_new_tokens, judge)
  return results


def learning_curves(workdir):
  """{metric: [(step, value), ...]} of one PPO run's ``metrics.jsonl``."""
  records = metrics_lib.read_metrics(workdir)
  return {name: [(r['step'], r[name]) for r in records if name in r] for name in CURVES}


def report(results) -> str:
  fmt = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
  lines = ['| policy | seeds | pass@1 (greedy) | format | plan judged right | TTFR (tokens) | '
           'response tokens |', '|---|---|---|---|---|---|---|']
  for name, s in results['policies'].items():
    lines.append(f"| {name} | {len(s['acc']['per_seed'])} | {fmt(s['acc'])} | "
                 f"{fmt(s['format'])} | {fmt(s['plan_ok'])} | {s['ttfr']['mean']:.1f} ± "
                 f"{s['ttfr']['std']:.1f} | {s['tokens']['mean']:.1f} |")
  lines += ['', f"TTFR of the interleaved PPO policy is {100 * results['ttfr_reduction']:.1f}% "
            'lower than the think-then-answer PPO policy\'s.', '',
            '| procedure (interleaved PPO policy, sampled) | temperature | pass@1 | '
            'plan judged right | generated tokens / problem | rewinds / problem |',
            '|---|---|---|---|---|---|']
  for t, methods in results['inference'].items():
    for name, s in methods.items():
      lines.append(f"| {name} | {t[2:]} | {fmt(s['correct'])} | {fmt(s['plan_ok'])} | "
                   f"{s['tokens']['mean']:.1f} ± {s['tokens']['std']:.1f} | "
                   f"{s['rewinds']['mean']:.3f} |")
  lines.append('')
  for t, r in results['rewind'].items():
    lines.append(f'{t}: rewinding at the final answer (plan judge) over rewinding at the '
                 f"plan: {r['token_ratio']:.2f}x the generated tokens in all, "
                 f"{r['overhead_ratio']:.2f}x the tokens spent beyond one response.")
  lines += ['', metrics_lib.wall_time_text(results['total_s'], results['timings_s'])]
  return '\n'.join(lines) + '\n'


def plot(results, path, curves_path):
  """TTFR and pass@1 of the policies, pass@1 against tokens of the inference procedures;
  the PPO learning curves (mean and range over seeds) of both formats."""
  plt = figures.pyplot()
  temps = list(results['inference'])
  fig, axes = plt.subplots(1, 1 + len(temps), figsize=(5.5 * (1 + len(temps)), 4))
  for name, s in results['policies'].items():
    axes[0].errorbar(s['ttfr']['mean'], s['acc']['mean'], xerr=s['ttfr']['std'],
                     yerr=s['acc']['std'], marker='o', capsize=3, label=name)
  axes[0].set(xlabel='TTFR (tokens before the first visible answer token)',
              ylabel='pass@1 (greedy, held-out)', title='policies (mean ± std over seeds)')
  axes[0].legend(fontsize=8)
  for ax, t in zip(axes[1:], temps):
    for name, s in results['inference'][t].items():
      ax.errorbar(s['tokens']['mean'], s['correct']['mean'], xerr=s['tokens']['std'],
                  yerr=s['correct']['std'], marker='o', capsize=3, label=name)
    ax.set(xlabel='generated tokens per problem', ylabel='pass@1 (sampled)',
           title=f'inference procedures, interleaved PPO policy, {t}')
    ax.legend(fontsize=7)
  figures.save(fig, path)
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
  for ax, name in zip(axes, CURVES):
    for fmt, runs in results['curves'].items():
      steps = sorted(set.intersection(*[{s for s, _ in run[name]} for run in runs]))
      values = np.asarray([[dict(run[name])[s] for s in steps] for run in runs])
      if not steps:
        continue
      ax.plot(steps, values.mean(0), marker='.', label=fmt)
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25)
    ax.set(xlabel='PPO step', title=name)
    if name == 'train/kl':  # k3 spikes on tokens the policy has made rare
      ax.set_yscale('symlog', linthresh=0.01)
    ax.legend(fontsize=8)
  figures.save(fig, curves_path)
