"""Job ``repro_pav_rl``: online RL of the arithmetic policy with PAV dense rewards against
outcome-only rewards ("Rewarding progress", arXiv:2410.08146, Sec. 5; PAPERS.md §8), in
miniature.

Stages: the SFT policy and the process verifier (PAV) of ``rl.repro_pav_search``
(``train_stages``: the same resumable ``sft``, ``labels.json`` and ``pav`` workdirs, so
pointing both jobs at one workdir trains them once). Then per variant and seed one RL run
from the SFT policy:
  * ``outcome``: REINFORCE on the outcome reward R (1 for a correct final answer);
  * ``pav``: the effective reward per step ``Q^pi(s_h, a_h) + alpha A^mu(s_h, a_h)``
    (``rl.pav.effective_rewards``) with Q^pi's Monte Carlo estimate R (the outcome, the
    return of a terminal reward) and A^mu the Best-of-K prover's advantage from the PAV's
    per-step Q^pi: ``Q^mu = 1 - (1 - Q^pi)^K``, ``A^mu = step_advantages(Q^mu)``.
Each step's reward sits on its last token (newline or end of turn) and becomes the return
of every token of the step (``rl.pav.step_token_returns``); alpha = 0 gives back R on every
token, so both variants are the same loop. Baseline: a token-level learned value,
``rl.value.WithValueHead`` on the policy (``reinforce_loss(baseline='value')`` with
per-token ``returns``; head started at zero weights and the SFT policy's solve rate as
bias), KL (k3) to the SFT policy. On-policy: one Adam step per batch of sampled episodes,
so no importance weights. Both variants see the same problems and sampling keys per seed.

Test accuracy: one sample per held-out problem at temperature 1 (pass@1), the same
problems and keys for every run, every ``eval_every`` updates.

Outputs in the workdir: ``rl_runs/<variant>_seed<k>.json`` (curves; a rerun skips finished
runs), ``pav_rl.json``, ``pav_rl.md``, ``pav_rl.png``.
"""
import copy
import json
import time

from absl import logging
import jax
import numpy as np
import optax

from rl import losses, pav, repro_pav_search
from rl import value as value_lib
from rl.repro_pessimism import make_update
from training import figures
from training import metrics as metrics_lib
from training import workdir as workdir_lib

VARIANTS = ('outcome', 'pav')


def check_config(config):
  """Bad ``config.rl`` fields -> ValueError naming the field, before any stage runs (the
  reused stages' own fields, e.g. ``n_mc``, are checked by ``train_stages``)."""
  cfg = config.rl
  if cfg.alpha < 0:
    raise ValueError(f'config.rl.alpha={cfg.alpha} must be >= 0 (0 is outcome-only RL).')
  if cfg.prover_k < 1:
    raise ValueError(f'config.rl.prover_k={cfg.prover_k} must be >= 1.')
  for field in ('steps', 'batch', 'eval_every', 'eval_problems', 'seq_len'):
    if cfg[field] < 1:
      raise ValueError(f'config.rl.{field}={cfg[field]} must be >= 1.')
  if not cfg.seeds:
    raise ValueError('config.rl.seeds is empty.')
  if cfg.learning_rate <= 0:
    raise ValueError(f'config.rl.learning_rate={cfg.learning_rate} must be > 0.')
  for field in ('kl_coeff', 'value_coeff'):
    if cfg[field] < 0:
      raise ValueError(f'config.rl.{field}={cfg[field]} must be >= 0.')


