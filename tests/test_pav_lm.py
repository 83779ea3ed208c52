"""PAV on a language task (rl/envs/arith.py, rl/pav.py labels and verifier, rl/pav_search.py)
against hand-built stubs with known answers."""
import collections

import jax
import ml_collections
import numpy as np
import pytest

from configs import base as base_configs
from configs.rl import arith as arith_config
from model import decode
from model.registry import build_model
from rl import episodes as ep
from rl import pav, pav_search
from rl import value as value_lib
from rl.envs import arith
from training import tokenizers


# -- The arithmetic environment. ----------------------------------------------------------
def test_every_demonstration_scores_correct_and_splits_are_disjoint():
  env = arith.ArithEnv()
  seen = collections.defaultdict(set)
  for split in arith.SPLITS:
    rng = np.random.default_rng(0)
    for _ in range(300):
      demo = env.demonstration(rng, split)
      assert demo.reward == 1.0 and demo.info['malformed'] == 0.0
      lines = arith.steps(demo.turns[-1].text)
      assert len(lines) == len(demo.ops) + 1
      assert eval(demo.problem) == demo.answer  # pylint: disable=eval-used
      for line in lines[:-1]:  # every step is a true equation
        left, right = line.split('=')
        assert eval(left) == int(right)  # pylint: disable=eval-used
      assert arith.split_of(demo.problem, env.config.test_every) == split
      seen[split].add(demo.problem)
  assert not seen['train'] & seen['test']


@pytest.mark.parametrize('text,expected', [
    ('2+3=5\nanswer: 5', 5), ('answer: 0', 0), ('answer: 12', 12),
    ('answer: 012', None), ('answer: 12 ', None), ('answer:12', None), ('answer: -3', None),
    ('2+3=5\nanswer: 5\n', None), ('', None), ('answer: 5\n2+3=5', None), ('\xff\n', None),
    ('answer: 1e3', None)])
def test_parser_reads_only_a_well_formed_last_line(text, expected):
  assert arith.parse_answer(text) == expected
  assert arith.score(5, text) == float(expected == 5)


def test_cut_off_turn_scores_zero_and_bad_config_is_named():
  env = arith.ArithEnv()
  episode = env.reset(np.random.default_rng(1))
  episode.turns.append(arith.base.Turn('assistant', env.solution(episode), ended=False))
  env.step(episode)
  assert episode.reward == 0.0 and episode.info['malformed'] == 1.0
  bad = arith.default_config()
  bad.min_ops = 0
  with pytest.raises(ValueError, match='min_ops'):
    arith.ArithEnv(bad)
  with pytest.raises(ValueError, match='split'):
    env.reset(np.random.default_rng(0), 'heldout')


# -- Monte Carlo labels and first pit. -------------------------------------------------------
def test_first_pit_keeps_steps_up_to_the_first_zero():
  assert pav.first_pit([0.5, 0.25, 0.0, 0.5, 0.0]) == 3
  assert pav.first_pit([0.5, 0.25, 0.125]) == 3
  assert pav.first_pit([0.0, 1.0]) == 1
  assert pav.first_pit([0.5, 0.1, 0.3], eps=0.125) == 2


def test_mc_labels_match_a_stub_policy_with_known_success_rates():
  n_mc = 4
  # successes out of n_mc after h steps, per problem; the stub policy succeeds on the first
  # k of every n_mc completions of a prefix, so the estimates are exact.
  table = {'p': [2, 3, 0, 4, 4], 'q': [4, 4, 4, 4]}
  rollouts = [('p', ['s1', 's2', 's3', 's4'], 0.0), ('q', ['t1', 't2', 't3'], 1.0)]
  calls, asked = collections.Counter(), []

  def complete(requests):
    asked.append(len(requests))
    out = []
    for problem, prefix in requests:
      key = (problem, len(prefix))
      out.append(float(calls[key] % n_mc < table[problem][len(prefix)]))
      calls[key] += 1
    return out

  labels = pav.mc_labels(complete, rollouts, n_mc)
  # p: 0.5, 0.75, then a pit at step 2 (value 0): labelled up to and including it.
  np.testing.assert_allclose(labels[0], [0.5, 0.75, 0.0])
  # q: no pit; the value after the last step is the rollout's outcome, not sampled.
  np.testing.assert_allclose(labels[1], [1.0, 1.0, 1.0, 1.0])
  assert ('p', 3) not in calls and ('q', 3) not in calls  # nothing past a pit or the end
  assert asked == [2 * n_mc] * 3  # round 3 is q's full solution: its outcome


