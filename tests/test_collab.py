"""Collaborative self-play (rl/repro_collab.py, PAPERS.md §6): demonstrations, the SFT data
with the memorised facts, the AUROC helper, and a tiny end-to-end run of the job (both SFTs,
ReST on the society, single-agent deployment)."""
import copy
import json

from absl.testing import absltest, parameterized
from etils import epath
import jax
import numpy as np

from configs.repro import collab as repro_config
from configs.rl import collab as configs_collab
from model.registry import build_model
from rl import episodes as ep
from rl import repro_collab, rest
from rl.envs import base, collab, make_env
from tests.utils import tiny_config
from training import tokenizers


def _env(**overrides):
  config = collab.default_config()
  config.update(overrides)
  return collab.CollabEnv(config)


class DemonstrationTest(parameterized.TestCase):

  @parameterized.parameters('single', 'society')
  def test_oracle_demonstrations_score_full_reward(self, mode):
    env = _env(mode=mode)
    for i in range(40):
      episode = env.demonstration(np.random.default_rng(i), behaviour='oracle')
      self.assertEqual(episode.info['f1'], 1.0)
      self.assertFalse(episode.info['invalid'])
      self.assertAlmostEqual(episode.reward, 1.0 if episode.memorised else 0.9)

  @parameterized.parameters('single', 'society')
  def test_generic_actions_ignore_memory(self, mode):
    env = _env(mode=mode)
    demos = [env.demonstration(np.random.default_rng(i)) for i in range(600)]
    self.assertFalse(any(e.info['invalid'] for e in demos))
    for memorised in (True, False):
      group = [e for e in demos if e.memorised == memorised]
      first = [e.info['first_action'] for e in group]
      for action in ('answer', 'hedge'):  # uniform over 3 actions, whatever is memorised
        self.assertAlmostEqual(first.count(action) / len(group), 1 / 3, delta=0.08)
      searched = [e for e in group if e.info['searches']]
      self.assertTrue(all(e.info['f1'] == 1.0 for e in searched))
      answered = [e for e in group if e.info['first_action'] == 'answer']
      f1 = np.mean([e.info['f1'] for e in answered])
      if memorised:  # from memory: the value; otherwise a guess among 64 values
        self.assertEqual(f1, 1.0)
      else:
        self.assertLess(f1, 0.4)
    with self.assertRaisesRegex(ValueError, 'behaviour'):
      env.demonstration(np.random.default_rng(0), behaviour='always')

  def test_generic_action_probabilities(self):
    env = _env(mode='single', generic_actions=(0.5, 0.25, 0.25))
    first = [env.demonstration(np.random.default_rng(i)).info['first_action']
             for i in range(800)]
    for action, p in (('search', 0.5), ('answer', 0.25), ('hedge', 0.25)):
      self.assertAlmostEqual(first.count(action) / len(first), p, delta=0.06)
    for bad in ((0.5, 0.5), (0.5, 0.6, -0.1), (0.5, 0.25, 0.2)):
      with self.assertRaisesRegex(ValueError, 'generic_actions'):
        _env(generic_actions=bad)


def _formatter(env):
  """A small SentencePiece tokenizer of the env's pretraining texts and its formatter."""
  config = tokenizers.default_tokenizer_config()
  config.update(kind='sentencepiece', vocab_size=320,
                reserved_tokens=ep.reserved_tokens(env.roles))
  tokenizer = tokenizers.make_tokenizer(config, texts=env.pretraining_texts())
  return tokenizer, ep.Formatter(tokenizer, env.roles)


def _tiny(config):
  config.unlock()
  config.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  config.env.update(subjects_per_corpus=4, spare_names=20)
  config.tokenizer.vocab_size = config.model.vocab_size = 768  # fewer names, fewer pieces
  config.data.batch_size = 8
  config.train.update(steps=2, log_every=1, tensorboard=False, async_checkpointing=False,
                      checkpoint_every=2)
  config.sft.update(episodes=40, pretraining_repeats=2)
  config.rollout.update(batch=32)
  # No evaluation inside the stages (the rl_sft and rl_rest tests cover it): the job's own
  # deployment is what this test checks.
  config.rest.update(iterations=2, prompts=4, samples_per_prompt=2, thresholds=(-9.0,),
                     steps_per_improve=2, eval_sets=())
  return config


