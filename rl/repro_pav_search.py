"""Job ``repro_pav_search``: PAV beam search against ORM best-of-N on multi-step arithmetic
("Rewarding progress", arXiv:2410.08146, Sec. 4; PAPERS.md §8), in miniature.

Stages (``configs/repro/pav_search.py``), each a resumable workdir under the job's:
  ``sft``  the policy (job ``rl_sft`` on ``rl.envs.arith``);
  ``pav``  Monte Carlo labels of the SFT policy's seed rollouts (first pit, shared
           ``labels.json``) and the process verifier trained on them (job ``pav_verifier``,
           kind 'pav': it predicts Q^pi; the Best-of-K prover's Q^mu follows from it);
  ``orm``  the same verifier trained on the seed rollouts' outcomes only (kind 'orm').
Evaluation on held-out problems (``rl.pav_search``): ORM best-of-N for N = 1..``max_n``
(disjoint groups of one pool of samples), PAV beam search for each width (K =
``prover_k``, alpha) with the ORM picking the final answer, and the Best-of-K sweep at
``sweep_width``; accuracy against sampled tokens per problem, per search seed.

Outputs in the workdir: ``results.md``, ``results.json``, ``pav_search.png``.
"""
import copy
import json
import time

from absl import logging
import jax
import numpy as np

from model import decode
from rl import envs, pav, pav_search, rest
from rl import episodes as ep
from rl import value as value_lib
from training import checkpoint as ckpt_lib
from training import figures
from training import metrics as metrics_lib
from training import workdir as workdir_lib


def _stage(config, name, **fields):
  stage = copy.deepcopy(config.stages[name])
  stage.unlock()
  stage.seed = int(config.seed)
  for key, value in fields.items():
    stage.verifier[key] = value
  return stage


def load_verifier(sampler, workdir):
  """The verifier trained in ``workdir`` on ``sampler``'s policy."""
  _, variables = ckpt_lib.load_model(workdir)
  return pav.Verifier(value_lib.WithValueHead(sampler.model), variables, sampler, sampler.batch)


def train_stages(config, root, kinds=pav.KINDS):
  """Runs (or resumes) the SFT stage and the verifier stages ``kinds`` under ``root``;
  returns (SFT summary, {kind: verifier summary}, {stage: seconds}). Shared with
  ``rl.repro_pav_rl``."""
  sft_dir = root / 'sft'
  stages = {kind: _stage(config, kind, policy_workdir=str(sft_dir),
                         labels_file=str(root / 'labels.json'), kind=kind) for kind in kinds}
  for stage in stages.values():  # bad fields (n_mc < 1, ...) fail before the SFT stage
    pav.check_verifier_config(stage)
  timings, start = {}, time.time()
  sft_summary = rest.sft(_stage(config, 'sft'), sft_dir)
  timings['sft'] = time.time() - start
  summaries = {}
  for kind, stage in stages.items():
    t0 = time.time()
    summaries[kind] = pav.train_verifier(stage, root / kind)
    timings[kind] = time.time() - t0
  return sft_summary, summaries, timings


def load_sampler(config, root):
  """(env, the SFT policy's ``PolicySampler``) as the ``pav`` stage configures it."""
  stage = config.stages.pav
  tokenizer, _, policy, variables = pav.load_policy(root / 'sft')
  env = envs.make_env(stage.env)
  formatter = ep.Formatter(tokenizer, env.roles)
  sampler = pav.PolicySampler(env, policy, variables, formatter,
                              decode.SamplingConfig(temperature=stage.verifier.temperature),
                              stage.verifier.max_new_tokens, stage.verifier.max_step_tokens,
                              stage.verifier.batch)
  return env, sampler


def run(config, workdir):
  """Runs (or resumes) every stage, then the searches; writes tables, JSON and plot."""
  root = workdir_lib.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  sft_summary, summaries, timings = train_stages(config, root)
  t0 = time.time()
  results = evaluate(config, root)
  timings['search'] = time.time() - t0
  results.update(sft={k: v for k, v in sft_summary.items() if k.startswith('eval/test')},
                 verifiers=summaries, timings_s={k: round(v, 1) for k, v in timings.items()},
                 total_s=round(time.time() - start, 1))
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, root / 'pav_search.png')
  logging.info('repro_pav_search:\n%s', report(results))
  return results


