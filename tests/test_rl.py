"""Tests for the RL core: reserved role tokens, batched multi-turn rollouts, transcripts,
ReST's filter and the SFT -> ReST jobs (8-device mesh, preemption and resume)."""
import copy
import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from configs.rl import clarify as clarify_config
from model import decode
from model.registry import build_model
from rl import episodes as ep
from rl import repro_clarify, rest
from rl.envs import base, clarify, make_env
from tests.utils import FORWARD_RTOL
from training import checkpoint as ckpt_lib
from training import tokenizers
from training import trainer as trainer_lib

ROLES = clarify.ClarifyEnv.roles
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _byte_formatter():
  return ep.Formatter(tokenizers.ByteTokenizer(ep.reserved_tokens(ROLES)), ROLES)


class ReservedTokensTest(absltest.TestCase):

  def test_reserved_ids_are_distinct_never_encoded_and_survive_a_reload(self):
    config = tokenizers.default_tokenizer_config()
    config.update(kind='sentencepiece', vocab_size=320, split_digits=True,
                  reserved_tokens=ep.reserved_tokens(ROLES))
    texts = [f'ask cost 0.{i:02d} word cost 0.0{i % 10}2 . kim : baker 70 paris' for i in range(99)]
    sentencepiece = tokenizers.make_tokenizer(config, texts=texts)
    for tok in (sentencepiece, tokenizers.ByteTokenizer(ep.reserved_tokens(ROLES))):
      ids = [tok.reserved_id(t) for t in ep.reserved_tokens(ROLES)]
      self.assertLen(set(ids), len(ids))
      self.assertTrue(all(0 <= i < tok.vocab_size for i in ids))
      encoded = tok.encode('<|user|> hi <|end|> 0.35' + ''.join(texts[:3]))
      self.assertFalse(set(ids) & set(encoded))
      self.assertEqual(tok.decode([ids[0], *tok.encode('hi'), ids[-1]]), 'hi')
      directory = self.create_tempdir().full_path
      tok.save(directory)
      loaded = tokenizers.load_tokenizer(directory)
      self.assertEqual([loaded.reserved_id(t) for t in ep.reserved_tokens(ROLES)], ids)
    digits = [sentencepiece.decode([i]) for i in sentencepiece.encode('0.35')]
    self.assertEqual(digits, ['0', '.', '3', '5'])  # split_digits: unseen costs use known ids

  def test_missing_or_repeated_reserved_tokens_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"no reserved token '<\|system\|>'.*'<\|end\|>'"):
      ep.Formatter(tokenizers.ByteTokenizer(), ROLES)
    with self.assertRaisesRegex(ValueError, 'repeated'):
      tokenizers.ByteTokenizer(('<|a|>', '<|a|>'))
    with self.assertRaisesRegex(ValueError, r'vocab_size=259 is smaller'):
      _byte_formatter().check_vocab(259)