class SftDataTest(parameterized.TestCase):

  def test_pretraining_texts_state_and_ask_only_memorised_facts(self):
    env = _env()
    texts = env.pretraining_texts()
    statements, questions = texts[:len(env.memorised)], texts[len(env.memorised):]
    self.assertEqual(statements, env.memorised_facts())
    self.assertLen(questions, len(env.memorised))
    self.assertEqual(_env(qa_pretraining=False).pretraining_texts(), statements)
    mentioned = set()
    for text in texts:  # every (subject, relation) a text names is a memorised fact
      words = text.split()
      for (corpus, subject, relation), value in env.facts.items():
        if subject in words and relation in words:
          mentioned.add((corpus, subject, relation))
          self.assertTrue(text.endswith(' ' + value), text)
    self.assertEqual(mentioned, env.memorised)
    question, answer = (part.strip() for part in questions[0].split('?'))
    question += ' ?'
    episode = env.reset(np.random.default_rng(0), question=sorted(env.memorised)[0])
    self.assertEqual(episode.turns[0].text, question)  # the user's question, verbatim
    self.assertEqual(answer, episode.value)

  @parameterized.parameters(('single', 'assistant'), ('society', 'asker'))
  def test_quiz_conversations_answer_only_memorised_facts(self, mode, first_role):
    env = _env(mode=mode)
    quizzes = env.pretraining_episodes()
    self.assertLen(quizzes, len(env.memorised))
    for e in quizzes:
      key = (e.corpus, e.subject, e.relation)
      self.assertIn(key, env.memorised)
      self.assertEqual([(t.role, t.text) for t in e.turns],
                       [('user', env.question(e.subject, e.relation)),
                        (first_role, f'answer {env.facts[key]}')])
      self.assertEqual(env.view(e, first_role)[0].text, collab.QUIZ_PROMPT)
    self.assertEqual({(e.corpus, e.subject, e.relation) for e in quizzes}, env.memorised)
    self.assertEqual(_env(mode=mode, quiz_pretraining=False).pretraining_episodes(), [])
    role_env = _env(mode=mode, quiz_prompt='role')  # the role's own prompt, as when deployed
    quiz = role_env.pretraining_episodes()[0]
    deployed = role_env.reset(np.random.default_rng(0), question=(quiz.corpus, quiz.subject,
                                                                  quiz.relation))
    self.assertEqual(role_env.view(quiz, first_role)[0], role_env.view(deployed, first_role)[0])

  def test_unknown_entity_quizzes_hedge_about_names_of_no_corpus(self):
    env = _env(mode='single', quiz_unknown=30, unknown_subjects='fresh')
    quizzes = env.pretraining_episodes()[len(env.memorised):]
    self.assertLen(quizzes, 30)
    world = {s for names in env.subjects.values() for s in names}
    self.assertEqual({e.subject for e in quizzes}, set(env.quiz_names))
    self.assertFalse(set(env.quiz_names) & (world | set(env.spare_names)))  # fresh ones apart
    for e in quizzes:
      self.assertEqual([(t.role, t.text) for t in e.turns],
                       [('user', env.question(e.subject, e.relation)), ('assistant', 'hedge')])
      self.assertIn(e.relation, collab.CORPORA[e.corpus])
      self.assertEqual(env.view(e, 'assistant')[0].text, collab.QUIZ_PROMPT)
    self.assertEqual({e.relation for e in quizzes}, {'job', 'pet', 'river', 'dish'})
    with self.assertRaisesRegex(ValueError, 'quiz_unknown'):
      _env(subjects_per_corpus=120, quiz_unknown=1)

  def test_pretraining_transcript_trains_every_token_after_bos(self):
    env = _env()
    tokenizer, formatter = _formatter(env)
    text = env.pretraining_texts()[-1]
    t = ep.text_transcript(formatter, text)
    self.assertEqual(t.tokens[0], tokenizer.bos_id)
    self.assertEqual(tokenizer.decode(t.tokens[1:].tolist()), text)
    self.assertEqual(t.policy_mask.tolist(), [0] + [1] * (len(t.tokens) - 1))

  def test_rehearsal_items_of_each_kind(self):
    env = _env(mode='society')
    _, formatter = _formatter(env)
    roles = ('asker',) + tuple(collab.CORPORA)
    texts, episodes = env.pretraining_texts(), env.pretraining_episodes()
    self.assertNotEmpty(episodes)
    only_texts = rest.pretraining_items(env, formatter, roles, ('texts',))
    self.assertLen(only_texts, len(texts))
    self.assertEqual([t.tokens.tolist() for t in only_texts],
                     [ep.text_transcript(formatter, x).tokens.tolist() for x in texts])
    only_episodes = rest.pretraining_items(env, formatter, roles, ('episodes',))
    self.assertLen(only_episodes, len(episodes))  # each quiz: the asker's answer, trained
    both = rest.pretraining_items(env, formatter, roles)
    self.assertEqual([t.tokens.tolist() for t in both],
                     [t.tokens.tolist() for t in only_texts + only_episodes])

  def test_untrained_after_the_tool_keeps_only_the_decision(self):
    env = _env(mode='single', demo_fraction=0.25)
    tokenizer, formatter = _formatter(env)
    key = next(k for k in env.splits['demo'] if k not in env.memorised)
    demo = env.demonstration(np.random.default_rng(0), 'demo', 'oracle', question=key)
    self.assertEqual([t.role for t in demo.turns], ['user', 'assistant', 'tool', 'assistant'])

    def trained(**kwargs):  # the text of the trained tokens
      t = ep.transcript(formatter, env.view(demo, 'assistant'), ('assistant',), demo.reward,
                        demonstration=True, **kwargs)
      return tokenizer.decode(t.tokens[t.policy_mask == 1].tolist())

    search, answer = demo.turns[1].text, demo.turns[3].text
    self.assertEqual(trained(), search + answer)
    self.assertEqual(trained(untrained_after='tool'), search)

  def test_relabel_trains_reading_not_the_retrieved_fact(self):
    env = _env(mode='society')
    tokenizer, formatter = _formatter(env)
    unknown = next(k for k in env.splits['train'] if k not in env.memorised)
    demo = env.demonstration(np.random.default_rng(0), behaviour='oracle', question=unknown)
    for t in demo.turns:  # as a rollout: the model's turns carry their ids and log-probs
      if t.role != 'tool':
        t.ids = formatter.encode(t.text)
        t.logprobs = [-0.5] * (len(t.ids) + 1)
    before = [t.text for t in demo.turns]
    relabelled = env.relabel(demo, np.random.default_rng(1))
    self.assertEqual([t.text for t in demo.turns], before)  # the rollout itself is kept
    self.assertNotEqual(relabelled.value, demo.value)
    self.assertIn(relabelled.value, env.values[unknown[2]])
    self.assertEqual((relabelled.reward, relabelled.info), (demo.reward, demo.info))
    self.assertEqual([t.text.replace(relabelled.value, demo.value) for t in relabelled.turns],
                     before)
    self.assertEqual([t.text for t in relabelled.turns[:3]], before[:3])  # up to the search
    for role in (unknown[0], 'asker'):  # the answers after the result carry the new value
      t = ep.transcript(formatter, env.view(relabelled, role), (role,), relabelled.reward)
      trained = tokenizer.decode(t.tokens[t.policy_mask == 1].tolist())
      self.assertIn(relabelled.value, trained)
      self.assertNotIn(demo.value, trained)
    known = next(k for k in env.splits['train'] if k in env.memorised)
    answered = env.demonstration(np.random.default_rng(0), behaviour='oracle', question=known)
    self.assertIs(env.relabel(answered, np.random.default_rng(1)), answered)  # no retrieval
    def answered(key, text):  # a single-turn episode: the asker answers at once
      episode = env.reset(np.random.default_rng(0), question=key)
      episode.turns.append(base.Turn('asker', text, ids=[], logprobs=[]))
      env.step(episode)
      return episode
    lucky = answered(unknown, f'answer {env.facts[unknown]}')  # an unmemorised fact, guessed
    self.assertEqual(lucky.reward, 1.0)
    self.assertIsNone(env.relabel(lucky, np.random.default_rng(1)))
    half = answered(unknown, f'hedge {env.facts[unknown].split()[0]} nobody')
    self.assertIsNone(env.relabel(half, np.random.default_rng(1)))  # partly right: rejected
    wrong = answered(unknown, 'hedge')
    self.assertIs(env.relabel(wrong, np.random.default_rng(1)), wrong)
    recalled = answered(known, f'answer {env.facts[known]}')  # a memorised fact: kept
    self.assertIs(env.relabel(recalled, np.random.default_rng(1)), recalled)
    plain = _env(mode='society', fixed_knowledge=False)
    self.assertIs(plain.relabel(lucky, np.random.default_rng(1)), lucky)
    self.assertIs(plain.relabel(demo, np.random.default_rng(1)), demo)
    # counterfactual_pool='all': drawn from every relation's values (here, mostly others')
    wide = _env(mode='society', counterfactual_pool='all')
    drawn = {wide.relabel(demo, np.random.default_rng(i)).value for i in range(40)}
    self.assertTrue(drawn <= set(wide.counterfactual_values(unknown[2])) - {demo.value})
    self.assertTrue(drawn - set(env.values[unknown[2]]))
    with self.assertRaisesRegex(ValueError, 'counterfactual_pool'):
      _env(counterfactual_pool='any')

  def test_demo_split_is_apart_from_train_and_test(self):
    env = _env(demo_fraction=0.25)
    demo, train, test = (set(env.splits[s]) for s in ('demo', 'train', 'test'))
    self.assertLen(demo, 20)  # a quarter of the 80 (subject, job | river) questions
    self.assertFalse(demo & train or demo & test)
    self.assertEqual(len(demo | train | test), 80)
    self.assertNotIn('demo', _env().splits)
    # an unmemorised demo fact is redrawn per demonstration and the tool returns it
    key = next(k for k in env.splits['demo'] if k not in env.memorised)
    demos = [env.demonstration(np.random.default_rng(i), 'demo', 'oracle', question=key)
             for i in range(20)]
    self.assertGreater(len({d.value for d in demos}), 5)
    for d in demos:
      tool = next(t.text for t in d.turns if t.role == 'tool')
      self.assertEqual(tool, f'result {key[1]} {key[2]} {d.value}')
      self.assertEqual(d.info['f1'], 1.0)
    self.assertEqual(env.facts[key], env.reset(np.random.default_rng(0), 'demo',
                                               question=key).value)  # the world is unchanged
    known = next(k for k in env.splits['demo'] if k in env.memorised)
    self.assertEqual(env.demonstration(np.random.default_rng(0), 'demo', question=known).value,
                     env.facts[known])
    with self.assertRaisesRegex(ValueError, 'demo_fraction'):
      _env(test_fraction=0.5, demo_fraction=0.5)

  def test_demo_ood_split_is_a_share_of_ood_for_format_demonstrations(self):
    kwargs = dict(unknown_subjects='fresh', name_syllables=3)
    env, plain = _env(demo_ood_fraction=0.25, **kwargs), _env(**kwargs)
    demo_ood, ood = set(env.splits['demo_ood']), set(env.splits['ood'])
    self.assertLen(demo_ood, 20)  # a quarter of the 80 (subject, pet | dish) questions
    self.assertFalse(demo_ood & ood)
    self.assertEqual(demo_ood | ood, set(plain.splits['ood']))
    self.assertNotIn('demo_ood', plain.splits)
    for name in ('train', 'test'):  # the world and the other splits are unchanged
      self.assertEqual(env.splits[name], plain.splits[name])
    self.assertEqual((env.facts, env.memorised), (plain.facts, plain.memorised))
    world = set(env.subjects['people']) | set(env.subjects['places'])
    rng, calls = np.random.default_rng(0), set()
    for i in range(60):
      demo = env.demonstration(rng, 'demo_ood')
      self.assertIn(demo.relation, ('pet', 'dish'))
      self.assertEqual(demo.subject in world, demo.memorised)  # unknown entities are fresh
      calls |= {t.text.split()[-1] for t in demo.turns[:-1] if t.text.startswith('search')}
    self.assertEqual(calls, {'pet', 'dish'})  # the format shows searching the ood relations
    with self.assertRaisesRegex(ValueError, 'demo_ood_fraction'):
      _env(demo_ood_fraction=1.0)
    config = configs_collab.get_config('sft')
    config.sft.splits = ()
    with self.assertRaisesRegex(ValueError, 'sft.splits is empty'):
      rest.sft(config, self.create_tempdir().full_path)

  def test_train_chunks_deal_the_train_questions_for_grow(self):
    env, rng = _env(unknown_subjects='fresh', train_chunks=3), np.random.default_rng(0)
    chunks = [env.splits[f'train_{i}'] for i in range(3)]
    self.assertCountEqual(sum(chunks, []), env.splits['train'])  # disjoint, all of train
    self.assertNotIn('train_3', env.splits)
    self.assertNotIn('train_0', _env().splits)
    world = set(env.subjects['people']) | set(env.subjects['places'])
    for i, chunk in enumerate(chunks):
      for e in (env.reset(rng, f'train_{i}') for _ in range(30)):
        self.assertEqual(e.subject in world, e.memorised)  # unknown names fresh, as on train
        if e.memorised:
          self.assertIn((e.corpus, e.subject, e.relation), chunk)
    rest._check_grow_splits(env, ('train_0', 'train_2'))
    for splits, message in ((('train_0', 'train_3'), "'train_3'"), ((), 'empty')):
      with self.assertRaisesRegex(ValueError, message):
        rest._check_grow_splits(env, splits)
    with self.assertRaisesRegex(ValueError, 'train_chunks'):
      _env(train_chunks=len(env.splits['train']) + 1)

  def test_name_tokens_and_spare_names(self):
    env = _env(unknown_subjects='fresh', name_syllables=3, quiz_unknown=10, spare_names=7,
               name_tokens=True)
    self.assertLen(env.spare_names, 7)
    world = env.subjects['people'] + env.subjects['places']
    self.assertCountEqual(env.whole_words(), world + env.quiz_names + env.spare_names)
    self.assertEqual(_env().whole_words(), ())  # name_tokens off
    spellings = env.spellings()
    self.assertContainsSubset(spellings, env.pretraining_texts())
    self.assertNotIn(spellings[0], _env(name_syllables=3).pretraining_texts())
    words = ' '.join(spellings).split()
    self.assertCountEqual({w for w in words if len(w) == 6}, env.names)  # every name, spelt
    name = env.names[0]
    self.assertIn(f'{name} = {name[:2]} {name[2:4]} {name[4:]} .', ' '.join(spellings))
    values = {w for v in env.facts.values() for w in v.split()}
    self.assertFalse(values & set(words))  # no fact
    rng = np.random.default_rng(0)
    fresh = {e.subject for e in (env.reset(rng) for _ in range(100)) if not e.memorised}
    self.assertTrue(fresh <= set(env.spare_names) and len(fresh) > 1)
    tokenizer_config = configs_collab.get_config('sft').tokenizer
    tokenizer_config.vocab_size = 512  # this small world's text holds fewer pieces
    tokenizer = rest.sft_tokenizer(tokenizer_config, env, None, env.pretraining_texts() * 3)
    for name in (world[0], env.spare_names[0]):
      self.assertLen(tokenizer.encode(name), 1)
      self.assertIn(tokenizer.encode(name)[0], tokenizer.encode(f'search people {name} job'))
    self.assertEqual(tokenizer_config.get('whole_words', ()), ())  # the config is unchanged
    for bad in (-1, 3600 - 80 + 1):  # 3,600 names, 80 in the corpora
      with self.assertRaisesRegex(ValueError, 'spare_names'):
        _env(name_syllables=3, spare_names=bad)
    _env(name_syllables=3, spare_names=3600 - 80)

  def test_delegation_view_shows_a_helper_only_its_exchange(self):
    env = _env(helper_view='delegation')
    key = next(k for k in env.splits['train'] if k not in env.memorised)
    e = env.demonstration(np.random.default_rng(0), behaviour='oracle', question=key)
    corpus, subject, relation = key
    roles = [t.role for t in e.turns]
    self.assertEqual(roles, ['user', 'asker', corpus, 'tool', corpus, 'asker'])
    view = env.view(e, corpus)
    self.assertEqual([t.role for t in view], ['system', 'asker', corpus, 'tool', corpus])
    self.assertEqual(view[1].text, f'delegate {corpus} {subject} {relation}')
    self.assertNotIn(subject, view[0].text)  # the name comes only from the delegation
    self.assertEqual(env.view(e, 'asker')[1:], e.turns)
    self.assertEqual(_env().view(e, corpus)[1:], e.turns)  # 'all': the whole conversation
    other = next(c for c in collab.CORPORA if c != corpus)
    self.assertEqual([t.role for t in env.view(e, other)], ['system'])
    with self.assertRaisesRegex(ValueError, 'helper_view'):
      _env(helper_view='question')

  def test_spelt_names_in_questions_and_calls(self):
    env = _env(spelt_names=True, name_syllables=3)
    key = next(k for k in env.splits['train'] if k not in env.memorised)
    corpus, subject, relation = key
    spelt = collab.spell(subject)
    self.assertEqual(spelt.replace(' ', ''), subject)
    self.assertLen(spelt.split(), 3)
    e = env.demonstration(np.random.default_rng(0), behaviour='oracle', question=key)
    self.assertEqual([t.text for t in e.turns[1:4]], [
        f'delegate {corpus} {spelt} {relation}', f'search {spelt} {relation}',
        f'result {spelt} {relation} {env.facts[key]}'])
    self.assertEqual(e.turns[0].text, f'what is the {relation} of {subject} {spelt} ?')
    self.assertEqual(e.reward, 1 - env.config.search_cost)
    for text in (f'search {corpus} {spelt} {relation}', f'search {corpus} {subject} {relation}'):
      self.assertEqual(env.parse(text, 'assistant'), ('search', key))  # spelt or whole
    self.assertIsNone(collab.parse(f'search {corpus} {spelt} {relation}', 'assistant', 'single'))
    self.assertEqual(env.search(corpus, 'nobody', relation), 'result none')
    relabelled = env.relabel(e, np.random.default_rng(1))
    self.assertNotEqual(relabelled.value, e.value)  # the found fact is recognised
    self.assertEqual(relabelled.turns[3].text, f'result {spelt} {relation} {relabelled.value}')