def episode_arrays(sampler, problems, samples, width):
  """Sampled solutions as policy-gradient arrays [B, width] (prompt, the sampled tokens and
  the end of turn when generated; ``loss_mask`` on the sampled tokens)."""
  n = len(problems)
  out = {k: np.zeros((n, width), np.int32) for k in
         ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')}
  end_id, encode = sampler.formatter.end_id, sampler.formatter.tokenizer.encode
  for i, (problem, (text, _, stop)) in enumerate(zip(problems, samples)):
    prompt = sampler.context(problem, [])
    ids = prompt + encode(text) + ([end_id] if stop == 'end' else [])
    m = len(ids) - 1
    if m > width:
      raise ValueError(f'An episode has {len(ids)} tokens, more than config.rl.seq_len + 1 = '
                       f'{width + 1}.')
    out['tokens'][i, :m] = ids[:-1]
    out['targets'][i, :m] = ids[1:]
    out['positions'][i, :m] = np.arange(m)
    out['segment_ids'][i, :m] = 1
    out['loss_mask'][i, len(prompt) - 1:m] = 1
  return out


def step_rewards(verifier, problems, samples, outcomes, alpha, prover_k):
  """[B, H] effective rewards ``R + alpha A^mu`` per step (``[B, 1]`` = R when alpha is 0);
  rows with fewer steps are padded with a zero advantage."""
  outcomes = np.asarray(outcomes, np.float32)
  if alpha == 0:
    return outcomes[:, None]
  q = verifier.values([(p, text.split('\n'), stop == 'end')
                       for p, (text, _, stop) in zip(problems, samples)])
  width = max(len(v) for v in q)
  q_pi = np.stack([np.pad(v, (0, width - len(v)), mode='edge') for v in q])
  a_mu = pav.step_advantages(pav.best_of_k_q(q_pi, prover_k))
  return np.asarray(pav.effective_rewards(outcomes, a_mu, alpha))


class Setup:
  """The SFT policy (``sampler``'s variables), the PAV (``verifier.values``), the held-out
  problems and the compiled update shared by every run; the value head starts at zero
  weights and bias ``solve_rate``."""

  def __init__(self, config, env, sampler, verifier, solve_rate):
    self.config, cfg = config, config.rl
    self.env, self.sampler, self.verifier = env, sampler, verifier
    self.sft_params = self.sampler.variables['params']
    self.model = value_lib.WithValueHead(self.sampler.model)
    embed = config.stages.sft.model.embed_dim
    self.head = {'kernel': np.zeros((embed, 1), np.float32),
                 'bias': np.full((1,), solve_rate, np.float32)}
    self.optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.learning_rate))
    self.update = make_update(self.model, losses.reinforce_loss(
        kl_coeff=cfg.kl_coeff, kl_estimator='k3', importance_weighting=False,
        baseline='value', value_coeff=cfg.value_coeff), self.optimizer)
    self.eval_problems = pav.problems_for(self.env, config.seed + 2000, cfg.eval_problems,
                                          'test')

  def sampler_for(self, params):
    sampler = copy.copy(self.sampler)
    sampler.variables = {'params': params}
    return sampler

  def accuracy(self, params):
    """pass@1 at temperature 1 on the held-out problems (fixed keys)."""
    sampler = self.sampler_for(params)
    samples = sampler.sample([(p, []) for p in self.eval_problems],
                             jax.random.PRNGKey(10_000), one_step=False)
    return float(np.mean([sampler.reward(p, t, s == 'end')
                          for p, (t, _, s) in zip(self.eval_problems, samples)]))


def train_policy(setup, alpha, seed):
  """One RL run -> curves {samples, accuracy (held-out), train_reward, kl, value_loss}."""
  cfg = setup.config.rl
  params = value_lib.wrap_params(setup.sft_params, setup.head)
  opt_state = setup.optimizer.init(params)
  key = jax.random.PRNGKey(seed)
  curves = {k: [] for k in ('samples', 'accuracy', 'train_reward', 'kl', 'value_loss')}
  for step in range(cfg.steps + 1):
    if step % cfg.eval_every == 0 or step == cfg.steps:
      curves['samples'].append(step * cfg.batch)
      curves['accuracy'].append(setup.accuracy(params['base']))
      logging.info('alpha %s seed %d step %d: accuracy %.3f', alpha, seed, step,
                   curves['accuracy'][-1])
    if step == cfg.steps:
      break
    problems = [setup.env.reset(np.random.default_rng([seed, 7, step, i]), 'train')
                for i in range(cfg.batch)]
    sampler = setup.sampler_for(params['base'])
    samples = sampler.sample([(p, []) for p in problems], jax.random.fold_in(key, step),
                             one_step=False)
    outcomes = [sampler.reward(p, t, s == 'end') for p, (t, _, s) in zip(problems, samples)]
    batch = episode_arrays(sampler, problems, samples, cfg.seq_len)
    ends = pav.step_ends(batch['targets'], batch['loss_mask'], sampler.newline_id)
    batch['returns'] = np.asarray(pav.step_token_returns(
        step_rewards(setup.verifier, problems, samples, outcomes, alpha, cfg.prover_k), ends,
        batch['loss_mask']))
    params, opt_state, _, metrics = setup.update(params, opt_state, batch,
                                                 {'reference': setup.sft_params}, step)
    curves['train_reward'].append(float(np.mean(outcomes)))
    curves['kl'].append(float(metrics['kl']))
    curves['value_loss'].append(float(metrics['value_loss']))
  return curves


def run(config, workdir):
  """The reused stages, then every (variant, seed) run; writes tables, JSON and plot."""
  check_config(config)
  root = workdir_lib.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  sft_summary, summaries, timings = repro_pav_search.train_stages(config, root, kinds=('pav',))
  t0 = time.time()
  env, sampler = repro_pav_search.load_sampler(config, root)
  setup = Setup(config, env, sampler, repro_pav_search.load_verifier(sampler, root / 'pav'),
                summaries['pav']['seed_accuracy'])
  runs_dir = root / 'rl_runs'
  runs_dir.mkdir(parents=True, exist_ok=True)
  runs = {}
  for seed in config.rl.seeds:  # paired runs first: a cut-short job still compares
    for variant in VARIANTS:
      alpha = config.rl.alpha if variant == 'pav' else 0.0
      path = runs_dir / f'{variant}_seed{seed}.json'
      if not path.exists():
        t1 = time.time()
        curves = train_policy(setup, alpha, seed)
        curves['seconds'] = round(time.time() - t1, 1)
        if workdir_lib.is_primary():
          workdir_lib.write_text(path, json.dumps(curves))
      runs[(variant, seed)] = json.loads(path.read_text())
  timings['rl'] = time.time() - t0
  results = analyse(config, runs)
  results.update(sft={k: v for k, v in sft_summary.items() if k.startswith('eval/test')},
                 verifier=summaries['pav'],
                 timings_s={k: round(v, 1) for k, v in timings.items()},
                 total_s=round(time.time() - start, 1))
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'pav_rl.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'pav_rl.md', report(results))
    plot(results, root / 'pav_rl.png')
  logging.info('repro_pav_rl:\n%s', report(results))
  return results