def _tiny_model(vocab_size):
  config = clarify_config.get_config('sft')
  config.model.update(vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, mlp_dim=64)
  model = build_model(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  return model, params


class RolloutTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.env = make_env(clarify.default_config())
    cls.formatter = _byte_formatter()
    cls.model, cls.params = _tiny_model(cls.formatter.tokenizer.vocab_size)
    cls.actor = ep.Actor(cls.model, cls.params, decode.SamplingConfig(), max_new_tokens=12)

  def _episodes(self, n, seed=0):
    rng = np.random.default_rng(seed)
    return [self.env.reset(rng, 'heldout') for _ in range(n)]

  def test_transcripts_hold_exact_behaviour_logprobs_of_policy_tokens(self):
    """Random weights write malformed actions: every episode still ends (as invalid, with
    the environment's reward), and each generated token's behaviour log-prob equals the
    full forward pass's log-prob of it (temperature 1, no filter)."""
    episodes = ep.rollout(self.env, self._episodes(6), {'assistant': self.actor},
                          self.formatter, jax.random.PRNGKey(1))
    self.assertTrue(all(e.done for e in episodes))
    for e in episodes:
      if e.info['action'] == 'invalid':
        text = e.turns[-1].text
        words = sum(w != ';' for w in text.replace(';', ' ; ').split()[1:])
        self.assertAlmostEqual(e.reward, -e.alpha * e.n_clarifications - e.beta * words)
    items = ep.transcripts(self.env, episodes, self.formatter, 'assistant', ('assistant',))
    assistant = ROLES.index('assistant')
    for t, e in zip(items, episodes):
      generated = [t for t in e.turns if t.role == 'assistant']
      self.assertEqual(t.policy_mask.sum(), sum(len(g.ids) + g.ended for g in generated))
      self.assertTrue((t.roles[t.policy_mask == 1] == assistant).all())
    batch = ep.to_batch(items, 192, self.formatter.tokenizer.pad_id)
    logits, _ = self.model.apply({'params': self.params}, batch['tokens'],
                                 positions=batch['positions'], segment_ids=batch['segment_ids'])
    full = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                              batch['targets'][..., None], axis=-1)[..., 0]
    mask = batch['loss_mask'] == 1
    np.testing.assert_allclose(batch['behaviour_logprobs'][mask], full[mask], atol=1e-4,
                               rtol=FORWARD_RTOL)
    self.assertTrue((batch['behaviour_logprobs'][~mask] == 0).all())

  def test_self_play_user_sees_the_intent_and_is_not_trained(self):
    episodes = self._episodes(4, seed=3)
    for e in episodes:
      e.turns.append(base.Turn('assistant', 'ask ' + ' or '.join(e.senses) + ' ?'))
      self.env.step(e)
      self.assertEqual(e.next_role, 'user')
    actors = {'assistant': self.actor, 'user': self.actor}
    ep.rollout(self.env, episodes, actors, self.formatter, jax.random.PRNGKey(2))
    for e in episodes:
      user_view = ' '.join(t.text for t in self.env.view(e, 'user'))
      assistant_view = self.env.view(e, 'assistant')
      self.assertIn(f'you mean {e.name} the {e.senses[e.intent]}', user_view)
      self.assertNotIn('you mean', ' '.join(t.text for t in assistant_view))
      reply = e.turns[2]
      self.assertEqual(reply.role, 'user')
      self.assertIsNotNone(reply.logprobs)  # the policy played the user
      t = ep.transcript(self.formatter, assistant_view, ('assistant',), e.reward)
      user_tokens = t.roles == ROLES.index('user')
      self.assertFalse(t.policy_mask[user_tokens].any())

  def test_batches_align_targets_and_resume_deterministically(self):
    episodes = [self.env.demonstration(np.random.default_rng([0, i])) for i in range(10)]
    items = ep.transcripts(self.env, episodes, self.formatter, 'assistant', ('assistant',),
                           demonstration=True)
    batch = ep.to_batch(items, 200, self.formatter.tokenizer.pad_id)
    for i, t in enumerate(items):
      n = len(t.tokens) - 1
      np.testing.assert_array_equal(batch['targets'][i, :n - 1], batch['tokens'][i, 1:n])
      self.assertEqual(batch['loss_mask'][i].sum(), t.policy_mask.sum())
      text = self.formatter.tokenizer.decode(batch['targets'][i][batch['loss_mask'][i] == 1])
      self.assertEqual(text, ''.join(x.text for x in episodes[i].turns if x.role == 'assistant'))
    with self.assertRaisesRegex(ValueError, 'more than data.seq_len'):
      ep.to_batch(items, 20, 0)
    stream = ep.epoch_batches(batch, 4, seed=(0, 1))
    first = [next(stream)['tokens'] for _ in range(7)]
    resumed = ep.epoch_batches(batch, 4, seed=(0, 1), start=5)
    np.testing.assert_array_equal(next(resumed)['tokens'], first[5])
    seen = np.concatenate([b[:, 0:60] for b in first[:5]])  # 20 rows = 2 epochs of 10
    self.assertLen({r.tobytes() for r in seen}, len({r.tobytes() for r in batch['tokens'][:, :60]}))