class ContinuationLogprobsTest(absltest.TestCase):

  def test_normalised_and_chain_rule(self):
    model = build_model(tiny_config(vocab_size=64, num_layers=1).model)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
    context = [1, 5, 7, 9]
    # every one-token continuation, then log p(a b | c) and log p(b | c a), rows of three
    # lengths padded into one batch
    logp = repro_collab.continuation_logprobs(
        model, variables, 0, [context] * 65 + [context + [3]],
        [[t] for t in range(64)] + [[3, 11], [11]])
    self.assertAlmostEqual(float(np.exp(logp[:64]).sum()), 1.0, places=4)
    self.assertAlmostEqual(float(logp[64]), float(logp[3] + logp[65]), places=4)

  def test_shared_contexts_match_one_forward_per_row(self):
    model = build_model(tiny_config(vocab_size=64, num_layers=2).model)
    variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 8), np.int32))
    rng = np.random.default_rng(0)
    contexts = [list(rng.integers(1, 64, n)) for n in (3, 17, 9)]
    pairs = [(c, list(rng.integers(1, 64, m))) for c in contexts for m in (1, 2, 5)]
    pairs += [(contexts[1], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7])]
    rows = np.zeros((len(pairs), 40), np.int32)  # every whole row, right-padded: no cache
    for i, (c, k) in enumerate(pairs):
      rows[i, :len(c) + len(k)] = c + k
    logp = np.asarray(jax.nn.log_softmax(model.apply(variables, rows)[0], -1))
    expected = [sum(logp[i, len(c) - 1 + j, t] for j, t in enumerate(k))
                for i, (c, k) in enumerate(pairs)]
    for chunk in (2, 512):  # contexts and continuations split over batches, or not
      got = repro_collab.continuation_logprobs(model, variables, 0, *zip(*pairs), chunk=chunk)
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


