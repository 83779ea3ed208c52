"""Plantain's measurement and inference procedures (arXiv:2512.03176, PAPERS.md §5) on
``rl.envs.plantain``.

* ``ttfr``: time-to-first-response (Sec. 3): tokens generated before the first visible
  answer token, i.e. through the first ``<answer>`` tag (for think-then-answer: the
  thinking, ``</think>`` and that tag).
* ``best_of_n_plans`` (Sec. 5): N plans (first segments) per problem, scored by the rule
  judge (``rl.envs.plantain.judge_plan``); the best (the first of the best) is continued.
* ``rewind_at_plan`` (Sec. 5, rewind-and-repeat): a plan the judge rejects goes into the
  context (``not: plan: ...``, the latest ``max_rejected`` of them) and only the plan is
  regenerated, up to ``max_rewinds`` times; then the response is continued.
* ``rewind_at_answer``: the whole response is generated and, when it is judged wrong,
  regenerated from scratch, up to ``max_rewinds`` times; ``judge='plan'`` applies the same
  plan judge to the finished response (the same decision, taken late), ``judge='oracle'``
  checks the final answer itself.
Each returns per-problem arrays: ``correct`` (pass@1 of the response kept), ``tokens``
(every generated token, rejected attempts included), ``rewinds``, ``plan_ok``.

Generation goes through a callable ``generate(contexts, rng, stop_tokens, max_new_tokens)
-> [(ids, ended)]`` (``PolicyGenerator`` batches ``model.decode.generate``; tests pass
scripted ones).
"""
import copy

import jax
import numpy as np

from model import decode
from rl import episodes as ep
from rl.envs import base
from rl.envs import plantain as env_lib


def ttfr(ids, formatter) -> int:
  """Time-to-first-response of one generated turn (module docstring); a turn without an
  answer segment never showed anything: all its tokens."""
  ids = [int(i) for i in ids]
  answer = formatter.markup_ids[env_lib.ANSWER]
  return ids.index(answer) + 1 if answer in ids else len(ids)


class PolicyGenerator:
  """``generate`` for a policy: batches of ``batch`` contexts through
  ``rl.episodes.generate_turns`` (KV-cached ``model.decode.generate``)."""

  def __init__(self, model, variables, formatter, sampling: decode.SamplingConfig,
               batch: int = 256):
    self.model, self.variables, self.formatter = model, variables, formatter
    self.sampling, self.batch = sampling, batch

  def __call__(self, contexts, rng, stop_tokens, max_new_tokens):
    actor = ep.Actor(self.model, self.variables, self.sampling, max_new_tokens)
    out = []
    for start in range(0, len(contexts), self.batch):
      out += ep.generate_turns(actor, contexts[start:start + self.batch], self.formatter,
                               jax.random.fold_in(rng, start), stop_tokens=stop_tokens)
    return [(ids, ended) for ids, _, ended in out]


def _context(env, episode, formatter, prefix=()):
  return formatter.context(env.view(episode, 'assistant'), 'assistant') + list(prefix)


def _finish(env, episodes, prefixes, generate, formatter, rng, max_new_tokens):
  """Continues each episode's response after its prefix ids to the end of the turn; scores
  it with the environment. Returns (finished episode copies, generated tokens)."""
  contexts = [_context(env, e, formatter, p) for e, p in zip(episodes, prefixes)]
  budget = max_new_tokens - min(len(p) for p in prefixes)
  outs = generate(contexts, rng, (formatter.end_id,), max(1, budget))
  done, tokens = [], []
  for episode, prefix, (ids, ended) in zip(episodes, prefixes, outs):
    episode = copy.deepcopy(episode)
    full = list(prefix) + list(ids)
    episode.turns.append(base.Turn('assistant', formatter.decode(full), full, None, ended))
    env.step(episode)
    done.append(episode)
    tokens.append(len(ids) + int(ended))
  return done, np.asarray(tokens)


