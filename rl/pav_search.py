"""Test-time search with process advantage verifiers ("Rewarding progress",
arXiv:2410.08146, Sec. 4.2) and the outcome-reward-model baseline.

PAV beam search, per problem: ``width`` beams start at the empty prefix; every round each
unfinished beam samples ``expansions`` next steps from the policy; every candidate is
scored by the effective reward of its last step under the verifier's Q estimates,
  score = Q^pi(s_h, a_h) + alpha * (Q^mu(s_h, a_h) - Q^mu(s_{h-1}, a_{h-1})),
with the Best-of-K prover's value Q^mu = 1 - (1 - Q^pi)^K (exact for that prover given
Q^pi at the same state, ``rl.pav.best_of_k_q``), and the top ``width`` candidates survive.
A surviving candidate that ended its turn joins the finished pool and stops expanding, so
the beam shrinks; after ``max_steps`` rounds the unfinished ones are dropped. The outcome
verifier picks the final answer among the finished pool (none finished: no answer, wrong).

ORM best-of-N: N full samples, the one with the highest outcome-verifier value is the
answer. Compute is the number of sampled tokens (stop tokens included; verifier passes
are not counted), summed over everything sampled for a problem.

The search takes callables (a sampler and scorers), so its bookkeeping is testable with
stubs; ``rl.pav.PolicySampler`` and ``rl.pav.Verifier`` are the model-backed ones.
"""
import dataclasses

import numpy as np

from rl import pav


@dataclasses.dataclass
class SearchResult:
  """Per problem: the chosen steps (None: nothing finished) and the tokens sampled."""
  chosen: list
  tokens: np.ndarray  # int64 [problems]


def effective_score(q_pi, k, alpha):
  """Score of a candidate from its Q^pi estimates [1 + h] (empty prefix first): the last
  step's Q^pi + alpha * the Best-of-K prover's advantage of that step."""
  q_pi = np.asarray(q_pi, np.float64)
  if q_pi.shape[0] < 2:
    raise ValueError(f'q_pi has {q_pi.shape[0]} values; a candidate has at least one step.')
  q_mu = 1.0 - (1.0 - q_pi[-2:]) ** k
  return float(q_pi[-1] + alpha * (q_mu[1] - q_mu[0]))


def top_indices(scores, width):
  """Indices of the ``width`` highest scores, best first (ties: the earlier index)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
  return order[:width].tolist()


def beam_search(problems, sample, process_values, outcome_values, width, k=4, alpha=0.5,
                expansions=3, max_steps=12):
  """PAV beam search over ``problems`` (module docstring), all problems batched together.

  Args:
    problems: opaque problem objects passed to the callables.
    sample: ``sample(requests) -> [(step text, tokens, stop)]`` for requests ``(problem,
      prefix steps)``: one next step each; stop 'newline' continues, 'end' or 'limit'
      finishes the candidate.
    process_values: ``process_values([(problem, steps, finished)]) -> [array [1 + h]]``:
      Q^pi estimates at the empty prefix and after each step.
    outcome_values: the same signature; its last value scores a finished candidate.
    width, k, alpha, expansions, max_steps: beam width B, prover's K, advantage weight,
      samples per beam element per round, rounds.

  Returns:
    ``SearchResult``.
  """
  if width < 1 or expansions < 1 or max_steps < 1:
    raise ValueError(f'width={width}, expansions={expansions}, max_steps={max_steps} must be '
                     '>= 1.')
  if k < 1:
    raise ValueError(f'k={k} must be >= 1.')
  if alpha < 0:
    raise ValueError(f'alpha={alpha} must be >= 0.')
  beams = [[[] for _ in range(width)] for _ in problems]  # unfinished prefixes
  finished = [[] for _ in problems]
  tokens = np.zeros(len(problems), np.int64)
  for _ in range(max_steps):
    owners = [i for i, b in enumerate(beams) for prefix in b for _ in range(expansions)]
    if not owners:
      break
    prefixes = [prefix for b in beams for prefix in b for _ in range(expansions)]
    pieces = sample([(problems[i], p) for i, p in zip(owners, prefixes)])
    candidates = []
    for i, prefix, (text, count, stop) in zip(owners, prefixes, pieces):
      tokens[i] += count
      candidates.append((problems[i], prefix + [text], stop != 'newline'))
    values = process_values(candidates)
    scores = [effective_score(v, k, alpha) for v in values]
    beams = [[] for _ in problems]
    for i in sorted(set(owners)):
      mine = [j for j, o in enumerate(owners) if o == i]
      for j in top_indices([scores[j] for j in mine], width):
        _, steps, done = candidates[mine[j]]
        (finished[i] if done else beams[i]).append(steps)
  pool = [(i, steps) for i, f in enumerate(finished) for steps in f]
  chosen = [None] * len(problems)
  if pool:
    final = [v[-1] for v in outcome_values([(problems[i], s, True) for i, s in pool])]
    best = {}
    for (i, steps), v in zip(pool, final):
      if i not in best or v > best[i][0]:
        best[i] = (v, steps)
    for i, (_, steps) in best.items():
      chosen[i] = steps
  return SearchResult(chosen, tokens)


def best_of_n_curve(scores, correct, tokens, ns):
  """ORM best-of-N from ``S`` samples per problem ([P, S] outcome-verifier scores, 0/1
  correctness and token counts): for each N dividing S, the S / N disjoint groups of N
  samples each pick their top-scored sample (ties: the first); returns ``[(N, accuracy,
  mean tokens per problem)]`` averaged over problems and groups."""
  scores, correct, tokens = (np.asarray(a, np.float64) for a in (scores, correct, tokens))
  p, s = scores.shape
  out = []
  for n in ns:
    if n < 1 or s % n:
      raise ValueError(f'N={n} must be >= 1 and divide the {s} samples per problem.')
    g = s // n
    sc, co, to = (a.reshape(p, g, n) for a in (scores, correct, tokens))
    pick = np.argmax(sc, axis=-1)[..., None]
    out.append((n, float(np.take_along_axis(co, pick, -1).mean()),
                float(to.sum(-1).mean())))
  return out


def accuracy(problems, chosen, reward):
  """Mean of ``reward(problem, text)`` over the chosen solutions (None scores 0)."""
  return float(np.mean([0.0 if steps is None else reward(p, '\n'.join(steps))
                        for p, steps in zip(problems, chosen)]))


def model_callables(sampler: pav.PolicySampler, rng):
  """``sample`` for ``beam_search`` from a ``PolicySampler``: every call draws with a
  fresh key folded from ``rng``."""
  import jax  # pylint: disable=g-import-not-at-top
  calls = iter(range(1 << 30))
  return lambda requests: sampler.sample(requests, jax.random.fold_in(rng, next(calls)),
                                         one_step=True)
