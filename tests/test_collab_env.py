"""The collaborative tool-use environment (rl/envs/collab.py): the world, the tool, the
group reward and hedging credit, the oracle's episodes in both modes, invalid turns."""
import numpy as np
from absl.testing import absltest, parameterized

from model.config_errors import ConfigError
from rl.envs import base, collab, make_env


def _config(**overrides):
  config = collab.default_config()
  config.update(overrides)
  return config


def _env(**overrides):
  return collab.CollabEnv(_config(**overrides))


def _question(env, memorised, split='train'):
  return next(k for k in env.splits[split] if (k in env.memorised) == memorised)


def _play(env, episode, turns):
  """Plays model turns in order (the tool is scripted); returns the finished episode."""
  turns = list(turns)
  while not episode.done:
    role = episode.next_role
    text = env.scripted(episode, role) if role == 'tool' else turns.pop(0)
    episode.turns.append(base.Turn(role, text))
    env.step(episode)
  assert not turns, turns
  return episode


def _oracle(env, episode):
  while not episode.done:
    role = episode.next_role
    text = (env.scripted(episode, role) if role == 'tool' else
            env.oracle_turn(episode, role))
    episode.turns.append(base.Turn(role, text))
    env.step(episode)
  return episode


class WorldTest(absltest.TestCase):

  def test_corpora_splits_and_memory(self):
    env = _env()
    self.assertFalse(set(env.subjects['people']) & set(env.subjects['places']))
    self.assertLen(env.facts, 2 * 40 * 2)
    self.assertLen(env.memorised, 80)
    self.assertLen(env.memorised_facts(), 80)
    train, test, ood = (set(env.splits[s]) for s in ('train', 'test', 'ood'))
    self.assertFalse(train & test)
    self.assertEqual({k[2] for k in train | test}, {'job', 'river'})
    self.assertEqual({k[2] for k in ood}, {'pet', 'dish'})
    self.assertEqual(_env().facts, env.facts)  # deterministic from the seed
    corpus, subject, relation = next(iter(env.facts))
    self.assertEqual(env.search(corpus, subject, relation),
                     f'result {subject} {relation} {env.facts[(corpus, subject, relation)]}')
    other = 'places' if corpus == 'people' else 'people'
    self.assertEqual(env.search(other, subject, relation), 'result none')

  def test_memorise_by_subject_knows_all_or_none_of_a_subject(self):
    env, by_fact = _env(memorise_by='subject'), _env()
    self.assertEqual(env.facts, by_fact.facts)  # the same world, another memory
    self.assertLen(env.memorised, 80)
    for corpus, names in env.subjects.items():
      known = {s for s in names if (corpus, s, collab.CORPORA[corpus][0]) in env.memorised}
      self.assertLen(known, 20)  # half of each corpus's subjects
      for relation in collab.CORPORA[corpus]:
        self.assertEqual({s for s in names if (corpus, s, relation) in env.memorised}, known)
    self.assertNotEqual(env.memorised, by_fact.memorised)

  def test_more_relations_extend_the_world_and_leave_its_facts(self):
    train = ('job', 'hobby', 'car', 'river', 'tree', 'bird')
    env = _env(more_relations=2, train_relations=train, memorise_by='subject')
    base_world = _env(memorise_by='subject')
    self.assertEqual(env.relations, {'people': ('job', 'pet', 'hobby', 'car'),
                                     'places': ('river', 'dish', 'tree', 'bird')})
    self.assertLen(env.facts, 2 * 40 * 4)
    self.assertEqual({k: v for k, v in env.facts.items() if k in base_world.facts},
                     base_world.facts)
    self.assertEqual({k for k in env.memorised if k in base_world.facts}, base_world.memorised)
    for (corpus, subject, relation), value in env.facts.items():
      self.assertIn(relation, env.relations[corpus])
      self.assertIn(value, env.values[relation])
      known = (corpus, subject, 'job' if corpus == 'people' else 'river') in env.memorised
      self.assertEqual((corpus, subject, relation) in env.memorised, known)
    self.assertEqual({k[2] for s in ('train', 'test') for k in env.splits[s]}, set(train))
    self.assertEqual({k[2] for k in env.splits['ood']}, {'pet', 'dish'})
    self.assertEqual(env.splits['ood'], base_world.splits['ood'])
    key = _question(env, memorised=False)
    self.assertEqual(_oracle(env, env.reset(np.random.default_rng(0), 'train', question=key))
                     .info['f1'], 1.0)
    quizzes = _env(more_relations=1, train_relations=('job', 'hobby', 'river', 'tree'),
                   quiz_unknown=12)._unknown_quizzes()
    self.assertEqual({q.relation for q in quizzes}, {'job', 'pet', 'hobby', 'river', 'dish',
                                                     'tree'})
    with self.assertRaisesRegex(ConfigError, 'more_relations'):
      make_env(_config(more_relations=3))
    with self.assertRaisesRegex(ConfigError, 'train_relations'):  # hobby needs more_relations
      make_env(_config(train_relations=('job', 'hobby')))

  def test_fresh_unknown_subjects(self):
    env, rng = _env(unknown_subjects='fresh'), np.random.default_rng(0)
    world = set(env.subjects['people']) | set(env.subjects['places'])
    self.assertLen(env.spare_names, 240 - 80)
    self.assertFalse(world & set(env.spare_names))
    for split in ('train', 'test'):
      episodes = [env.reset(rng, split) for _ in range(60)]
      for e in episodes:
        self.assertEqual(e.subject in world, e.memorised or split == 'test')
        self.assertIn(e.value, env.values[e.relation])
    fresh = [_oracle(env, env.reset(rng, 'train')) for _ in range(40)]
    unknown = [e for e in fresh if not e.memorised]
    self.assertGreater(len({e.subject for e in unknown}), len(unknown) // 2)  # rarely repeats
    for e in unknown:  # the tool knows the new subject's fact, and only that one
      tool = next(t.text for t in e.turns if t.role == 'tool')
      self.assertEqual(tool, f'result {e.subject} {e.relation} {e.value}')
      self.assertEqual(e.info['f1'], 1.0)
      self.assertEqual(env.search(e.corpus, e.subject, e.relation), 'result none')
    key = _question(env, memorised=False)  # a question named explicitly stays the world's
    self.assertEqual(env.reset(rng, 'train', question=key).subject, key[1])
    three = _env(name_syllables=3, subjects_per_corpus=120, unknown_subjects='fresh')
    self.assertEqual({len(s) for s in three.subjects['people']}, {6})
    with self.assertRaisesRegex(ValueError, 'spare|outside the corpora'):
      _env(subjects_per_corpus=120, unknown_subjects='fresh')

  def test_values_qualifier_and_base(self):
    env, single = _env(more_relations=2), _env(value_words=1, more_relations=2)
    for relation, bases in collab.BASES.items():
      self.assertLen(set(env.values[relation]), 64)
      self.assertEqual({v.split()[1] for v in env.values[relation]}, set(bases))
      self.assertEqual(single.values[relation], bases)
    for (_, _, relation), value in env.facts.items():
      self.assertIn(value, env.values[relation])
    self.assertAlmostEqual(collab.f1('head pilot', 'head baker'), 0.5)  # half right

  def test_the_tool_is_never_a_model_role(self):
    for mode in ('single', 'society'):
      env = _env(mode=mode)
      self.assertIn('tool', env.roles)
      self.assertNotIn('tool', env.speakers)  # self-play actors are drawn from speakers

  def test_f1(self):
    self.assertEqual(collab.f1('baker', 'baker'), 1.0)
    self.assertEqual(collab.f1('', 'baker'), 0.0)
    self.assertAlmostEqual(collab.f1('the baker', 'baker'), 2 / 3)

  def test_bad_configs(self):
    for field, value in [('mode', 'team'), ('memorised_fraction', 1.5), ('max_calls', 0),
                         ('train_relations', ('age',)), ('search_cost', -0.1),
                         ('value_words', 3), ('memorise_by', 'relation'),
                         ('unknown_subjects', 'new'), ('name_syllables', 4),
                         ('quiz_prompt', 'user'), ('delegation_cost', -0.1)]:
      with self.assertRaisesRegex(ConfigError, field):
        config = collab.default_config()
        config[field] = value
        make_env(config)


class EpisodeTest(parameterized.TestCase):

  @parameterized.parameters('single', 'society')
  def test_oracle_searches_exactly_when_not_memorised(self, mode):
    env = _env(mode=mode)
    rng = np.random.default_rng(0)
    for memorised in (True, False):
      episode = _oracle(env, env.reset(rng, question=_question(env, memorised)))
      self.assertEqual(episode.info['searches'], 0 if memorised else 1)
      self.assertAlmostEqual(episode.reward, 1.0 if memorised else 0.9)
      self.assertEqual(episode.info['f1'], 1.0)
    summary = env.summary([_oracle(env, env.reset(rng)) for _ in range(40)])
    self.assertEqual(summary['search_rate_memorised'], 0.0)
    self.assertEqual(summary['search_rate_unmemorised'], 1.0)
    # an episode cut off by the rollout's turn limit (rl.episodes.rollout): invalid, F1 0
    cut = env.reset(rng, question=_question(env, False))
    cut.turns.append(base.Turn('assistant', f'search {cut.corpus} {cut.subject} {cut.relation}'))
    env.step(cut)
    cut.done, cut.reward, cut.info = True, 0.0, {'truncated': True}
    summary = env.summary([cut, _oracle(env, env.reset(rng, question=_question(env, True)))])
    self.assertEqual(summary, {'f1': 0.5, 'searches': 0.5, 'search_rate_memorised': 0.0,
                               'search_rate_unmemorised': 1.0, 'hedge_rate': 0.0,
                               'invalid_rate': 0.5})

  def test_best_action_is_the_best_reward_of_answer_hedge_and_search(self):
    env = _env()  # search_cost 0.1, hedge_credit 0.3
    self.assertEqual(env.best_action(1.0), ('answer', 1.0))
    self.assertEqual(env.best_action(0.5), ('search', 0.9))
    self.assertEqual(env.best_action(0.0), ('search', 0.9))
    costly = _env(search_cost=0.8)
    self.assertEqual(costly.best_action(0.0), ('hedge', 0.3))  # "I don't know"
    self.assertEqual(costly.best_action(0.5), ('answer', 0.5))  # hedging it: 0.5 as well
    action, reward = costly.best_action(0.25)  # hedged answer: 0.7 * 0.25 + 0.3 * 0.75
    self.assertEqual(action, 'hedge')
    self.assertAlmostEqual(reward, 0.4)
    single = _env(mode='single')
    corpus, subject, relation = question = _question(single, memorised=True)
    value = single.facts[question]
    for f, answer in ((0.0, 'x y'), (0.5, value.split()[0] + ' x'), (1.0, value)):
      action, best = single.best_action(f)
      turns = ([f'search {corpus} {subject} {relation}', f'answer {value}']
               if action == 'search' else [f'{action} {answer}'])
      episode = single.reset(np.random.default_rng(0), question=question)
      self.assertAlmostEqual(_play(single, episode, turns).reward, best)  # what the env gives

  def test_society_turn_order(self):
    env = _env(mode='society')
    key = _question(env, False)
    corpus, subject, relation = key
    episode = _play(env, env.reset(np.random.default_rng(0), question=key), [
        f'delegate {corpus} {subject} {relation}', f'search {subject} {relation}',
        'hedge ' + env.facts[key], 'answer ' + env.facts[key]])
    self.assertEqual([t.role for t in episode.turns],
                     ['user', 'asker', corpus, 'tool', corpus, 'asker'])
    self.assertAlmostEqual(episode.reward, 0.9)

  def test_asker_must_delegate_moves_the_decision_to_the_helper(self):
    env, rng = _env(mode='society', asker_must_delegate=True), np.random.default_rng(0)
    known, unknown = _question(env, True), _question(env, False)
    for key in (known, unknown):  # the asker may not end before a helper replied
      for text in (f'answer {env.facts[key]}', 'hedge'):
        episode = _play(env, env.reset(rng, question=key), [text])
        self.assertTrue(episode.info['invalid'], text)
        self.assertEqual(episode.reward, 0.0)
      corpus, subject, relation = key
      malformed = _play(env, env.reset(rng, question=key),
                        ['delegate mars x job', f'answer {env.facts[key]}'])
      self.assertTrue(malformed.info['invalid'])  # an error observation is no helper's reply
      oracle = _oracle(env, env.reset(rng, question=key))  # the helper searches iff unknown
      self.assertEqual([t.role for t in oracle.turns][:3], ['user', 'asker', corpus])
      self.assertEqual(oracle.searches, int(key == unknown))
      self.assertEqual(oracle.turns[2].text.split()[0], 'search' if key == unknown else 'answer')
      self.assertEqual(oracle.info['f1'], 1.0)
      self.assertAlmostEqual(oracle.reward, 0.9 if key == unknown else 1.0)
      without = _env(mode='society')  # the asker decides, the helper always searches
      self.assertEqual(_oracle(without, without.reset(rng, question=key)).turns[1].text
                       .split()[0], 'delegate' if key == unknown else 'answer')
    demos = [env.demonstration(rng, 'train') for _ in range(60)]
    self.assertTrue(all(d.turns[1].text.startswith('delegate') for d in demos))
    helper_first = {d.turns[2].text.split()[0] for d in demos}
    self.assertEqual(helper_first, {'search', 'answer', 'hedge'})  # the helper decides
    single = _env(mode='single', asker_must_delegate=True)  # no asker: no effect
    self.assertEqual(_oracle(single, single.reset(rng, question=known)).searches, 0)

  def test_helper_call_corpus_makes_the_helpers_call_the_single_agents(self):
    env = _env(mode='society', asker_must_delegate=True, helper_call_corpus=True)
    single, rng = _env(mode='single'), np.random.default_rng(0)
    key = _question(env, False)
    corpus, subject, relation = key
    other = next(c for c in collab.CORPORA if c != corpus)
    self.assertEqual(env.parse(f'search {corpus} {subject} {relation}', corpus),
                     ('search', key))
    for text in (f'search {subject} {relation}', f'search {other} {subject} {relation}'):
      self.assertIsNone(env.parse(text, corpus), text)
    oracle = _oracle(env, env.reset(rng, question=key))
    alone = _oracle(single, single.reset(rng, question=key))
    self.assertEqual(oracle.turns[2].text, alone.turns[1].text)  # word for word
    self.assertAlmostEqual(oracle.reward, 0.9)
    episode = _play(env, env.reset(rng, question=key),
                    [f'delegate {corpus} {subject} {relation}', f'search {subject} {relation}',
                     f'answer {env.facts[key]}', f'answer {env.facts[key]}'])
    self.assertEqual(episode.turns[3].text,
                     f'error malformed call , use search {corpus} SUBJECT RELATION')
    self.assertAlmostEqual(episode.reward, 0.9)  # the failed search costs c

  def test_asker_call_word_search_writes_the_delegation_as_the_single_agents_call(self):
    env, single = _env(mode='society', asker_call_word='search'), _env(mode='single')
    rng = np.random.default_rng(0)
    key = _question(env, False)
    corpus, subject, relation = key
    call = f'search {corpus} {subject} {relation}'
    self.assertEqual(env.parse(call, 'asker'), ('delegate', key))
    self.assertIsNone(env.parse(f'delegate {corpus} {subject} {relation}', 'asker'))
    oracle = _oracle(env, env.reset(rng, question=key))
    alone = _oracle(single, single.reset(rng, question=key))
    self.assertEqual(oracle.turns[1].text, alone.turns[1].text)  # word for word
    # ... still a delegation: the helper works on it, and only its search costs c
    self.assertEqual([t.role for t in oracle.turns], ['user', 'asker', corpus, 'tool', corpus,
                                                      'asker'])
    self.assertEqual((oracle.searches, oracle.calls), (1, 2))  # the delegation, the search
    self.assertAlmostEqual(oracle.reward, 0.9)
    self.assertEqual(oracle.info['first_action'], 'delegate')
    malformed = _play(env, env.reset(rng, question=key),
                      ['search mars x job', f'answer {env.facts[key]}'])
    self.assertEqual(malformed.turns[2].text,
                     'error malformed call , use search people|places SUBJECT RELATION')
    self.assertEqual((malformed.info['first_action'], malformed.searches), ('delegate', 0))
    self.assertAlmostEqual(malformed.reward, 1.0)  # a failed delegation is free, as before
    demos = {d.turns[1].text.split()[0] for d in (env.demonstration(rng) for _ in range(30))}
    self.assertEqual(demos, {'search', 'answer', 'hedge'})
    with self.assertRaisesRegex(ConfigError, 'asker_call_word'):
      make_env(_config(asker_call_word='ask'))

  def test_delegation_cost_charges_each_delegation_of_the_asker(self):
    env = _env(mode='society', asker_call_word='search', delegation_cost=0.05)
    rng = np.random.default_rng(0)
    known, unknown = _question(env, True), _question(env, False)
    corpus, subject, relation = known
    value = env.facts[known]
    rewards = {}  # on a memorised question: answering beats delegating to a helper who knows
    for name, turns in (('answer', [f'answer {value}']),
                        ('delegate', [f'search {corpus} {subject} {relation}',
                                      f'answer {value}', f'answer {value}']),
                        ('delegate, search', [f'search {corpus} {subject} {relation}',
                                              f'search {subject} {relation}',
                                              f'answer {value}', f'answer {value}']),
                        ('malformed delegation', ['search mars x job', f'answer {value}']),
                        ('hedge after delegating', [f'search {corpus} {subject} {relation}',
                                                    f'answer {value}', 'hedge'])):
      episode = _play(env, env.reset(rng, question=known), turns)
      rewards[name] = episode.reward
      self.assertEqual(episode.info['delegations'], 0 if name == 'answer' else 1, name)
    self.assertAlmostEqual(rewards['answer'], 1.0)
    self.assertAlmostEqual(rewards['delegate'], 0.95)
    self.assertAlmostEqual(rewards['delegate, search'], 0.85)
    self.assertAlmostEqual(rewards['malformed delegation'], 0.95)  # a failed call costs d
    self.assertAlmostEqual(rewards['hedge after delegating'], 0.3 - 0.05)  # bare hedge: h - d
    # the oracle: answers what it knows, delegates (then the helper searches) what it does not
    self.assertAlmostEqual(_oracle(env, env.reset(rng, question=known)).reward, 1.0)
    self.assertAlmostEqual(_oracle(env, env.reset(rng, question=unknown)).reward, 0.85)
    free = _env(mode='society', asker_call_word='search')  # the default: free delegations
    self.assertAlmostEqual(_oracle(free, free.reset(rng, question=unknown)).reward, 0.9)
    single = _env(mode='single', delegation_cost=0.05)  # no asker: the single agent's reward
    self.assertAlmostEqual(_oracle(single, single.reset(rng, question=unknown)).reward, 0.9)

  def test_hedging_and_invalid_rewards(self):
    env = _env(mode='single')
    key = _question(env, True)
    value = env.facts[key]
    rng = np.random.default_rng(0)
    play = lambda *turns: _play(env, env.reset(rng, question=key), turns)
    self.assertAlmostEqual(play('hedge ' + value).reward, 0.7)  # right: costs h
    self.assertAlmostEqual(play('hedge wrongword').reward, 0.3)  # wrong: earns h
    self.assertAlmostEqual(play('hedge').reward, 0.3)  # I don't know
    self.assertAlmostEqual(play('answer wrongword').reward, 0.0)
    corpus, subject, relation = key
    search = f'search {corpus} {subject} {relation}'
    self.assertAlmostEqual(play(search, 'answer ' + value).reward, 0.9)
    invalid = play(search, search, search)  # a third tool call (max_calls=2)
    self.assertTrue(invalid.info['invalid'])
    self.assertAlmostEqual(invalid.reward, -0.2)
    for text in ('', 'delegate people x job', 'answer', 'ask people x'):
      episode = play(text)
      self.assertTrue(episode.info['invalid'], text)
      self.assertEqual(episode.reward, 0.0)
    self.assertEqual(env.search(corpus, 'nobody', relation), 'result none')

  @parameterized.parameters('single', 'society')
  def test_malformed_call_is_a_failed_call_with_an_error_observation(self, mode):
    env = _env(mode=mode)
    key = _question(env, False)
    corpus, subject, relation = key
    episode = env.reset(np.random.default_rng(0), question=key)
    call = 'search mars' if mode == 'single' else 'delegate mars x job'
    turns = [call, f'answer {env.facts[key]}']
    episode = _play(env, episode, turns)
    error = episode.turns[2]
    self.assertEqual(error.role, 'tool')
    self.assertTrue(error.text.startswith('error malformed call'), error.text)
    self.assertFalse(episode.info['invalid'])
    self.assertEqual(episode.info['first_action'], call.split()[0])
    cost = 0.1 if mode == 'single' else 0.0  # a failed search costs c; delegating is free
    self.assertAlmostEqual(episode.reward, 1.0 - cost)
    self.assertEqual(episode.calls, 1)
    # a helper's malformed search costs c and returns to the helper
    if mode == 'society':
      roomy = _env(mode=mode, max_calls=3)  # delegation, failed search, search
      episode = _play(roomy, roomy.reset(np.random.default_rng(0), question=key),
                      [f'delegate {corpus} {subject} {relation}', 'search x',
                       f'search {subject} {relation}', f'answer {env.facts[key]}',
                       f'answer {env.facts[key]}'])
      self.assertEqual([t.role for t in episode.turns],
                       ['user', 'asker', corpus, 'tool', corpus, 'tool', corpus, 'asker'])
      self.assertTrue(episode.turns[3].text.startswith('error'))
      self.assertTrue(episode.turns[5].text.startswith('result'))
      self.assertFalse(episode.info['invalid'])
      self.assertAlmostEqual(episode.reward, 0.8)
    # failed calls count against max_calls
    episode = _play(env, env.reset(np.random.default_rng(0), question=key), [call] * 3)
    self.assertTrue(episode.info['invalid'])


if __name__ == '__main__':
  absltest.main()
