"""Plantain (issue 16): the environment's formats and format-gated reward, markup tokens,
TTFR, the inference procedures with scripted generators, PPO's targets and settings, and
an end-to-end smoke of rl_sft -> rl_ppo on the 8-device mesh."""
import json
import os
import re

from absl.testing import absltest
import jax
import numpy as np

from configs.rl import plantain as plantain_config
from model.config_errors import ConfigError
from rl import episodes as ep
from rl import plantain, ppo, rest
from rl.envs import base, make_env
from rl.envs import plantain as env_lib
from training import metrics as metrics_lib
from training import tokenizers

ROLES = env_lib.PlantainEnv.roles


def _env(fmt='interleaved', **overrides):
  config = env_lib.default_config()
  config.update(format=fmt, **overrides)
  return env_lib.PlantainEnv(config)


def _formatter():
  tokenizer = tokenizers.ByteTokenizer(ep.reserved_tokens(ROLES, env_lib.MARKUP))
  return ep.Formatter(tokenizer, ROLES, env_lib.MARKUP)


def _answered(env, episode, text, ended=True):
  episode = env.with_rejected(episode, episode.rejected)  # a fresh copy of the opening
  episode.turns.append(base.Turn('assistant', text, ended=ended))
  env.step(episode)
  return episode


class EnvTest(absltest.TestCase):

  def test_demonstrations_earn_the_full_reward_in_their_format_only(self):
    rng = np.random.default_rng(0)
    inter, think = _env(), _env('think')
    for _ in range(20):
      demo = inter.demonstration(rng)
      self.assertEqual(demo.reward, 3.0)  # r_format (1 + r_correct + r_plan) = 1 (1 + 1 + 1)
      self.assertEqual(env_lib.parse_plan(demo.turns[-1].text), demo.ops)
      # The same problem answered in the other format breaks this env's gate.
      other = _answered(inter, demo, env_lib.response_text(demo.operands, demo.ops, 'think'))
      self.assertEqual((other.reward, other.info['format']), (0.0, 0.0))
      demo = think.demonstration(rng)
      self.assertEqual(demo.reward, 2.0)  # no plan in think-then-answer
      self.assertEqual(demo.turns[0].text, demo.problem)  # rejected plans: interleaved only

  def test_reward_terms(self):
    env = _env()
    episode = env.reset(np.random.default_rng(1), 'test')
    good = env.solution(episode)
    wrong_answer = good[:good.rindex('answer: ') + 8] + '99999</answer>'
    self.assertEqual(_answered(env, episode, wrong_answer).reward, 2.0)  # 1 (1 + 0 + 1)
    plan = env_lib.plan_text(episode.ops)
    ops = list(episode.ops)
    ops[0] = '+' if ops[0] != '+' else '-'
    wrong_plan = good.replace(plan, env_lib.plan_text(ops), 1)
    got = _answered(env, episode, wrong_plan)
    fraction = (len(ops) - 1) / len(ops)
    self.assertAlmostEqual(got.reward, 1.0 * (1 + 1 + fraction))
    self.assertEqual(got.info['plan_ok'], 0.0)
    self.assertEqual(env_lib.judge_plan(tuple(episode.ops) + ('+',), episode.ops),
                     len(ops) / (len(ops) + 1))  # an extra step costs its share

  def test_broken_formats_get_zero_never_an_exception(self):
    env = _env()
    rng = np.random.default_rng(2)
    episode = env.reset(rng)
    good = env.solution(episode)
    broken = ['', 'answer: 5', good[:-1], good + 'x', good.replace('</think>', '', 1),
              '<think></think><answer>plan: </answer>' + good[good.index('</answer>') + 9:],
              good.split('</answer>', 1)[0] + '</answer>',  # the plan alone
              '<answer>x</answer><think>y</think>', '<think><think></think><answer>1</answer>']
    alphabet = list(env_lib.MARKUP) + list('plan: +-*=0123456789\n')
    broken += [''.join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(200)]
    for text in broken:
      got = _answered(env, episode, text)
      self.assertIn(got.reward, (0.0, 1.0, 2.0, 3.0) if got.info['format'] else (0.0,))
      if text in broken[:9]:
        self.assertEqual(got.reward, 0.0, msg=text)
    self.assertEqual(_answered(env, episode, good, ended=False).reward, 0.0)  # cut off

  def test_rejected_plans_are_in_the_problem_turn_and_the_config_is_checked(self):
    env = _env(rejected_fraction=1.0)
    demo = env.demonstration(np.random.default_rng(3))
    self.assertLen(demo.rejected, 1)
    self.assertNotEqual(demo.rejected[0], demo.ops)
    self.assertEqual(demo.turns[0].text,
                     f'{demo.problem}\nnot: {env_lib.plan_text(demo.rejected[0])}')
    self.assertEqual(demo.reward, 3.0)
    with self.assertRaisesRegex(ValueError, 'format'):
      make_env(_bad_config(format='both'))
    with self.assertRaisesRegex(ValueError, 'rejected_fraction'):
      make_env(_bad_config(rejected_fraction=1.5))