# -- The verifier's loss. ----------------------------------------------------------------------
def test_class_balanced_weights_and_soft_cross_entropy_on_hand_numbers():
  w = pav.class_balanced_weights([0.2, 0.9, 0.8])
  np.testing.assert_allclose(w, [1.5, 0.75, 0.75])
  np.testing.assert_allclose(pav.class_balanced_weights([0.7, 0.9]), [1.0, 1.0])
  logits, labels = np.array([0.0, 2.0, -1.0]), np.array([0.3, 1.0, 0.25])
  p = 1 / (1 + np.exp(-logits))
  expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(pav.soft_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_verifier_loss_is_the_weighted_mean_at_labelled_positions():
  model = value_lib.WithValueHead(build_model(base_configs.model_config(
      vocab_size=16, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32)))
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % 16
  variables = model.init(jax.random.PRNGKey(0), tokens)
  variables['params']['value_head']['bias'] = np.ones((1,), np.float32)  # every logit 1
  mask = np.zeros((2, 6), np.int32)
  mask[0, 2] = mask[1, 5] = 1
  labels = np.where(mask, [[0, 0, 0.2, 0, 0, 0], [0, 0, 0, 0, 0, 0.9]], 0).astype(np.float32)
  weights = np.where(mask, [[0, 0, 1.5, 0, 0, 0], [0, 0, 0, 0, 0, 0.5]], 0).astype(np.float32)
  batch = dict(tokens=tokens, targets=tokens, positions=np.tile(np.arange(6), (2, 1)),
               segment_ids=np.ones_like(tokens), loss_mask=mask, value_labels=labels,
               value_weights=weights)
  ctx = collections.namedtuple('Ctx', 'rng step n_tokens accum args')(
      jax.random.PRNGKey(1), 0, 2.0, 1, None)
  loss, metrics, _ = pav.verifier_loss()(model, variables, batch, ctx)
  ce = lambda y: np.log1p(np.exp(1.0)) - y  # softplus(1) - y * 1
  np.testing.assert_allclose(loss, (1.5 * ce(0.2) + 0.5 * ce(0.9)) / 2, rtol=1e-5)
  sig = 1 / (1 + np.exp(-1.0))
  np.testing.assert_allclose(metrics['mae'], (abs(sig - 0.2) + abs(sig - 0.9)) / 2, rtol=1e-5)


# -- Beam search bookkeeping. --------------------------------------------------------------------
def _stub_sampler(end_at):
  """Beam elements' ``expansions`` requests arrive together: the j-th gets step 'x<j>'.
  A step ends the turn at prefix length ``end_at``; every step costs 3 tokens."""
  counter = collections.Counter()

  def sample(requests):
    out = []
    for problem, prefix in requests:
      j = counter[problem] % 3
      counter[problem] += 1
      out.append((f'x{j}', 3, 'end' if len(prefix) == end_at else 'newline'))
    return out
  return sample


def _q_of_steps(candidates):  # Q^pi after each prefix: 0.1 x the sum of the step digits
  return [np.cumsum([0.0] + [int(s[1]) / 10 for s in steps]) for _, steps, _ in candidates]


def test_beam_search_counts_tokens_and_keeps_the_top_width():
  result = pav_search.beam_search(['a', 'b'], _stub_sampler(end_at=1), _q_of_steps,
                                  _q_of_steps, width=2, alpha=0.0, max_steps=5)
  # Round 1: 2 beams x 3 samples, top 2 are both 'x2'; round 2: 6 more, all finished.
  assert result.tokens.tolist() == [36, 36]
  assert result.chosen == [['x2', 'x2'], ['x2', 'x2']]
  # The outcome scorer picks the final answer among finished candidates.
  # A flat process scorer keeps the first candidates (stable ties): round 1 keeps x0, x1,
  # x2 of the first beam; round 2's top 3 are x0 + each of x0, x1, x2.
  flat = lambda cands: [np.zeros(1 + len(steps)) for _, steps, _ in cands]
  result = pav_search.beam_search(['a'], _stub_sampler(end_at=1), flat, _q_of_steps,
                                  width=3, alpha=0.0, max_steps=5)
  assert result.chosen == [['x0', 'x2']]
  # Nothing finishes within max_steps: no answer, tokens still counted.
  result = pav_search.beam_search(['a'], _stub_sampler(end_at=9), _q_of_steps, _q_of_steps,
                                  width=1, max_steps=2)
  assert result.chosen == [None] and result.tokens.tolist() == [18]
  assert pav_search.accuracy(['a'], result.chosen, lambda p, t: 1.0) == 0.0


def test_effective_score_top_indices_and_best_of_n_on_hand_numbers():
  # q_mu = 1 - (1 - q)^2: 0.36 -> 0.75; 0.5 + 0.5 * 0.39.
  assert pav_search.effective_score([0.9, 0.2, 0.5], k=2, alpha=0.5) == pytest.approx(0.695)
  assert pav_search.top_indices([0.1, 0.3, 0.3, 0.2], 2) == [1, 2]
  curve = pav_search.best_of_n_curve([[0.1, 0.9, 0.5, 0.2]], [[0, 1, 0, 1]],
                                     [[10, 20, 30, 40]], (1, 2, 4))
  assert curve == [(1, 0.5, 25.0), (2, 0.5, 50.0), (4, 1.0, 100.0)]


# -- The model-backed sampler and verifier. ---------------------------------------------------
@pytest.fixture(scope='module')
def tiny():
  env = arith.ArithEnv()
  tok = tokenizers.ByteTokenizer(ep.reserved_tokens(env.roles))
  formatter = ep.Formatter(tok, env.roles)
  policy = build_model(base_configs.model_config(
      vocab_size=264, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64))
  variables = policy.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
  sampler = pav.PolicySampler(env, policy, variables, formatter,
                              decode.SamplingConfig(temperature=1.0), max_new_tokens=12,
                              max_step_tokens=6, batch=4)
  return env, sampler


def test_sampler_counts_and_verifier_reads_one_value_per_state(tiny):
  env, sampler = tiny
  problems = [env.reset(np.random.default_rng(i)) for i in range(3)]
  requests = [(p, prefix) for p, prefix in zip(problems, ([], ['2+3=5'], ['1', '2']))]
  for one_step in (True, False):
    limit = 6 if one_step else 12
    for text, count, stop in sampler.sample(requests, jax.random.PRNGKey(0), one_step):
      assert stop in pav.STOPS and (one_step or stop != 'newline')
      assert 1 <= count <= limit and (stop != 'limit' or count == limit)
      assert '\n' not in text or not one_step
  ids, positions = pav.state_sequence(sampler, problems[0], ['1+1=2', 'answer: 2'], True)
  assert [ids[p] for p in positions] == [sampler.formatter.role_ids['assistant'],
                                          sampler.newline_id, sampler.formatter.end_id]
  model = value_lib.WithValueHead(sampler.model)
  params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8), np.int32))
  params['params']['value_head']['kernel'] = np.full((32, 1), 0.3, np.float32)
  verifier = pav.Verifier(model, params, sampler, batch=2)
  cands = [(problems[0], ['1+1=2', 'answer: 2'], True), (problems[1], ['7'], False),
           (problems[2], ['2*3=6', '6+1=7', 'answer: 7'], True)]
  together, alone = verifier.values(cands), [verifier.values([c])[0] for c in cands]
  for c, a, b in zip(cands, together, alone):
    assert a.shape == (1 + len(c[1]),) and np.all((a > 0) & (a < 1))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # padding does not leak