def evaluate(config, root):
  """The searches on ``config.test_problems`` held-out problems, per search seed."""
  env, sampler = load_sampler(config, root)
  prm = load_verifier(sampler, root / 'pav')
  orm = load_verifier(sampler, root / 'orm')
  problems = pav.problems_for(env, config.seed + 1000, config.test_problems, 'test')
  reward = lambda p, text: sampler.reward(p, text, True)
  out = {'bon': [], 'pav': [], 'sweep': []}
  for seed in config.search_seeds:
    rng = jax.random.PRNGKey(seed)
    requests = [(p, []) for p in problems for _ in range(config.max_n)]
    samples = sampler.sample(requests, jax.random.fold_in(rng, 0), one_step=False)
    cands = [(p, text.split('\n'), True) for (p, _), (text, _, _) in zip(requests, samples)]
    shape = (len(problems), config.max_n)
    scores = np.asarray([v[-1] for v in orm.values(cands)]).reshape(shape)
    correct = np.asarray([sampler.reward(p, t, s == 'end') for (p, _), (t, _, s)
                          in zip(requests, samples)]).reshape(shape)
    tokens = np.asarray([c for _, c, _ in samples]).reshape(shape)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= config.max_n]
    out['bon'].append(pav_search.best_of_n_curve(scores, correct, tokens, ns))
    runs = [('pav', w, config.prover_k) for w in config.widths]
    runs += [('sweep', config.sweep_width, k) for k in config.sweep_ks]
    per_seed = {'pav': [], 'sweep': []}
    for j, (name, width, k) in enumerate(runs, start=1):
      sample = pav_search.model_callables(sampler, jax.random.fold_in(rng, j))
      result = pav_search.beam_search(problems, sample, prm.values, orm.values, width, k,
                                      config.alpha, config.expansions, config.max_steps)
      per_seed[name].append(dict(width=width, k=k,
                                 accuracy=pav_search.accuracy(problems, result.chosen, reward),
                                 tokens=float(result.tokens.mean())))
      logging.info('seed %d %s width %d K %d: %s', seed, name, width, k, per_seed[name][-1])
    out['pav'].append(per_seed['pav'])
    out['sweep'].append(per_seed['sweep'])
  return summarize(out, config)


def summarize(out, config):
  """Means and stds over search seeds; the tokens PAV needs to match ORM best-of-max_n."""
  mean_std = lambda xs: (float(np.mean(xs)), float(np.std(xs)))
  bon = [dict(n=row[0][0], accuracy=mean_std([r[1] for r in row]),
              tokens=mean_std([r[2] for r in row])) for row in zip(*out['bon'])]
  curves = {}
  for name in ('pav', 'sweep'):
    curves[name] = [dict(width=row[0]['width'], k=row[0]['k'],
                         accuracy=mean_std([r['accuracy'] for r in row]),
                         tokens=mean_std([r['tokens'] for r in row]))
                    for row in zip(*out[name])]
  target = bon[-1]
  reach = [r for r in curves['pav'] if r['accuracy'][0] >= target['accuracy'][0]]
  ratio = (target['tokens'][0] / min(r['tokens'][0] for r in reach)) if reach else None
  return dict(bon=bon, pav=curves['pav'], sweep=curves['sweep'], target_n=target['n'],
              token_ratio_at_bon_max=ratio, seeds=list(config.search_seeds),
              test_problems=config.test_problems, alpha=config.alpha,
              prover_k=config.prover_k)


def report(results) -> str:
  fmt = lambda s, d=3: f'{s[0]:.{d}f} ± {s[1]:.{d}f}'
  lines = ['| method | accuracy | sampled tokens per problem |', '|---|---|---|']
  lines += [f"| ORM best-of-{r['n']} | {fmt(r['accuracy'])} | {fmt(r['tokens'], 0)} |"
            for r in results['bon']]
  lines += [f"| PAV beam B={r['width']} (K={r['k']}) | {fmt(r['accuracy'])} | "
            f"{fmt(r['tokens'], 0)} |" for r in results['pav']]
  lines += ['', f"| Best-of-K prover (beam B={results['sweep'][0]['width']}) | accuracy | "
            'tokens |', '|---|---|---|'] if results['sweep'] else []
  lines += [f"| K={r['k']} | {fmt(r['accuracy'])} | {fmt(r['tokens'], 0)} |"
            for r in results['sweep']]
  ratio = results['token_ratio_at_bon_max']
  lines += ['', f"ORM best-of-{results['target_n']} tokens / tokens of the cheapest PAV beam "
            f"at least as accurate: {'not reached' if ratio is None else f'{ratio:.2f}x'}. "
            f"Held-out problems: {results['test_problems']}; search seeds "
            f"{results['seeds']} (mean ± std); alpha {results['alpha']}."]
  if 'timings_s' in results:
    lines.append(metrics_lib.wall_time_text(results['total_s'], results['timings_s']))
  return '\n'.join(lines) + '\n'


def plot(results, path):
  """Accuracy against sampled tokens per problem: ORM best-of-N and PAV beam search."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2 if results['sweep'] else 1, figsize=(11, 4), squeeze=False)
  ax = axes[0, 0]
  for name, rows, label in (('bon', results['bon'], 'ORM best-of-N'),
                            ('pav', results['pav'], f"PAV beam (K={results['prover_k']})")):
    x = [r['tokens'][0] for r in rows]
    ax.errorbar(x, [r['accuracy'][0] for r in rows], yerr=[r['accuracy'][1] for r in rows],
                marker='o', capsize=3, label=label)
    for r, xi in zip(rows, x):
      ax.annotate(f"N={r['n']}" if name == 'bon' else f"B={r['width']}",
                  (xi, r['accuracy'][0]), fontsize=7, xytext=(3, -9),
                  textcoords='offset points')
  ax.set(xscale='log', xlabel='sampled tokens per problem', ylabel='accuracy (held-out)',
         title='PAV beam search vs ORM best-of-N')
  ax.legend(fontsize=8)
  if results['sweep']:
    ax = axes[0, 1]
    rows = results['sweep']
    ax.errorbar([r['k'] for r in rows], [r['accuracy'][0] for r in rows],
                yerr=[r['accuracy'][1] for r in rows], marker='o', capsize=3)
    ax.set(xscale='log', xlabel='prover Best-of-K', ylabel='accuracy',
           title=f"beam B={rows[0]['width']}, alpha={results['alpha']}")
  figures.save(fig, path)