class AurocTest(absltest.TestCase):

  def test_hand_numbers(self):
    # pairs (pos, neg): 0.9>0.2, 0.9>0.4, 0.4=0.4 (half), 0.4>0.2 -> 3.5 / 4
    self.assertAlmostEqual(repro_collab.auroc([0.9, 0.4, 0.2, 0.4], [1, 1, 0, 0]), 0.875)
    self.assertEqual(repro_collab.auroc([0.1, 0.2, 0.3], [0, 0, 1]), 1.0)
    self.assertEqual(repro_collab.auroc([0.1, 0.2, 0.3], [1, 0, 0]), 0.0)
    self.assertTrue(np.isnan(repro_collab.auroc([0.1, 0.2], [1, 1])))
    with self.assertRaisesRegex(ValueError, 'shape'):
      repro_collab.auroc([0.1, 0.2], [1])


class CriteriaTest(absltest.TestCase):

  def test_hand_numbers_on_means_and_per_seed(self):
    def metrics(per_seed, **values):
      return {m: {'mean': float(np.mean(v)), 'per_seed': list(v)} if per_seed else {'mean': v}
              for m, v in values.items()}
    base = dict(search_rate_unmemorised=0.5, search_rate_memorised=0.5, f1=0.5, searches=0.9,
                hedge_auroc=0.5, closed_book_hedge_auroc=0.5)
    policies = {p: {s: metrics(False, **base) for s in ('test', 'ood')}
                for p in ('in_context', 'action_supervised')}
    # seed 0 meets every criterion (ratio 0.9 / 0.3 = 3), seed 1 none
    rest_values = dict(search_rate_unmemorised=(0.9, 0.1), search_rate_memorised=(0.1, 0.9),
                       f1=(0.8, 0.2), searches=(0.3, 0.9), hedge_auroc=(0.9, 0.4),
                       closed_book_hedge_auroc=(0.85, 0.7))
    policies['rest_single'] = {s: metrics(True, **rest_values) for s in ('test', 'ood')}
    per_seed = [repro_collab.criteria(repro_collab.seed_view(policies, i)) for i in (0, 1)]
    self.assertTrue(all(per_seed[0].values()))
    self.assertFalse(any(per_seed[1].values()))
    # the means: unmemorised 0.5, F1 0.5 (= in-context, ratio 1.5), AUROC 0.65, ood 0.5
    self.assertFalse(any(repro_collab.criteria(policies).values()))
    # every answer right in both seeds: the hedge AUROC is undefined, not failed
    policies['rest_single']['test']['hedge_auroc'] = metrics(True, v=(np.nan, np.nan))['v']
    undefined = [repro_collab.criteria(repro_collab.seed_view(policies, i)) for i in (0, 1)]
    name = 'hedge AUROC >= 0.8 (test)'
    self.assertIsNone(undefined[0][name])
    self.assertIsNone(repro_collab.criteria(policies)[name])
    self.assertTrue(undefined[0]['F1 > action-supervised F1 (ood)'])
    closed_book = 'closed-book hedge AUROC >= 0.8 (test)'  # defined: judged on its own
    self.assertEqual([c[closed_book] for c in undefined], [True, False])
    self.assertFalse(repro_collab.criteria(policies)[closed_book])  # mean 0.775
    results = {'policies': policies, 'splits': [], 'criteria': repro_collab.criteria(policies),
               'criteria_per_seed': undefined, 'timings_s': {}}
    self.assertIn(f'- is undefined on the means, in 0 of 2 seeds (undefined in 2): {name}',
                  repro_collab.report(results))