# -- Bad input. ------------------------------------------------------------------------------
def test_bad_input_is_named_before_any_work():
  with pytest.raises(ValueError, match='n_mc'):
    pav.mc_labels(lambda r: [], [('p', ['a'], 1.0)], n_mc=0)
  for kwargs, field in ((dict(alpha=-0.1), 'alpha'), (dict(width=0), 'width'),
                        (dict(k=0), 'k=')):
    args = dict(width=1, k=4, alpha=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
      pav_search.beam_search(['a'], None, None, None, **args)
  config = arith_config.get_config('pav')
  config.verifier.policy_workdir = '/nonexistent'
  config.verifier.n_mc = 0
  with pytest.raises(ValueError, match='config.verifier.n_mc'):
    pav.check_verifier_config(config)
  tok = tokenizers.ByteTokenizer(ep.reserved_tokens(arith.ArithEnv.roles))
  policy_config = {'model': dict(config.model)}
  pav.check_matches_policy(config, tok, policy_config)
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.model.vocab_size = 300
  with pytest.raises(ValueError, match='config.model.vocab_size'):
    pav.check_matches_policy(wrong, tok, policy_config)
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.tokenizer.reserved_tokens = ('<|user|>', '<|end|>')
  with pytest.raises(ValueError, match='config.tokenizer'):
    pav.check_matches_policy(wrong, tok, policy_config)
  formatter = type('Formatter', (), {'tokenizer': _TwoTokenNewline()})()
  with pytest.raises(ValueError, match='newline'):
    pav.PolicySampler(None, None, None, formatter, None)


class _TwoTokenNewline:
  kind = 'fake'

  def encode(self, text):
    return [1, 2] if text == '\n' else []
