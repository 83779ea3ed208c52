"""Job ``repro_collab``: collaborative self-play for tool use and selective prediction
(arXiv:2503.14481, PAPERS.md §6) in miniature.

Stages (``configs/repro/collab.py``), each a resumable workdir under the job's workdir:
``sft`` (the in-context baseline: the memorised facts as text and quiz conversations plus
format demonstrations whose actions ignore what is memorised; ReST starts from it),
``oracle`` (the action-supervised baseline: ``sft`` fine-tuned on the facts plus
``oracle_turn`` demonstrations) and, per seed, ``rest_s<seed>`` (ReST on the society: asker,
people and places helpers, one policy, the tool scripted, knowledge fixed by
``CollabEnv.relabel``). ReST's policy of a seed is its checkpoint at the end of the iteration
whose single agent earns the highest mean reward (``validation_reward``; the first on ties)
on the questions of the ``select_splits`` together, which ReST never asks and the criteria
do not judge (early stopping; the SFT policy itself is not a candidate); with
``select_splits=()``, the last iteration's. Deployment
(``deploy``): each policy alone with both tools (mode 'single'), greedy actions, on every
question of each split. Metrics per split: search rate on
memorised and unmemorised questions, F1, searches per question, hedge rate, invalid rate and
the hedge AUROC: over the split's questions, the score is the policy's probability that its
final turn starts with ``hedge`` (the tokens of ``hedge``, teacher-forced on the context of
that turn) and the label is wrongness, F1 of the final answer < 1 (a bare ``hedge`` or an
invalid episode is wrong); ties count one half, NaN when one class is empty (every answer
right, as when the agent searches whatever it does not know). The closed-book hedge AUROC,
hedging against the policy's parametric accuracy (the paper's calibration): over the split's
questions, the score is the first action's log-odds of hedging over answering, log
p(``hedge``) - log p(``answer``) (first tokens, at the question), and the label is the
wrongness of the policy's closed-book answer (below: F1 < 1). The decision
AUROC, threshold-free: over the split's questions, the score is the first action's log-odds
of answering over searching, log p(``answer``) - log p(``search``) (first tokens, at the
question), and the label is memorised; it says how well the policy ranks what it knows,
whatever threshold its greedy action puts on that ranking. And the
memory recall (closed book): on the split's memorised questions, how often the policy,
forced to answer at once, ranks the true value first among its relation's values (64 with
two-word values, chance 1/64). The policy's mean group ``reward``, and the best achievable
with its own knowledge (``best_achievable``): per question, the best of answering with its
closed-book answer, hedging and one search (read right), as ``best_reward`` and how often
searching is best on memorised questions (``best_search_rate_memorised``): the search rate
that the first criterion's "at most 20%" can be checked against.
"""
import copy
import functools
import json
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from model import decode
from rl import envs, rest
from rl import episodes as ep
from rl.envs import collab
from training import checkpoint as ckpt_lib
from training import figures
from training import tokenizers
from training import workdir as workdir_lib

POLICIES = ('in_context', 'action_supervised', 'rest_single')
METRICS = ('search_rate_memorised', 'search_rate_unmemorised', 'f1', 'searches',
           'hedge_rate', 'invalid_rate', 'hedge_auroc', 'closed_book_hedge_auroc',
           'decision_auroc', 'memory_recall',
           'reward', 'best_reward', 'best_search_rate_memorised')