class JobTest(absltest.TestCase):

  def test_tiny_run_writes_table_and_plot(self):
    config = repro_config.get_config()
    config.unlock()
    config.splits = ('test', 'ood')  # those of the criteria; 'train' deploys the same way
    config.seeds = (0, 2)  # the report names each seed, not its position
    for name in config.stages:
      _tiny(config.stages[name])
    workdir = epath.Path(self.create_tempdir().full_path)
    results = repro_collab.run(config, str(workdir))
    env = make_env(config.stages.sft.env)
    for policy in repro_collab.POLICIES:
      for split in config.splits:
        self.assertEqual(results['policies'][policy][split]['n']['mean'], len(env.splits[split]))
    self.assertLen(results['criteria'], 5)
    self.assertLen(results['criteria_per_seed'], 2)
    f1 = results['policies']['rest_single']['test']['f1']
    self.assertLen(f1['per_seed'], 2)
    self.assertAlmostEqual(f1['mean'], np.mean(f1['per_seed']))
    for split in config.splits:
      recall = results['policies']['in_context'][split]['memory_recall']['mean']
      self.assertTrue(0 <= recall <= 1, recall)
      decision = results['policies']['action_supervised'][split]['decision_auroc']['mean']
      self.assertTrue(0 <= decision <= 1, decision)  # both classes in every split here
      for policy in repro_collab.POLICIES:  # one search is always there: at least 1 - c
        best = results['policies'][policy][split]['best_reward']['mean']
        self.assertTrue(1 - env.config.search_cost - 1e-9 <= best <= 1, best)
    # The first action's log-probabilities, in FIRST_ACTIONS' order (one forward each), from
    # which the decision and closed-book hedge AUROCs are taken; the closed-book labels (the
    # untrained tiny policy may recall nothing: then every closed-book answer is wrong and
    # that AUROC is undefined, NaN).
    single = copy.deepcopy(config.stages.sft.env)
    single.mode = 'single'
    model, variables, env, formatter = repro_collab.load_policy(workdir / 'sft', single)
    questions = env.splits['test']
    contexts = [formatter.context(env.view(env.reset(np.random.default_rng(0), question=q),
                                           'assistant'), 'assistant') for q in questions]
    expected = np.stack([repro_collab.continuation_logprobs(
        model, variables, formatter.tokenizer.pad_id, contexts,
        [formatter.tokenizer.encode(a)[:1]] * len(contexts)) for a in ('answer', 'search',
                                                                        'hedge')], 1)
    np.testing.assert_allclose(repro_collab.first_action_logprobs(
        model, variables, formatter, env, questions), expected, rtol=1e-5, atol=1e-5)
    answers = repro_collab.closed_book_answers(model, variables, formatter, env, questions)
    wrong = [collab.f1(a, env.facts[q]) < 1 for q, a in zip(questions, answers)]
    np.testing.assert_allclose(
        results['policies']['in_context']['test']['closed_book_hedge_auroc']['mean'],
        repro_collab.auroc(expected[:, 2] - expected[:, 0], wrong), atol=1e-6)
    # SFT transcripts: the facts; per demo the assistant (single) or the asker and, when it
    # delegated, the helper (society).
    sft = config.stages.sft
    facts = (len(env.pretraining_texts()) + 2 * len(env.pretraining_episodes())) * \
        sft.sft.pretraining_repeats  # texts and quizzes (assistant and asker)
    transcripts = json.loads((workdir / 'sft' / 'summary.json').read_text())['transcripts']
    self.assertGreater(transcripts, facts + sft.sft.episodes)
    self.assertLess(transcripts, facts + 3 * sft.sft.episodes // 2)
    self.assertEqual(json.loads((workdir / 'results.json').read_text())['splits'],
                     list(config.splits))
    self.assertIn('| rest_single | ood |', (workdir / 'results.md').read_text())
    grown = (workdir / 'rest_s0' / 'samples' / 'grow_1.txt').read_text().splitlines()
    for line in grown:  # the tool's turns are the environment's, never generated
      if line.startswith('tool:'):
        self.assertRegex(line, r'^tool: (result|error) ')
    self.assertGreater((workdir / 'collab.png').stat().length, 10_000)
    grown = np.load(workdir / 'rest_s0' / 'grown' / 'iteration_1.npz')
    rejected = np.flatnonzero(~grown['ep_candidates'])  # lucky guesses (relabel): no rows
    self.assertFalse(np.isin(grown['episode_ids'], rejected).any())
    # ReST's iteration per seed: the best mean reward on the held-out demo questions.
    self.assertLen(results['rest_selection'], 2)
    for seed, chosen in zip(config.seeds, results['rest_selection']):
      self.assertEqual(chosen['seed'], seed)
      rewards = chosen['validation_rewards']
      self.assertLen(rewards, 2)
      self.assertEqual(chosen['iteration'], int(np.argmax(rewards)) + 1)
      for reward in rewards:  # at most F1 1, at least F1 0 with the searches of 4 turns
        self.assertTrue(-4 * env.config.search_cost <= reward <= 1, reward)
      self.assertIn(f"- ReST seed {seed}: iteration {chosen['iteration']} (mean reward",
                    (workdir / 'results.md').read_text())
    for split in ('tset', 'test', 'train'):
      bad = copy.deepcopy(config)
      bad.select_splits = ('demo', split)
      with self.assertRaisesRegex(ValueError, f"select_splits has '{split}'"):
        repro_collab.run(bad, str(workdir / 'bad'))
    self.assertFalse((workdir / 'bad' / 'sft').exists())
    unkept = copy.deepcopy(config.stages.rest)
    unkept.train.keep_checkpoints = 1
    with self.assertRaisesRegex(ValueError, 'keep_checkpoints=1'):
      repro_collab.iteration_steps(unkept)
    # The action-supervised policy is the in-context one fine-tuned: its tokenizer.
    saved = [workdir / name / 'tokenizer' for name in ('sft', 'oracle')]
    self.assertEqual(*[sorted((f.name, f.read_bytes()) for f in d.iterdir()) for d in saved])


if __name__ == '__main__':
  absltest.main()