class ImproveFilterTest(absltest.TestCase):

  def test_threshold_margin_and_cap(self):
    rewards = [0.9, 0.5, 0.9, 0.1, -0.2, 0.3]
    groups = [0, 0, 0, 1, 1, 2]
    np.testing.assert_array_equal(rest.improve_filter(rewards, groups, 0.0, np.inf, 5),
                                  [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(rest.improve_filter(rewards, groups, -1, 0.0, 5),
                                  [0, 2, 3, 5])  # each prompt's best
    np.testing.assert_array_equal(rest.improve_filter(rewards, groups, -1, np.inf, 1),
                                  [0, 3, 5])  # highest per prompt, first among ties
    np.testing.assert_array_equal(rest.improve_filter(rewards, groups, -1, np.inf, 5, 0.5),
                                  [0, 1, 2])  # the top half of all samples


class RehearsalTest(absltest.TestCase):

  def test_mix_share_and_rows(self):
    data = {'tokens': np.zeros((6, 3), np.int32), 'rewards': np.ones(6, np.float32)}
    rehearsal = {'tokens': np.arange(12, dtype=np.int32).reshape(4, 3) + 1,
                 'rewards': np.zeros(4, np.float32)}
    mixed = rest.with_rehearsal(data, rehearsal, 0.25, np.random.default_rng(0))
    self.assertEqual(mixed['tokens'].shape, (8, 3))  # 2 of 8 rows: a quarter
    np.testing.assert_array_equal(mixed['tokens'][:6], data['tokens'])
    drawn = {tuple(r) for r in mixed['tokens'][6:]}
    self.assertLen(drawn, 2)  # without replacement
    self.assertLessEqual(drawn, {tuple(r) for r in rehearsal['tokens']})
    np.testing.assert_array_equal(mixed['rewards'][6:], 0)  # rows kept whole
    half = rest.with_rehearsal(data, rehearsal, 0.5, np.random.default_rng(0))
    self.assertEqual(len(half['tokens']), 12)  # 6 drawn from 4 rows: with replacement
    self.assertTrue(np.all(half['tokens'][6:] > 0))


class ReproAnalysisTest(absltest.TestCase):

  def test_scripted_policies_meet_their_exact_values(self):
    """The analysis of the reproduction, fed with scripted policies: the Bayes-optimal one
    agrees with itself everywhere, earns the exact Bayes value and has its monotone
    curves; always-clarify earns the exact always-clarify value."""
    config = clarify.default_config()
    config.reward = 'expected'
    env = make_env(config)
    rng = np.random.default_rng(0)

    def evaluate(behaviour):
      return [(s, env.summary([env.demonstration(rng, 'heldout', behaviour, alpha=s['alpha'],
                                                 beta=s['beta']) for _ in range(150)]))
              for s in env.eval_settings()['heldout']]

    evals = {'optimal': [evaluate('optimal'), evaluate('optimal')],
             'clarify': [evaluate('clarify')]}
    results = repro_clarify.analyse(env, evals, 150, seed=1)
    optimal, always = results['policies']['optimal'], results['policies']['clarify']
    self.assertEqual(optimal['agreement']['mean'], 1.0)
    self.assertAlmostEqual(optimal['reward']['mean'], results['baselines']['bayes_optimal'],
                           delta=0.02)  # different random instances, ~0.005 standard error
    self.assertAlmostEqual(always['reward']['mean'], results['baselines']['always_clarify'],
                           delta=0.02)
    self.assertEqual(always['clarify_vs_alpha']['mean'], [1.0] * 6)
    self.assertTrue(np.isnan(always['rho_clarify_alpha']['mean']))  # a constant rate
    for key in ('rho_clarify_alpha', 'rho_enumerate_beta'):
      self.assertLessEqual(optimal[key]['mean'], -0.8)
    path = epath.Path(self.create_tempdir().full_path) / 'clarify.png'
    both = {'sample': results, 'greedy': results, 'single_cost': [0.3, 0.05],
            'timings_s': {'sft': 1.0}, 'total_s': 1.0}
    repro_clarify.plot(both, path)
    self.assertGreater(path.stat().length, 10_000)
    self.assertIn('| optimal | 2 |', repro_clarify.report(both))


def _tiny_stage(stage, workdir=None):
  config = clarify_config.get_config(stage)
  config.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
  config.data.update(batch_size=16, seq_len=80)
  config.train.update(steps=20, log_every=10, tensorboard=False, async_checkpointing=False)
  config.sft.episodes = 300
  config.rollout.update(batch=64, max_new_tokens=12)
  config.rest.update(iterations=2, prompts=8, samples_per_prompt=2, thresholds=(-9.0, -5.0),
                     steps_per_improve=2, eval_episodes=1, final_eval_episodes=1,
                     eval_sets=('heldout',))
  if workdir:
    config.rest.init_workdir = workdir
  return config


class RestJobTest(absltest.TestCase):

  def test_sft_then_rest_em_resumes_mid_iteration_on_the_mesh(self):
    """SFT then ReST-EM on the 8-device mesh. Every iteration fine-tunes the SFT parameters
    with a fresh optimizer (Adam has counted only the last iteration's steps), and a run
    preempted inside its second iteration and rerun ends with the parameters of an
    uninterrupted run."""
    self.assertEqual(jax.device_count(), 8)
    sft_dir = self.create_tempdir().full_path
    summary = rest.sft(_tiny_stage('sft'), sft_dir)
    self.assertEqual(summary['step'], 20)
    self.assertIn('eval/heldout/reward', summary)
    # sft.init_workdir: a fine-tune starts from that run's weights and tokenizer (a step at
    # learning rate 0 leaves them as they were).
    tuned_dir = self.create_tempdir().full_path
    tuned = _tiny_stage('sft')
    tuned.sft.init_workdir = sft_dir
    tuned.train.update(steps=1, learning_rate=0.0, warmup_steps=0)
    rest.sft(tuned, tuned_dir)
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_model(sft_dir)[1],
                 ckpt_lib.load_model(tuned_dir)[1])
    saved = [epath.Path(d) / tokenizers.TOKENIZER_SUBDIR for d in (sft_dir, tuned_dir)]
    self.assertEqual(*[sorted((f.name, f.read_bytes()) for f in d.iterdir()) for d in saved])
    config = _tiny_stage('rest', sft_dir)
    config.rest.restart_from_base = True
    straight, resumed = (self.create_tempdir().full_path for _ in range(2))
    unevaluated = copy.deepcopy(config)
    unevaluated.rest.eval_sets = ()  # evaluation touches neither the state nor its RNG
    rest.rest(unevaluated, straight)
    with mock.patch.object(trainer_lib.Preemption, 'requested', lambda self, step: step == 5):
      self.assertTrue(rest.rest(config, resumed)['preempted'])
    self.assertEqual(ckpt_lib.Checkpointer(resumed, async_save=False).latest_step(), 5)
    summary = rest.rest(config, resumed)
    self.assertEqual(summary['step'], 8)  # 2 iterations x 2 Improve steps x 2 steps
    states = []
    for workdir in (straight, resumed):
      checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
      states.append(jax.device_get(checkpointer.restore(
          8, trainer_lib.Trainer(config, workdir).abstract)[0]))
      checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, states[0]['params'], states[1]['params'])
    counts = {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
        states[0]['opt_state'])[0] if 'count' in jax.tree_util.keystr(path)}
    self.assertEqual(counts, {4})
    with open(os.path.join(resumed, 'eval', 'iteration_2.json')) as f:
      final = json.load(f)
    self.assertEqual(sorted(final), ['heldout', 'heldout_greedy'])
    self.assertLen(final['heldout_greedy'], 30)
    self.assertTrue(os.path.exists(os.path.join(resumed, 'samples', 'grow_2.txt')))

  def test_bad_configs_fail_before_compiling(self):
    workdir = self.create_tempdir().full_path
    for override, message in (('--config.env.name=clarfy', "config.env.name='clarfy'"),
                              ('--config.tokenizer.reserved_tokens=()', "<|system|>")):
      out = subprocess.run([sys.executable, '-m', 'launch.main',
                            '--config=configs/rl/clarify.py:sft', f'--workdir={workdir}',
                            override], cwd=REPO, capture_output=True, text=True, timeout=300)
      self.assertEqual(out.returncode, 1)
      self.assertIn(message, out.stderr.strip().splitlines()[-1])
      self.assertNotIn('Traceback', out.stderr)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))
    config = _tiny_stage('rest')
    with self.assertRaisesRegex(ValueError, 'init_workdir is empty'):
      rest.rest(config, self.create_tempdir().full_path)
    misspelt = copy.deepcopy(config)
    misspelt.rest.update(init_workdir='/nonexistent', untrained_after_role='tol')
    with self.assertRaisesRegex(ValueError, "untrained_after_role='tol'"):
      rest.rest(misspelt, self.create_tempdir().full_path)
    no_grow = copy.deepcopy(misspelt)
    no_grow.rest.update(untrained_after_role='', grow_splits=())
    with self.assertRaisesRegex(ValueError, 'grow_splits is empty'):
      rest.rest(no_grow, self.create_tempdir().full_path)
    all_rehearsal = copy.deepcopy(config)
    all_rehearsal.rest.pretraining_mix = 1.0  # no room left for the rollouts
    with self.assertRaisesRegex(ValueError, 'pretraining_mix=1.0'):
      rest.rest(all_rehearsal, self.create_tempdir().full_path)
    for kinds in ((), ('texts', 'quizzes')):
      all_rehearsal.rest.update(pretraining_mix=0.1, rehearsal=kinds)
      with self.assertRaisesRegex(ValueError, r'rehearsal=\(.*name one or both'):
        rest.rest(all_rehearsal, self.create_tempdir().full_path)
    bad = copy.deepcopy(config.env)
    bad.name = 'clarfy'
    with self.assertRaisesRegex(ValueError, 'clarify'):
      make_env(bad)
    bad = copy.deepcopy(config.env)
    bad.alpha_range = (0.5, 0.1)
    with self.assertRaisesRegex(ValueError, 'alpha_range'):
      make_env(bad)


if __name__ == '__main__':
  absltest.main()
