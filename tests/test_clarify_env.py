"""rl/envs/clarify.py: rewards against the analytic values of arXiv:2512.04068's miniature,
invalid actions, private views, cost splits, config errors, the evaluation grid's design."""
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import stats

from rl import envs
from rl.envs import base
from rl.envs import clarify


def _env(**overrides):
  config = clarify.default_config()
  config.update(overrides)
  return clarify.ClarifyEnv(config)


def _names_with_k(env, k):
  return [name for name, (senses, _, _) in env.world.items() if len(senses) == k]


def _play(env, episode, *texts):
  """Appends ``texts`` as the turns of the roles due, stepping after each."""
  for text in texts:
    episode.turns.append(base.Turn(episode.next_role, text))
    env.step(episode)
  return episode


class ClarifyEnvTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.env = _env()

  def test_world_covers_every_k(self):
    for k in (1, 2, 3):
      self.assertNotEmpty(_names_with_k(self.env, k))
    for senses, priors, answers in self.env.world.values():
      self.assertEqual(sum(priors), 100)
      self.assertEqual(list(priors), sorted(priors, reverse=True))
      self.assertLen(set(senses), len(senses))
      self.assertLen(set(answers), len(answers))

  @parameterized.parameters(*clarify.BEHAVIOURS)
  def test_demonstrations_get_the_analytic_reward(self, behaviour):
    rng = np.random.default_rng(1)
    for _ in range(100):
      e = self.env.demonstration(rng, behaviour=behaviour)
      self.assertTrue(e.done)
      intent_is_likeliest = e.answers[e.intent] == e.answers[0]
      expected = {
          'answer': (float(intent_is_likeliest), 0, 1),
          'enumerate': (1.0, 0, 2 * e.k),
          'clarify': (1.0, 1, 1),
      }
      action = (behaviour if behaviour != 'optimal'
                else next(a for a in clarify.ACTIONS if a in clarify.optimal_actions(e)))
      acc, n, words = expected[action]
      self.assertEqual(e.info['action'], action)
      self.assertEqual(e.info['final_action'], 'enumerate' if action == 'enumerate' else 'answer')
      self.assertEqual((e.info['acc'], e.info['n_clarifications'], e.info['words'],
                        e.info['k']), (acc, n, words, e.k))
      self.assertAlmostEqual(e.reward, acc - e.alpha * n - e.beta * words, places=12)
      self.assertEqual(e.info['optimal'], action in clarify.optimal_actions(e))
      if behaviour == 'optimal':
        self.assertTrue(e.info['optimal'])

  def test_clarify_demonstration_texts(self):
    e = self.env.demonstration(np.random.default_rng(0), behaviour='clarify',
                               name=_names_with_k(self.env, 2)[0], alpha=0.25, beta=0.035)
    self.assertAlmostEqual(e.reward, 1 - 0.25 - 0.035, places=12)
    self.assertEqual([t.role for t in e.turns], ['user', 'assistant', 'user', 'assistant'])
    self.assertEqual([t.text for t in e.turns], [
        f'where does {e.name} live ?', f'ask {e.senses[0]} or {e.senses[1]} ?',
        e.senses[e.intent], f'answer {e.answers[e.intent]}'])

  def test_expected_rewards_match_monte_carlo(self):
    n = 600
    tol = 4 * np.sqrt(0.25 / n) + 1e-9  # reward's spread is acc's: at most 1/2
    rng = np.random.default_rng(2)
    for k in (2, 3):
      name = _names_with_k(self.env, k)[0]
      for behaviour in clarify.BEHAVIOURS:
        episodes = [self.env.demonstration(rng, behaviour=behaviour, name=name, alpha=0.3,
                                           beta=0.02) for _ in range(n)]
        expected = (clarify.bayes_value(episodes[0]) if behaviour == 'optimal' else
                    clarify.fixed_action_value(episodes[0], behaviour))
        self.assertAlmostEqual(self.env.summary(episodes)['reward'], expected, delta=tol,
                               msg=f'k={k} {behaviour}')
        intents = np.bincount([e.intent for e in episodes], minlength=k) / n
        np.testing.assert_allclose(intents, np.asarray(episodes[0].priors) / 100, atol=tol)

  def test_optimal_actions(self):
    e = self.env.reset(np.random.default_rng(0), name=_names_with_k(self.env, 3)[0],
                       alpha=0.1, beta=0.05)
    p_max = e.priors[0] / 100
    self.assertEqual(clarify.expected_rewards(e), dict(
        answer=p_max - 0.05, enumerate=1 - 6 * 0.05, clarify=1 - 0.1 - 0.05))
    self.assertEqual(clarify.optimal_actions(e), {'clarify'})
    rng = np.random.default_rng(3)
    for name in _names_with_k(self.env, 1):
      for _ in range(20):
        e = self.env.reset(rng, name=name)
        self.assertIn('answer', clarify.optimal_actions(e))
    e = self.env.reset(rng, name=_names_with_k(self.env, 2)[0], alpha=0.0, beta=0.0)
    self.assertEqual(clarify.optimal_actions(e), {'enumerate', 'clarify'})
    with self.assertRaisesRegex(ValueError, 'action'):
      clarify.fixed_action_value(e, 'guess')

  @parameterized.named_parameters(
      ('empty', ''), ('blank', '   '), ('garbage', 'paris is nice'), ('upper', 'ANSWER x'),
      ('answer_nothing', 'answer'), ('answer_two', 'answer rome paris'),
      ('enumerate_nothing', 'enumerate'), ('enumerate_odd', 'enumerate baker'),
      ('enumerate_trailing', 'enumerate baker paris ;'), ('ask_nothing', 'ask'),
      ('semicolon', '; ; ;'))
  def test_malformed_first_turn_is_invalid(self, text):
    e = self.env.reset(np.random.default_rng(0), alpha=0.3, beta=0.05)
    _play(self.env, e, text)
    words = sum(w != ';' for w in text.replace(';', ' ; ').split()[1:])
    self.assertTrue(e.done)
    self.assertEqual((e.info['action'], e.info['final_action'], e.info['acc'],
                      e.info['words'], e.info['optimal']), ('invalid', 'invalid', 0.0, words,
                                                            False))
    self.assertAlmostEqual(e.reward, -0.05 * words, places=12)

  def test_truncated_turn_is_invalid(self):
    e = self.env.reset(np.random.default_rng(0), intent=0, alpha=0.3, beta=0.05)
    e.turns.append(base.Turn('assistant', f'answer {e.answers[0]}', ended=False))
    self.env.step(e)
    self.assertEqual((e.info['action'], e.info['acc']), ('invalid', 0.0))
    self.assertAlmostEqual(e.reward, -0.05, places=12)

  def test_too_many_questions_and_invalid_after_a_question(self):
    env = _env(max_clarifications=2)
    e = env.reset(np.random.default_rng(0), alpha=0.3, beta=0.05)
    _play(env, e, 'ask which one ?', 'x', 'ask really ?', 'y', 'ask sure ?')
    self.assertEqual((e.info['action'], e.info['final_action'], e.info['n_clarifications'],
                      e.info['words'], e.info['acc']), ('clarify', 'invalid', 2, 2, 0.0))
    self.assertAlmostEqual(e.reward, -2 * 0.3 - 2 * 0.05, places=12)
    e = env.reset(np.random.default_rng(0), alpha=0.3, beta=0.05)
    _play(env, e, 'ask which one ?', 'x', 'maybe rome')
    self.assertEqual((e.info['action'], e.info['final_action']), ('clarify', 'invalid'))
    self.assertAlmostEqual(e.reward, -0.3 - 0.05, places=12)

  def test_any_user_reply_is_text_and_intent_judges(self):
    name = _names_with_k(self.env, 3)[0]
    for intent in range(3):
      e = self.env.reset(np.random.default_rng(0), name=name, intent=intent, alpha=0.2,
                         beta=0.01)
      other = self.env.world[name][0][(intent + 1) % 3]
      _play(self.env, e, 'ask who ?', f'i mean the {other}', f'answer {e.answers[intent]}')
      self.assertEqual((e.info['acc'], e.info['action']), (1.0, 'clarify'))
      self.assertAlmostEqual(e.reward, 1 - 0.2 - 0.01, places=12)
      e = self.env.reset(np.random.default_rng(0), name=name, intent=intent, beta=0.01)
      pairs = [f'{s} {a}' for s, a in zip(e.senses, e.answers)]
      _play(self.env, e, 'enumerate ' + ' ; '.join(pairs[:intent] + pairs[intent + 1:]))
      self.assertEqual((e.info['acc'], e.info['words']), (0.0, 4))

  def test_assistant_view_is_independent_of_the_intent(self):
    for name in _names_with_k(self.env, 2) + _names_with_k(self.env, 3):
      senses, priors, answers = self.env.world[name]
      views = []
      for intent in range(len(senses)):
        e = self.env.demonstration(np.random.default_rng(0), behaviour='enumerate',
                                   name=name, intent=intent, alpha=0.25, beta=0.035)
        view = self.env.view(e, 'assistant')
        user_view = self.env.view(e, 'user')
        self.assertEqual([t.role for t in view], ['system', 'user', 'assistant'])
        self.assertEqual(user_view[1:], view[1:])
        self.assertEqual(user_view[0].text,
                         f'you are the user . you mean {name} the {senses[intent]} .')
        self.assertNotIn('you', ' '.join(t.text for t in view))
        views.append([t.text for t in view])
      entities = ' , '.join(f'{s} {p} {a}' for s, p, a in zip(senses, priors, answers))
      self.assertEqual(views[0][0], f'ask cost 0.25 word cost 0.035 . {name} : {entities}')
      for other in views[1:]:
        self.assertEqual(other, views[0])

  def test_cost_splits(self):
    env, rng = self.env, np.random.default_rng(4)
    milli = lambda values: {round(v * 1000) for v in values}
    train, heldout = milli(env.train_alphas), milli(env.heldout_alphas)
    self.assertEqual(heldout, {40, 140, 240, 340, 440, 540})
    self.assertEqual(train, set(range(0, 601, 10)) - heldout)
    self.assertEqual(milli(env.train_betas), set(range(0, 101)) - milli(env.heldout_betas))
    self.assertEmpty(heldout & train)
    self.assertEmpty(milli(env.heldout_betas) & milli(env.train_betas))
    for split, alphas, betas in (('train', env.train_alphas, env.train_betas),
                                 ('heldout', env.heldout_alphas, env.heldout_betas)):
      episodes = [env.reset(rng, split) for _ in range(1000)]
      self.assertEqual({e.alpha for e in episodes}, set(alphas))
      self.assertEqual({e.beta for e in episodes}, set(betas))
    single = _env(single_cost=(0.2, 0.02))
    self.assertEqual({(e.alpha, e.beta) for e in (single.reset(rng) for _ in range(20))},
                     {(0.2, 0.02)})
    self.assertIn(single.reset(rng, 'heldout').alpha, env.heldout_alphas)
    e = env.reset(rng, 'heldout', beta=0.013)
    self.assertEqual(e.beta, 0.013)
    self.assertIn('word cost 0.013 .', env.view(e, 'assistant')[0].text)

  @parameterized.named_parameters(
      ('alpha_range', dict(alpha_range=(0.6, 0.0)), 'alpha_range'),
      ('beta_range', dict(beta_range=(0.1, 0.0)), 'beta_range'),
      ('negative_range', dict(beta_range=(-0.1, 0.1)), 'beta_range'),
      ('no_training_alpha', dict(alpha_range=(0.1, 0.1), heldout_alphas=(0.1,)),
       'leave no training value'),
      ('alpha_outside', dict(heldout_alphas=(0.65,)), 'heldout_alphas.*outside'),
      ('alpha_decimals', dict(heldout_alphas=(0.055,)), 'heldout_alphas.*decimals'),
      ('beta_step', dict(beta_step=0.0), 'beta_step'),
      ('num_names', dict(num_names=0), 'num_names'),
      ('k_probs', dict(k_probs=(0.5, 0.5, 0.5)), 'k_probs'),
      ('priors2', dict(priors2=(40,)), 'priors2'),
      ('priors3', dict(priors3=((30, 30, 30),)), 'priors3'),
      ('max_clarifications', dict(max_clarifications=0), 'max_clarifications'),
      ('single_cost', dict(single_cost=(0.2,)), 'single_cost'),
  )
  def test_bad_config_raises(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _env(**overrides)

  def test_bad_calls_raise(self):
    config = clarify.default_config()
    self.assertIsInstance(envs.make_env(config), clarify.ClarifyEnv)
    config.name = 'chess'
    with self.assertRaisesRegex(ValueError, "'chess'.*clarify"):
      envs.make_env(config)
    rng = np.random.default_rng(0)
    for kwargs, message in ((dict(split='test'), 'split'), (dict(name='bob'), 'name'),
                            (dict(alpha=-0.02), 'alpha'), (dict(beta=0.0125), 'beta'),
                            (dict(name='kim', intent=5), 'intent')):
      with self.assertRaisesRegex(ValueError, message):
        self.env.reset(rng, **kwargs)
    with self.assertRaisesRegex(ValueError, 'behaviour'):
      self.env.demonstration(rng, behaviour='guess')
    e = self.env.demonstration(rng, behaviour='answer')
    with self.assertRaisesRegex(ValueError, 'finished'):
      self.env.step(e)
    e = self.env.reset(rng)
    e.turns.append(base.Turn('user', 'hello'))
    with self.assertRaisesRegex(ValueError, 'expected'):
      self.env.step(e)
    with self.assertRaises(NotImplementedError):
      self.env.scripted(e, 'assistant')
    with self.assertRaisesRegex(ValueError, 'finished'):
      self.env.summary([e])

  def test_summary(self):
    rng = np.random.default_rng(5)
    episodes = [self.env.demonstration(rng, behaviour=b) for b in
                ('answer', 'enumerate', 'clarify', 'clarify')]
    episodes.append(_play(self.env, self.env.reset(rng), 'hmm'))
    s = self.env.summary(episodes)
    self.assertEqual({k: s[k] for k in s if k.startswith('rate/')}, {
        'rate/answer': 0.2, 'rate/enumerate': 0.2, 'rate/clarify': 0.4, 'rate/invalid': 0.2})
    self.assertAlmostEqual(s['reward'], np.mean([e.reward for e in episodes]))
    self.assertAlmostEqual(s['n_clarifications'], 0.4)
    self.assertAlmostEqual(s['words'], (1 + 2 * episodes[1].k + 1 + 1 + 0) / 5)
    self.assertAlmostEqual(s['optimal_agreement'],
                           np.mean([e.info['optimal'] for e in episodes]))

  def test_bayes_policy_on_heldout_grid_responds_to_costs(self):
    """Per held-out alpha (beta), the Bayes policy's clarify (enumerate) rate, averaged over
    the other cost and over instances (ties shared), falls as the cost rises."""
    env, rng = _env(num_names=32), np.random.default_rng(6)
    rates = {}
    for alpha, beta in itertools.product(env.heldout_alphas, env.heldout_betas):
      counts = dict.fromkeys(clarify.ACTIONS, 0.0)
      for _ in range(200):
        best = clarify.optimal_actions(env.reset(rng, 'heldout', alpha=alpha, beta=beta))
        for action in best:
          counts[action] += 1 / len(best) / 200
      rates[alpha, beta] = counts
    clarify_by_alpha = [np.mean([rates[a, b]['clarify'] for b in env.heldout_betas])
                        for a in env.heldout_alphas]
    enumerate_by_beta = [np.mean([rates[a, b]['enumerate'] for a in env.heldout_alphas])
                         for b in env.heldout_betas]
    self.assertLessEqual(stats.spearmanr(env.heldout_alphas, clarify_by_alpha)[0], -0.8)
    self.assertLessEqual(stats.spearmanr(env.heldout_betas, enumerate_by_beta)[0], -0.8)
    for action in clarify.ACTIONS:  # every action is optimal somewhere on the grid
      self.assertGreater(max(r[action] for r in rates.values()), 0.2)


if __name__ == '__main__':
  absltest.main()