def run(config, workdir):
  """Runs (or resumes) every stage, deploys each policy, writes the table, JSON and plot."""
  root = workdir_lib.path(workdir)
  timings, start = {}, time.time()
  env_config = copy.deepcopy(config.stages.sft.env)
  env_config.unlock()
  env_config.mode = 'single'
  rollout = config.stages.sft.rollout
  deploying = dict(env_config=env_config, max_new_tokens=rollout.max_new_tokens,
                   max_turns=rollout.max_turns, seed=config.seeds[0])
  rest_steps = iteration_steps(config.stages.rest)
  select = tuple(config.select_splits)
  check_select_splits(select, envs.make_env(env_config))
  root.mkdir(parents=True, exist_ok=True)  # only once the config is known to be usable
  for name in ('sft', 'oracle'):
    t0 = time.time()
    stage = rest.stage_config(config, name, config.seeds[0])
    if name == 'oracle':  # action-supervised: the in-context policy fine-tuned on oracle demos
      stage.sft.init_workdir = str(root / 'sft')
    rest.sft(stage, root / name)
    timings[name] = time.time() - t0
  dirs = {'in_context': [(root / 'sft', None)], 'action_supervised': [(root / 'oracle', None)],
          'rest_single': []}
  selection = []
  for seed in config.seeds:
    t0 = time.time()
    workdir_s = root / f'rest_s{seed}'
    rest.rest(rest.stage_config(config, 'rest', seed, str(root / 'sft')), workdir_s)
    rewards = ([validation_reward(workdir_s, step, select, **deploying)
                for step in rest_steps] if select else [])
    chosen = int(np.argmax(rewards)) if rewards else len(rest_steps) - 1
    selection.append({'seed': seed, 'iteration': chosen + 1, 'validation_rewards': rewards})
    dirs['rest_single'].append((workdir_s, rest_steps[chosen]))
    timings[f'rest_s{seed}'] = time.time() - t0
  results = {'policies': {}, 'splits': list(config.splits), 'select_splits': list(select),
             'rest_selection': selection}
  for policy, policy_dirs in dirs.items():
    runs = [deploy(d, splits=config.splits, step=step, **deploying) for d, step in policy_dirs]
    results['policies'][policy] = {
        split: {m: {'mean': float(np.mean([r[split][m] for r in runs])),
                    'per_seed': [r[split][m] for r in runs]} for m in METRICS + ('n',)}
        for split in config.splits}
  results['criteria'] = criteria(results['policies'])
  results['criteria_per_seed'] = [
      criteria(seed_view(results['policies'], i)) for i in range(len(config.seeds))]
  timings['total'] = time.time() - start
  results['timings_s'] = {k: round(v, 1) for k, v in timings.items()}
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'results.json', json.dumps(results, indent=1))
    workdir_lib.write_text(root / 'results.md', report(results))
    plot(results, root / 'collab.png')
  logging.info('repro_collab:\n%s', report(results))
  return results


