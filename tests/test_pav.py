"""Process advantage verifiers (rl/pav.py) and the planted-subsequence toy (rl/envs/planted.py,
rl/repro_pav_toy.py) against brute-force enumeration and closed forms."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rl import pav, repro_pav_toy
from rl.envs import planted


def _contains(seq, target):
  m = len(target)
  return any(tuple(seq[i:i + m]) == tuple(target) for i in range(len(seq) - m + 1))


def _prover_on_prefix(prefix, target, vocab, gamma):
  """mu_gamma from the prefix itself (no automaton): weight gamma on y*[k], k the longest
  prefix of y* ending the response, unless y* already occurred."""
  p = np.ones(vocab)
  if not _contains(prefix, target):
    k = max(k for k in range(len(target)) if k == 0 or tuple(prefix[-k:]) == target[:k])
    p[target[k]] = gamma
  return p / p.sum()


def _brute_q(task, next_probs):
  """Q(prefix, a) for every prefix of length < length, by enumerating completions."""
  v, n = task.vocab_size, task.length
  prob, q = {}, {}
  for seq in itertools.product(range(v), repeat=n):
    p = 1.0
    for h in range(n):
      p *= next_probs(seq[:h], h)[seq[h]]
    prob[seq] = p
  success = {s: _contains(s, task.target) for s in prob}
  for h in range(n):
    for prefix in itertools.product(range(v), repeat=h):
      for a in range(v):
        head = prefix + (a,)
        mass = [(p, success[s]) for s, p in prob.items() if s[:h + 1] == head]
        total = sum(p for p, _ in mass)
        q[head] = sum(p for p, ok in mass if ok) / total
  return q, sum(p for s, p in prob.items() if success[s])


@pytest.mark.parametrize('target', [(0, 1), (1, 1)])
def test_prover_q_matches_enumeration(target):
  task = planted.PlantedTask(vocab_size=3, length=5, target=target)
  gamma = 4.0
  q_brute, success = _brute_q(
      task, lambda prefix, h: _prover_on_prefix(prefix, target, 3, gamma))
  q = np.asarray(planted.q_values(task, planted.prover_probs(task, gamma)))
  for head, expected in q_brute.items():
    h = len(head) - 1
    state = int(planted.states(task, jnp.asarray(head[:h] + (0,) * (task.length - h)))[h])
    np.testing.assert_allclose(q[h, state, head[-1]], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      planted.success_probability(task, planted.prover_probs(task, gamma)), success, rtol=1e-5)


def test_position_dependent_policy_matches_enumeration():
  task = planted.PlantedTask(vocab_size=3, length=5, target=(2, 0))
  table = np.random.default_rng(0).dirichlet(np.ones(3), size=task.length)  # [length, V]
  _, success = _brute_q(task, lambda prefix, h: table[h])
  probs = np.broadcast_to(table[:, None], (task.length, task.n_states, 3))
  np.testing.assert_allclose(planted.success_probability(task, probs), success, rtol=1e-5)


def test_paper_instance_closed_forms():
  task = planted.make_task(15, 10, 5, seed=0)
  assert len(set(task.target)) == 5
  # Distinct tokens: occurrences at 6 offsets; only offsets 0 and 5 can both hold.
  np.testing.assert_allclose(planted.success_probability(task, planted.uniform_probs(task)),
                             6 / 15**5 - 1 / 15**10, rtol=1e-5)
  np.testing.assert_allclose(planted.optimal_values(task)[0, 0], 1.0)
  short = planted.PlantedTask(15, 4, task.target)
  assert float(planted.optimal_values(short)[0, 0]) == 0.0
  successes = [float(planted.success_probability(task, planted.prover_probs(task, g)))
               for g in (1, 4, 15, 100)]
  assert successes == sorted(successes)


def test_trajectory_advantages_telescope_to_outcome():
  task = planted.make_task(6, 8, 3, seed=1)
  v = planted.values(task, planted.prover_probs(task, 5.0))
  tokens = jax.random.randint(jax.random.key(0), (32, task.length), 0, task.vocab_size)
  tokens = tokens.at[:4, 2:5].set(jnp.asarray(task.target))  # a few successes
  path = planted.states(task, tokens)
  q = planted.trajectory_values(v, path)
  a = pav.step_advantages(q)
  assert a.shape == (32, task.length)
  reward = planted.outcome(task, path)
  assert float(reward[:4].min()) == 1.0
  np.testing.assert_allclose(a.sum(-1), reward - v[0, 0], atol=1e-5)
  np.testing.assert_allclose(a.sum(-1), q[:, -1] - q[:, 0], atol=1e-6)


def test_best_of_k_q():
  q = jnp.asarray([0.0, 0.2, 0.5, 1.0])
  np.testing.assert_allclose(pav.best_of_k_q(q, 1), q)
  np.testing.assert_allclose(pav.best_of_k_q(q, 3), [0.0, 1 - 0.8**3, 0.875, 1.0], rtol=1e-6)
  assert np.all(np.diff([float(pav.best_of_k_q(0.3, k)) for k in range(1, 6)]) > 0)


def test_effective_rewards_shapes():
  a = jnp.asarray([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]])
  per_seq = pav.effective_rewards(jnp.asarray([1.0, -1.0]), a, 2.0)
  np.testing.assert_allclose(per_seq, [[1.2, 0.6, 1.6], [-1.0, 0.0, -2.0]], rtol=1e-6)
  per_step = pav.effective_rewards(jnp.ones((2, 3)), a, 0.0)
  np.testing.assert_allclose(per_step, np.ones((2, 3)))


@pytest.mark.parametrize('call, name', [
    (lambda: pav.best_of_k_q(0.5, 0), 'k='),
    (lambda: pav.effective_rewards(jnp.ones(2), jnp.ones((2, 3)), -0.1), 'alpha='),
    (lambda: pav.effective_rewards(jnp.ones(3), jnp.ones((2, 3)), 1.0), 'q_pi'),
    (lambda: pav.step_advantages(jnp.ones((4, 1))), 'q_mu'),
    (lambda: planted.prover_probs(planted.make_task(4, 4, 2, 0), 0.0), 'gamma='),
    (lambda: planted.make_task(4, 4, 5, 0), 'target_len='),
    (lambda: planted.PlantedTask(4, 4, (1, 4)), 'target='),
    (lambda: planted.PlantedTask(1, 4, (0,)), 'vocab_size='),
    (lambda: planted.values(planted.make_task(4, 4, 2, 0), np.ones((2, 4))), 'probs'),
])
def test_bad_inputs(call, name):
  with pytest.raises(ValueError, match=name):
    call()


def test_reinforce_improves_success_on_easy_instance():
  config = ml_collections.ConfigDict(dict(
      vocab_size=4, length=4, target_len=2, task_seed=0, hidden=16, optimizer='adam',
      learning_rate=3e-2, batch=32, steps=40))
  task = repro_pav_toy.task_from_config(config)
  keys = jax.vmap(jax.random.key)(jnp.arange(2))
  outcome = repro_pav_toy.make_train(task, config, 0.0)(
      keys, jnp.zeros((task.length + 1, task.n_states)))
  prover = planted.values(task, planted.prover_probs(task, 4.0))
  shaped = repro_pav_toy.make_train(task, config, 1.0)(keys, prover)
  start = float(planted.success_probability(task, planted.uniform_probs(task)))
  for curve in (np.asarray(outcome), np.asarray(shaped)):
    np.testing.assert_allclose(curve[:, 0], start, rtol=1e-5)  # uniform initial policy
    assert np.all(curve[:, -1] > start + 0.3)