def _bad_config(**fields):
  config = env_lib.default_config()
  config.update(fields)
  return config


class MarkupAndTTFRTest(absltest.TestCase):

  def test_markup_is_one_token_each_and_round_trips(self):
    formatter = _formatter()
    env = _env()
    text = env.solution(env.reset(np.random.default_rng(4)))
    ids = formatter.encode(text)
    self.assertEqual(formatter.decode(ids), text)
    tag_ids = set(formatter.markup_ids.values())
    self.assertEqual(sum(i in tag_ids for i in ids), text.count('<'))
    self.assertFalse(tag_ids & set(formatter.tokenizer.encode(text)))  # plain encode: bytes

  def test_ttfr_counts_tokens_before_the_first_visible_answer_token(self):
    formatter = _formatter()
    episode = _env().reset(np.random.default_rng(5))
    inter = formatter.encode(_env().solution(episode))
    self.assertEqual(plantain.ttfr(inter, formatter), 3)  # <think></think><answer>
    think_text = _env('think').solution(episode)
    thinking = think_text[len('<think>'):think_text.index('</think>')]
    self.assertEqual(plantain.ttfr(formatter.encode(think_text), formatter),
                     len(thinking) + 3)  # bytes of thinking + <think>, </think>, <answer>
    self.assertEqual(plantain.ttfr(formatter.encode('<think>abc'), formatter), 4)  # never shown


class ScriptedPolicy:
  """A generator that answers from the context: the plan is wrong unless the context holds
  a rejected plan (``not:``) or it is the ``good_every``-th call; continuations finish the
  response correctly. Counts the contexts it saw."""

  def __init__(self, env, formatter, problems, good_every=0):
    self.env, self.formatter, self.problems = env, formatter, problems
    self.good_every, self.calls = good_every, 0

  def _episode(self, context):
    text = self.formatter.decode(context)
    problem = re.split('[\n<]', text)[0]  # before any rejected plan or response prefix
    return next(e for e in self.problems if e.problem == problem), text

  def __call__(self, contexts, rng, stop_tokens, max_new_tokens):
    del rng, max_new_tokens
    close = self.formatter.markup_ids[env_lib.END_ANSWER]
    out = []
    for context in contexts:
      self.calls += 1
      episode, text = self._episode(context)
      full = self.env.solution(episode)
      good = 'not:' in text or (self.good_every and self.calls % self.good_every == 0)
      if not good:
        ops = ('-' if episode.ops[0] == '+' else '+',) + tuple(episode.ops[1:])
        full = full.replace(env_lib.plan_text(episode.ops), env_lib.plan_text(ops), 1)
      prefix = context[::-1].index(self.formatter.role_ids['assistant'])  # after the role
      ids = self.formatter.encode(full)[prefix:]
      if close in stop_tokens:
        ids = ids[:ids.index(close)]
      out.append((ids, True))
    return out


class InferenceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.env, self.formatter = _env(), _formatter()
    rng = np.random.default_rng(6)
    self.problems = [self.env.reset(rng, 'test') for _ in range(3)]
    self.policy = ScriptedPolicy(self.env, self.formatter, self.problems)
    self.plan_len = [len(self.formatter.encode(
        self.env.solution(p).split('</answer>')[0] + '</answer>')) for p in self.problems]
    self.full_len = [len(self.formatter.encode(self.env.solution(p))) + 1 for p in self.problems]

  def test_rewind_at_plan_regenerates_only_the_plan(self):
    """First plan wrong; with it in the context the second is right: tokens = 2 plans + the
    rest of the response (+ its end-of-turn token)."""
    got = plantain.rewind_at_plan(self.env, self.problems, self.policy, self.formatter,
                                  jax.random.PRNGKey(0), 3, 24, 88)
    np.testing.assert_array_equal(got['rewinds'], [1, 1, 1])
    np.testing.assert_array_equal(got['correct'], [1, 1, 1])
    np.testing.assert_array_equal(got['tokens'], np.add(self.full_len, self.plan_len))

  def test_rewind_at_answer_regenerates_everything(self):
    """The scripted policy never sees a rejection, so the plan judge rejects every attempt:
    max_rewinds + 1 whole responses; the answers are right, so the oracle accepts at once."""
    for judge, rewinds, correct in (('plan', 2, 1), ('oracle', 0, 1)):
      got = plantain.rewind_at_answer(self.env, self.problems, self.policy, self.formatter,
                                      jax.random.PRNGKey(0), 2, 88, judge)
      np.testing.assert_array_equal(got['rewinds'], [rewinds] * 3)
      np.testing.assert_array_equal(got['correct'], [correct] * 3)
      np.testing.assert_array_equal(got['tokens'], np.multiply(self.full_len, rewinds + 1))

  def test_best_of_n_continues_the_best_plan(self):
    self.policy.good_every = 4  # one good plan among each problem's 4
    got = plantain.best_of_n_plans(self.env, self.problems, self.policy, self.formatter,
                                   jax.random.PRNGKey(0), 4, 24, 88)
    np.testing.assert_array_equal(got['plan_ok'], [1, 1, 1])
    np.testing.assert_array_equal(got['tokens'], np.add(self.full_len,
                                                        np.multiply(self.plan_len, 3)))
    with self.assertRaisesRegex(ValueError, 'judge'):
      plantain.rewind_at_answer(self.env, self.problems, self.policy, self.formatter,
                                jax.random.PRNGKey(0), 1, 88, 'llm')