def _plans(env, episodes, generate, formatter, rng, plan_tokens):
  """One plan segment per episode: (prefix ids ending at ``</answer>``, judge score, plan,
  generated tokens)."""
  close = formatter.markup_ids[env_lib.END_ANSWER]
  outs = generate([_context(env, e, formatter) for e in episodes], rng, (close,), plan_tokens)
  result = []
  for episode, (ids, ended) in zip(episodes, outs):
    prefix = list(ids) + ([close] if ended else [])
    plan = env_lib.parse_plan(formatter.decode(prefix)) if ended else None
    result.append((prefix, env_lib.judge_plan(plan, episode.ops), plan, len(prefix)))
  return result


def _result(episodes, tokens, rewinds):
  return dict(correct=np.asarray([e.info['acc'] for e in episodes]),
              plan_ok=np.asarray([e.info['plan_ok'] for e in episodes]),
              tokens=np.asarray(tokens, np.float64), rewinds=np.asarray(rewinds))


def sample_responses(env, problems, generate, formatter, rng, max_new_tokens):
  """One whole response per problem: the finished episodes and their generated tokens."""
  return _finish(env, problems, [[] for _ in problems], generate, formatter, rng,
                 max_new_tokens)


def best_of_n_plans(env, problems, generate, formatter, rng, n, plan_tokens, max_new_tokens):
  """Best-of-N over plans (module docstring)."""
  copies = [p for p in problems for _ in range(n)]
  plans = _plans(env, copies, generate, formatter, jax.random.fold_in(rng, 0), plan_tokens)
  chosen, spent = [], []
  for i in range(len(problems)):
    group = plans[i * n:(i + 1) * n]
    best = max(range(n), key=lambda j: group[j][1])  # the first of the best
    chosen.append(group[best][0])
    spent.append(sum(g[3] for g in group))
  done, tokens = _finish(env, problems, chosen, generate, formatter,
                         jax.random.fold_in(rng, 1), max_new_tokens)
  return _result(done, np.asarray(spent) + tokens, np.zeros(len(problems)))


def rewind_at_plan(env, problems, generate, formatter, rng, max_rewinds, plan_tokens,
                   max_new_tokens):
  """Rewind-and-repeat at the plan (module docstring)."""
  current = list(problems)
  prefixes, spent = [None] * len(problems), np.zeros(len(problems))
  rewinds, active = np.zeros(len(problems), np.int64), list(range(len(problems)))
  for attempt in range(max_rewinds + 1):
    plans = _plans(env, [current[i] for i in active], generate, formatter,
                   jax.random.fold_in(rng, attempt), plan_tokens)
    still = []
    for i, (prefix, score, plan, count) in zip(active, plans):
      spent[i] += count
      prefixes[i] = prefix
      if score < 1.0 and attempt < max_rewinds:
        rewinds[i] += 1
        rejected = (current[i].rejected + ((plan,) if plan else ()))
        current[i] = env.with_rejected(current[i], rejected[-env.config.max_rejected:])
        still.append(i)
    active = still
    if not active:
      break
  done, tokens = _finish(env, current, prefixes, generate, formatter,
                         jax.random.fold_in(rng, max_rewinds + 1), max_new_tokens)
  return _result(done, spent + tokens, rewinds)


JUDGES = ('plan', 'oracle')


def rewind_at_answer(env, problems, generate, formatter, rng, max_rewinds, max_new_tokens,
                     judge='plan'):
  """Rewinding at the final answer (module docstring)."""
  if judge not in JUDGES:
    raise ValueError(f'judge={judge!r} must be one of {JUDGES}.')
  key = 'plan_ok' if judge == 'plan' else 'acc'
  final, spent = [None] * len(problems), np.zeros(len(problems))
  rewinds, active = np.zeros(len(problems), np.int64), list(range(len(problems)))
  for attempt in range(max_rewinds + 1):
    done, tokens = sample_responses(env, [problems[i] for i in active], generate, formatter,
                                    jax.random.fold_in(rng, attempt), max_new_tokens)
    still = []
    for i, episode, count in zip(active, done, tokens):
      spent[i] += count
      final[i] = episode
      if episode.info[key] < 1.0 and attempt < max_rewinds:
        rewinds[i] += 1
        still.append(i)
    active = still
    if not active:
      break
  return _result(final, spent, rewinds)