def samples_to_reach(samples, curve, target):
  """The first sample count at which ``curve`` >= ``target`` (None if never)."""
  hits = [s for s, a in zip(samples, curve) if a >= target - 1e-9]
  return hits[0] if hits else None


def analyse(config, runs):
  """Mean and std over seeds of each variant's curve; the samples each needs to reach the
  outcome-only run's final mean accuracy, read off the mean curves (and per seed)."""
  cfg = config.rl
  curves = {}
  for variant in VARIANTS:
    acc = np.asarray([runs[(variant, s)]['accuracy'] for s in cfg.seeds])
    curves[variant] = dict(samples=runs[(variant, cfg.seeds[0])]['samples'],
                           mean=acc.mean(0).tolist(), std=acc.std(0).tolist(),
                           per_seed_final=acc[:, -1].tolist(),
                           final_kl=[runs[(variant, s)]['kl'][-1] for s in cfg.seeds],
                           seconds=[runs[(variant, s)].get('seconds') for s in cfg.seeds])
  target = curves['outcome']['mean'][-1]
  reach = {}
  for variant, c in curves.items():
    per_seed = [samples_to_reach(c['samples'], runs[(variant, s)]['accuracy'], target)
                for s in cfg.seeds]
    reach[variant] = dict(mean_curve=samples_to_reach(c['samples'], c['mean'], target),
                          per_seed=per_seed)
  outcome_n, pav_n = reach['outcome']['mean_curve'], reach['pav']['mean_curve']
  return dict(curves=curves, target=target, reach=reach,
              sample_ratio=(outcome_n / pav_n) if outcome_n and pav_n else None,
              gain=curves['pav']['mean'][-1] - target, alpha=cfg.alpha, prover_k=cfg.prover_k,
              seeds=list(cfg.seeds), steps=cfg.steps, batch=cfg.batch,
              eval_problems=cfg.eval_problems, sft_accuracy=curves['outcome']['mean'][0])


def report(results) -> str:
  c, reach = results['curves'], results['reach']
  fmt = lambda n: 'never' if n is None else f'{n:,}'
  lines = ['| variant | final accuracy (mean ± std) | per seed | samples to outcome-only final '
           '(mean curve) | per seed |', '|---|---|---|---|---|']
  for variant, label in (('outcome', 'outcome only'),
                         ('pav', f"PAV (alpha {results['alpha']}, K {results['prover_k']})")):
    lines.append(f"| {label} | {c[variant]['mean'][-1]:.3f} ± {c[variant]['std'][-1]:.3f} | "
                 + ', '.join(f'{a:.3f}' for a in c[variant]['per_seed_final'])
                 + f" | {fmt(reach[variant]['mean_curve'])} | "
                 + ', '.join(fmt(n) for n in reach[variant]['per_seed']) + ' |')
  ratio, pav_n = results['sample_ratio'], reach['pav']['mean_curve']
  ratio_text = (f'{ratio:.2f}x' if ratio is not None else 'PAV never reached it'
                if pav_n is None else 'undefined (the SFT policy at 0 samples already meets '
                'the target)')
  lines += ['', f"Accuracy at 0 samples (the SFT policy): {results['sft_accuracy']:.3f}. "
            f"Target (outcome-only final mean): {results['target']:.3f}. Samples ratio "
            f"outcome / PAV: {ratio_text}. "
            f"PAV final minus outcome final: {results['gain']:+.3f}. Seeds "
            f"{results['seeds']}; {results['steps']} updates x {results['batch']} episodes; "
            f"{results['eval_problems']} held-out problems, pass@1 at temperature 1."]
  if 'timings_s' in results:
    lines.append(metrics_lib.wall_time_text(results['total_s'], results['timings_s']))
  return '\n'.join(lines) + '\n'


def plot(results, path):
  """Held-out accuracy against sampled episodes: mean over seeds, ± std band."""
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for variant, label in (('outcome', 'outcome reward only'),
                         ('pav', f"PAV effective reward (alpha {results['alpha']})")):
    c = results['curves'][variant]
    mean, std = np.asarray(c['mean']), np.asarray(c['std'])
    ax.plot(c['samples'], mean, marker='o', ms=3, label=label)
    ax.fill_between(c['samples'], mean - std, mean + std, alpha=0.2)
  ax.axhline(results['target'], color='gray', ls=':', lw=1, label='outcome-only final')
  ax.set(xlabel='sampled episodes', ylabel='held-out accuracy (pass@1)',
         title=f"online RL on arithmetic, {len(results['seeds'])} seeds (mean ± std)")
  ax.legend(fontsize=8)
  figures.save(fig, path)