class PPOTargetsTest(absltest.TestCase):

  def test_terminal_rewards_gae_and_whitening_by_hand(self):
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards = ppo.terminal_rewards(np.array([2.0, -1.0, 5.0]), mask)
    np.testing.assert_array_equal(rewards, [[0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0, 0]])
    adv = ppo.whiten(np.array([[0, 1.0, 3.0, 0], [1.0, 1.0, 3.0, 3.0], [7.0, 0, 0, 0]]), mask)
    # Masked values 1, 3, 1, 1, 3, 3: mean 2, std 1.
    np.testing.assert_allclose(adv, [[0, -1, 1, 0], [-1, -1, 1, 1], [0, 0, 0, 0]], atol=1e-5)

  def test_invalid_settings_are_errors_before_anything_runs(self):
    workdir = self.create_tempdir().full_path
    for field, value, message in (('clip_eps', 0.0, 'clip_eps=0.0 must be > 0'),
                                  ('gamma', 1.5, r'gamma=1.5 must be in \[0, 1\]'),
                                  ('lam', -0.1, r'lam=-0.1 must be in \[0, 1\]'),
                                  ('init_workdir', '', 'init_workdir is empty')):
      config = plantain_config.get_config('ppo')
      config.ppo.init_workdir = '/nonexistent'
      config.ppo[field] = value
      with self.assertRaisesRegex(ConfigError, message):
        ppo.ppo(config, workdir)
    self.assertEmpty(os.listdir(workdir))


def _tiny(stage, init_workdir=None):
  config = plantain_config.get_config(stage)
  config.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  config.data.update(batch_size=8, seq_len=128)
  config.train.update(steps=config.train.steps and 6, log_every=1, tensorboard=False,
                      async_checkpointing=False)
  config.sft.episodes = 64
  config.rollout.update(batch=16, max_new_tokens=24)
  config.rest.eval_sets = ()
  if init_workdir:
    config.ppo.update(init_workdir=init_workdir, iterations=2, prompts=4, samples_per_prompt=2,
                      epochs=1)
  return config


class PPOJobTest(absltest.TestCase):

  def test_sft_then_ppo_logs_the_learning_curves_and_resumes(self):
    """rl_sft then two PPO iterations of one step each on the 8-device mesh; rerunning the
    finished job changes nothing."""
    sft_dir, ppo_dir = (self.create_tempdir().full_path for _ in range(2))
    rest.sft(_tiny('sft'), sft_dir)
    config = _tiny('ppo', sft_dir)
    self.assertEqual(ppo.steps_per_iteration(config), 1)
    summary = ppo.ppo(config, ppo_dir)
    self.assertEqual((summary['step'], summary['preempted']), (2, False))
    records = metrics_lib.read_metrics(ppo_dir)
    train = [r for r in records if 'train/pg_loss' in r]
    self.assertEqual([r['step'] for r in train], [1, 2])
    for name in ('train/kl', 'train/value_loss', 'train/clip_frac', 'train/ratio'):
      self.assertTrue(all(np.isfinite(r[name]) for r in train), name)
    self.assertAlmostEqual(train[0]['train/kl'], 0.0, places=5)  # starts at the reference
    # On-policy at the first step: the behaviour log-probs are the policy's own, so every
    # ratio is 1 (cached decoding vs. the full forward differ by float32 rounding only).
    self.assertAlmostEqual(train[0]['train/ratio'], 1.0, places=4)
    self.assertEqual(train[0]['train/clip_frac'], 0.0)
    rollouts = [r for r in records if 'rollout/reward' in r]
    self.assertEqual([r['step'] for r in rollouts], [0, 1])
    self.assertTrue(all(r['rollout/reward'] in (0.0,) or 0 <= r['rollout/reward'] <= 3
                        for r in rollouts))
    self.assertTrue(os.path.exists(os.path.join(ppo_dir, 'grown', 'iteration_2.npz')))
    self.assertEqual(ppo.ppo(config, ppo_dir)['step'], 2)
    with open(os.path.join(ppo_dir, 'config.json')) as f:
      self.assertEqual(json.load(f)['job'], 'rl_ppo')


if __name__ == '__main__':
  absltest.main()