# ---------------------------------------------------------------------------------------
# Deployment and metrics.
# ---------------------------------------------------------------------------------------
def auroc(scores, labels) -> float:
  """Area under the ROC curve of ``scores`` for the positive ``labels`` (Mann-Whitney U,
  ties one half); NaN when either class is empty."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  if scores.shape != labels.shape:
    raise ValueError(f'scores {scores.shape} and labels {labels.shape} differ in shape.')
  pos, neg = scores[labels], scores[~labels]
  if not len(pos) or not len(neg):
    return float('nan')
  diff = pos[:, None] - neg[None, :]
  return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@functools.partial(jax.jit, static_argnums=(0, 4))
def _context_pass(model, variables, tokens, lengths, max_len):
  """Right-padded contexts -> (log p(next token | each whole context) [B, V], their KV cache
  of ``max_len`` slots)."""
  steps = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  segment_ids = (steps < lengths[:, None]).astype(jnp.int32)
  logits, aux = model.apply(variables, tokens, positions=steps, segment_ids=segment_ids,
                            cache=model.init_cache(tokens.shape[0], max_len))
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], 1)[:, 0]
  return jax.nn.log_softmax(last.astype(jnp.float32), -1), aux['cache']


@functools.partial(jax.jit, static_argnums=0)
def _continuation_pass(model, variables, cache, rows, tokens, lengths, context_lengths):
  """Per row, log p(tokens[1:lengths] | its context (row ``rows`` of ``cache``), tokens[0]):
  the continuation after its first token, fed at the positions after the context."""
  cache = dict(cache, **{k: tuple(x[rows] for x in cache[k]) for k in ('k', 'v')},
               pos=cache['pos'][rows])
  steps = jnp.arange(tokens.shape[1] - 1)
  real = steps[None] < lengths[:, None] - 1  # the fed tokens that predict a real one
  logits, _ = model.apply(variables, tokens[:, :-1], positions=context_lengths[:, None] + steps,
                          segment_ids=real.astype(jnp.int32), cache=cache)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return jnp.sum(jnp.where(real, picked, 0.0), -1)


def continuation_logprobs(model, variables, pad_id, contexts, continuations, chunk=512):
  """log p(continuation | context), teacher-forced, one per pair of token id lists (each
  continuation non-empty). Each distinct context runs once and its continuations share its
  KV cache (a closed-book answer scores 64 values on one context); batches of at most
  ``chunk`` rows, padded to few shapes (rows to a power of two, width to a multiple of 16)."""
  if len(contexts) != len(continuations):
    raise ValueError(f'{len(contexts)} contexts but {len(continuations)} continuations.')
  if not contexts:
    return np.zeros(0, np.float32)
  index = {}
  group = np.asarray([index.setdefault(tuple(c), len(index)) for c in contexts])
  unique = [list(c) for c in index]
  context_width = ep.padded_width(unique)
  max_len = context_width + ep.padded_width(continuations)
  firsts, caches = [], []
  for lo in range(0, len(unique), chunk):
    part = unique[lo:lo + chunk]
    tokens, lengths = ep.pad_rows(part, pad_id, width=context_width)
    first, cache = _context_pass(model, variables, tokens, lengths, max_len)
    firsts.append(np.asarray(first)[:len(part)])
    caches.append(jax.tree.map(lambda x, n=len(part): x[:n] if x.ndim else x, cache))
  cache = jax.tree.map(lambda *x: jnp.concatenate(x) if x[0].ndim else x[0], *caches)
  out = np.concatenate(firsts)[group, [k[0] for k in continuations]]
  longer = [i for i, k in enumerate(continuations) if len(k) > 1]
  for lo in range(0, len(longer), chunk):
    part = longer[lo:lo + chunk]
    tokens, lengths = ep.pad_rows([continuations[i] for i in part], pad_id)
    rows, context_lengths = np.zeros((2, len(tokens)), np.int32)
    rows[:len(part)] = group[part]
    context_lengths[:len(part)] = [len(contexts[i]) for i in part]
    rest_logp = _continuation_pass(model, variables, cache, rows, tokens, lengths,
                                   context_lengths)
    out[part] += np.asarray(rest_logp)[:len(part)]
  return out


def hedge_probabilities(model, variables, formatter, env, episodes, role='assistant'):
  """Per finished episode, the policy's probability that ``role``'s final turn starts with
  the tokens of ``hedge`` (teacher-forced on that turn's context)."""
  hedge = formatter.tokenizer.encode('hedge')
  contexts = []
  for e in episodes:
    view = env.view(e, role)
    last = max(i for i, t in enumerate(view) if t.role == role)
    contexts.append(formatter.context(view[:last], role))
  return np.exp(continuation_logprobs(model, variables, formatter.tokenizer.pad_id, contexts,
                                      [hedge] * len(contexts)))


def _first_turn_scores(model, variables, formatter, env, questions, replies, role):
  """log p(reply | the question asked afresh, ``role`` to speak first) for each question
  (a key of ``env.facts``) and each of ``replies(key)`` (token id lists), flat in that
  order."""
  contexts, continuations = [], []
  for key in questions:
    episode = env.reset(np.random.default_rng(0), question=key)
    context = formatter.context(env.view(episode, role), role)
    for reply in replies(key):
      contexts.append(context)
      continuations.append(reply)
  return continuation_logprobs(model, variables, formatter.tokenizer.pad_id, contexts,
                               continuations)


FIRST_ACTIONS = (collab.ANSWER, collab.SEARCH, collab.HEDGE)


def first_action_logprobs(model, variables, formatter, env, questions, role='assistant'):
  """Per question (a key of ``env.facts``), log p of each of ``FIRST_ACTIONS`` as
  ``role``'s first action at the question (the first token of each word): [questions, 3]."""
  actions = [formatter.tokenizer.encode(a)[:1] for a in FIRST_ACTIONS]
  return _first_turn_scores(model, variables, formatter, env, questions, lambda _: actions,
                            role).reshape(-1, len(FIRST_ACTIONS))


def closed_book_answers(model, variables, formatter, env, questions, role='assistant'):
  """Per question (a key of ``env.facts``), the value of its relation the policy finds most
  likely as the whole first turn ``answer VALUE`` (closed book)."""
  if not questions:
    return []
  tokenizer = formatter.tokenizer
  replies = lambda key: [tokenizer.encode(f'{collab.ANSWER} {value}') + [formatter.end_id]
                         for value in env.values[key[2]]]
  scores = _first_turn_scores(model, variables, formatter, env, questions, replies,
                              role).reshape(len(questions), -1)
  return [env.values[key[2]][i] for key, i in zip(questions, scores.argmax(1))]


def best_achievable(env, questions, answers) -> dict:
  """The best achievable with the policy's own knowledge (``CollabEnv.best_action`` per
  question, given its closed-book ``answers``): mean group reward and how often searching is
  best on memorised questions."""
  best = [env.best_action(collab.f1(a, env.facts[q])) for q, a in zip(questions, answers)]
  known = [action == collab.SEARCH for q, (action, _) in zip(questions, best)
           if q in env.memorised]
  return {'best_reward': float(np.mean([r for _, r in best])),
          'best_search_rate_memorised': float(np.mean(known)) if known else float('nan')}


def iteration_steps(rest_config) -> list:
  """The training step at the end of each ReST iteration of the stage ``rest_config``; the
  stage must checkpoint every iteration and keep them all."""
  cfg, train = rest_config.rest, rest_config.train
  per_iteration = len(cfg.thresholds) * cfg.steps_per_improve
  if per_iteration % train.checkpoint_every or train.keep_checkpoints < cfg.iterations:
    raise ValueError(
        f'stages.rest.train.checkpoint_every={train.checkpoint_every} and keep_checkpoints='
        f'{train.keep_checkpoints}: choosing ReST\'s iteration needs a checkpoint at the end '
        f'of each of the {cfg.iterations} iterations ({per_iteration} steps each), all kept.')
  return [per_iteration * (i + 1) for i in range(cfg.iterations)]


def check_select_splits(splits, env):
  """``splits`` (none, or splits of ``env`` that ReST never asks and the criteria do not
  judge) may choose ReST's iteration; else a ValueError before any training."""
  judged = ('test', 'ood')
  for split in splits:
    if split not in env.splits or split in judged or split.startswith('train'):
      raise ValueError(f'select_splits has {split!r}: choose ReST\'s iteration on splits of '
                       f'{sorted(env.splits)} other than the train splits and {judged} (the '
                       "criteria's), e.g. ('demo',), or () for the last iteration.")


def load_policy(policy_dir, env_config, step=None):
  """(model, variables, env, formatter) of the policy of ``policy_dir`` (its checkpoint
  ``step``, default the latest) in the environment of ``env_config``."""
  model, variables = ckpt_lib.load_model(policy_dir, step)
  tokenizer = tokenizers.load_tokenizer(policy_dir / tokenizers.TOKENIZER_SUBDIR)
  env = envs.make_env(env_config)
  return model, variables, env, ep.Formatter(tokenizer, env.roles)


def play_split(policy, split, max_new_tokens, max_turns, seed) -> list:
  """The episodes of ``policy`` (``load_policy``) alone with both tools, greedy, once on
  every question of ``split``."""
  model, variables, env, formatter = policy
  actor = ep.Actor(model, variables, decode.SamplingConfig(greedy=True), max_new_tokens)
  episodes = [env.reset(np.random.default_rng(seed), split, question=q)
              for q in env.splits[split]]
  ep.rollout(env, episodes, {'assistant': actor}, formatter, jax.random.PRNGKey(seed),
             max_turns)
  return episodes


def validation_reward(policy_dir, step, splits, env_config, max_new_tokens, max_turns,
                      seed) -> float:
  """Mean group reward of the policy at checkpoint ``step`` over every question of the
  ``splits`` (``play_split``), rounded to 9 decimals so that equal scores tie whatever the
  summation order: the score by which the job chooses ReST's iteration."""
  policy = load_policy(policy_dir, env_config, step)
  rewards = [e.reward for split in splits
             for e in play_split(policy, split, max_new_tokens, max_turns, seed)]
  return round(float(np.mean(rewards)), 9)


def deploy(policy_dir, env_config, splits, max_new_tokens, max_turns, seed, step=None):
  """The policy of ``policy_dir`` (its checkpoint ``step``, default the latest) alone with
  both tools, greedy, on every question of each split -> {split: env summary + hedge_auroc +
  n}."""
  policy = load_policy(policy_dir, env_config, step)
  model, variables, env, formatter = policy
  out = {}
  for split in splits:
    episodes = play_split(policy, split, max_new_tokens, max_turns, seed)
    p_hedge = hedge_probabilities(model, variables, formatter, env, episodes)
    wrong = [e.info.get('f1', 0.0) < 1 for e in episodes]
    questions = env.splits[split]
    answers = closed_book_answers(model, variables, formatter, env, questions)
    recall = [a == env.facts[q] for q, a in zip(questions, answers) if q in env.memorised]
    known = [q in env.memorised for q in questions]
    logp = dict(zip(FIRST_ACTIONS, first_action_logprobs(model, variables, formatter, env,
                                                         questions).T))
    closed_book_wrong = [collab.f1(a, env.facts[q]) < 1 for q, a in zip(questions, answers)]
    out[split] = dict(env.summary(episodes), hedge_auroc=auroc(p_hedge, wrong),
                      closed_book_hedge_auroc=auroc(logp[collab.HEDGE] - logp[collab.ANSWER],
                                                    closed_book_wrong),
                      decision_auroc=auroc(logp[collab.ANSWER] - logp[collab.SEARCH], known),
                      memory_recall=float(np.mean(recall)) if recall else float('nan'),
                      reward=float(np.mean([e.reward for e in episodes])),
                      **best_achievable(env, questions, answers), n=len(episodes))
  return out


def seed_view(policies, i):
  """``policies`` with ReST's mean replaced by its seed ``i``'s value."""
  view = dict(policies)
  view['rest_single'] = {split: {m: {'mean': v['per_seed'][i]} for m, v in metrics.items()}
                         for split, metrics in policies['rest_single'].items()}
  return view


def criteria(policies, split='test', ood='ood') -> dict:
  """The done-when criteria of the reproduction (on the policies' ``mean`` values): True or
  False, or None where undefined (a hedge AUROC when no answer or every answer is wrong:
  there is nothing to rank)."""
  mean = lambda p, s, m: policies[p][s][m]['mean']
  searches = mean('rest_single', split, 'searches')
  ratio = mean('in_context', split, 'searches') / searches if searches else float('inf')
  defined = lambda value: None if np.isnan(value) else bool(value >= 0.8)
  return {
      'searches on >= 80% of unmemorised, <= 20% of memorised (test)': bool(
          mean('rest_single', split, 'search_rate_unmemorised') >= 0.8 and
          mean('rest_single', split, 'search_rate_memorised') <= 0.2),
      'F1 >= in-context F1 with 2-5x fewer searches (test)': bool(
          mean('rest_single', split, 'f1') >= mean('in_context', split, 'f1') and
          2 <= ratio <= 5),
      'hedge AUROC >= 0.8 (test)': defined(mean('rest_single', split, 'hedge_auroc')),
      'closed-book hedge AUROC >= 0.8 (test)': defined(
          mean('rest_single', split, 'closed_book_hedge_auroc')),
      'F1 > action-supervised F1 (ood)': bool(
          mean('rest_single', ood, 'f1') > mean('action_supervised', ood, 'f1')),
  }


def report(results) -> str:
  """The table (ReST: mean ± sd over seeds), the criteria on the means and per seed, and
  the timings (results.md)."""
  def cell(value):
    if len(value['per_seed']) < 2:
      return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {np.std(value['per_seed'], ddof=1):.3f}"
  lines = ['| policy | split | n | search rate, memorised | search rate, unmemorised | F1 | '
           'searches / question | hedge rate | invalid rate | hedge AUROC | closed-book hedge '
           'AUROC | decision AUROC | memory recall | reward | best reward | best search rate, '
           'memorised |', '|---' * (3 + len(METRICS)) + '|']
  for split in results['splits']:
    for policy, by_split in results['policies'].items():
      s = by_split[split]
      lines.append(f"| {policy} | {split} | {s['n']['mean']:.0f} | " +
                   ' | '.join(cell(s[m]) for m in METRICS) + ' |')
  per_seed = results['criteria_per_seed']
  lines.append('')
  verdict = {True: 'holds', False: 'does not hold', None: 'is undefined'}
  for name, ok in results['criteria'].items():
    undefined = sum(c[name] is None for c in per_seed)
    lines.append(f"- {verdict[ok]} on the means, in {sum(c[name] is True for c in per_seed)} "
                 f"of {len(per_seed)} seeds" + (f' (undefined in {undefined})' if undefined
                                                 else '') + f': {name}')
  if 'test' in results['splits']:
    searches = results['policies']['rest_single']['test']['searches']['per_seed']
    in_context = results['policies']['in_context']['test']['searches']['mean']
    lines.append('- in-context searches / ReST searches per seed (test): ' + ', '.join(
        f'{in_context / s:.2f}' if s else 'inf' for s in searches))
  for chosen in results.get('rest_selection', []):
    rewards = ', '.join(f'{r:.3f}' for r in chosen['validation_rewards'])
    lines.append(f"- ReST seed {chosen['seed']}: iteration {chosen['iteration']}" + (
        f" (mean reward per iteration on {' + '.join(results['select_splits'])}: {rewards})"
        if rewards else ' (the last)'))
  lines.append('')
  lines.append('Wall time: ' + ', '.join(f'{k} {v / 60:.1f} min'
                                         for k, v in results['timings_s'].items()) + '.')
  return '\n'.join(lines) + '\n'


def plot(results, path):
  """One panel per metric: policies side by side on each split."""
  plt = figures.pyplot()
  metrics = ('search_rate_memorised', 'search_rate_unmemorised', 'f1', 'searches',
             'hedge_auroc', 'closed_book_hedge_auroc')
  splits, policies = results['splits'], list(results['policies'])
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
  width = 0.8 / len(policies)
  for ax, metric in zip(axes, metrics):
    for j, policy in enumerate(policies):
      values = [results['policies'][policy][s][metric]['mean'] for s in splits]
      ax.bar(np.arange(len(splits)) + j * width, values, width, label=policy)
    ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, splits)
    ax.set_title(metric, fontsize=9)
  axes[0].legend(fontsize=7)
  figures.save(fig, path)
