"""Online RL with PAV dense rewards (rl/pav.py step returns, rl/repro_pav_rl.py): per-step
rewards on hand-computed examples, and a short smoke of the RL loop on a tiny policy."""
import jax
import numpy as np
import pytest

from configs import base as base_configs
from configs.repro import pav_rl as pav_rl_config
from model import decode
from model.registry import build_model
from rl import episodes as ep
from rl import pav, repro_pav_rl, repro_pav_search
from rl.envs import arith
from training import tokenizers
from training import workdir as workdir_lib

NL, END = 10, 99


def test_step_rewards_sit_on_step_ends_and_fill_their_step():
  # Row 0: 2 prompt tokens (one a newline, not the policy's), steps 'a\n', 'bc\n', 'd<end>'.
  # Row 1: a turn cut off after 'x\nyz' (no end token): its last token ends step 2.
  targets = np.asarray([[NL, 1, 2, NL, 3, 4, NL, 5, END, 0],
                        [1, 6, NL, 7, 8, 0, 0, 0, 0, 0]])
  mask = np.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
                     [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
  ends = np.asarray(pav.step_ends(targets, mask, NL))
  assert ends.tolist() == [[0, 0, 0, 1, 0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 1, 0, 0, 0, 0, 0]]
  rewards = np.asarray([[0.5, -0.25, 2.0], [1.0, 3.0, 7.0]])
  returns = np.asarray(pav.step_token_returns(rewards, ends, mask))
  np.testing.assert_allclose(returns, [[0, 0, .5, .5, -.25, -.25, -.25, 2, 2, 0],
                                       [0, 1, 1, 3, 3, 0, 0, 0, 0, 0]])
  # One reward per row (outcome-only RL): every policy token gets it.
  np.testing.assert_allclose(np.asarray(pav.step_token_returns(rewards[:, :1], ends, mask)),
                             mask * rewards[:, :1])


class _StubVerifier:
  """Q^pi after each prefix: 0.1 x (number of steps + 1), whatever they say."""

  def values(self, candidates):
    return [0.1 * np.arange(1, len(steps) + 2) for _, steps, _ in candidates]


def test_effective_step_rewards_on_hand_numbers():
  samples = [('1\n2\nanswer: 3', 9, 'end'), ('1', 1, 'limit')]
  out = repro_pav_rl.step_rewards(_StubVerifier(), [None, None], samples, [1.0, 0.0],
                                  alpha=2.0, prover_k=2)
  q_mu = lambda q: 1 - (1 - q) ** 2  # Best-of-2 prover
  row0 = [1 + 2 * (q_mu(0.1 * (h + 1)) - q_mu(0.1 * h)) for h in (1, 2, 3)]
  row1 = [2 * (q_mu(0.2) - q_mu(0.1)), 0.0, 0.0]  # padded steps: zero advantage
  np.testing.assert_allclose(out, [row0, row1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(repro_pav_rl.step_rewards(None, [None, None], samples,
                                                       [1.0, 0.0], 0.0, 2), [[1.0], [0.0]])


def test_bad_config_is_named_before_any_stage(tmp_path):
  config = pav_rl_config.get_config()
  config.rl.alpha = -1.0
  with pytest.raises(ValueError, match='alpha'):
    repro_pav_rl.run(config, str(tmp_path))
  config = pav_rl_config.get_config()
  config.stages.pav.verifier.n_mc = 0
  with pytest.raises(ValueError, match='n_mc'):
    repro_pav_search.train_stages(config, workdir_lib.path(str(tmp_path)), kinds=('pav',))
  assert not (tmp_path / 'sft').exists()


def test_rl_loop_smoke_on_a_tiny_policy():
  env = arith.ArithEnv()
  formatter = ep.Formatter(tokenizers.ByteTokenizer(ep.reserved_tokens(env.roles)), env.roles)
  policy = build_model(base_configs.model_config(
      vocab_size=264, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64))
  variables = policy.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
  sampler = pav.PolicySampler(env, policy, jax.tree.map(np.asarray, variables), formatter,
                              decode.SamplingConfig(temperature=1.0), max_new_tokens=12,
                              max_step_tokens=6, batch=8)
  config = pav_rl_config.get_config()
  config.stages.sft.model.embed_dim = 32
  config.rl.update(steps=2, batch=4, eval_every=1, eval_problems=4, seq_len=64)
  setup = repro_pav_rl.Setup(config, env, sampler, _StubVerifier(), solve_rate=0.25)
  curves = repro_pav_rl.train_policy(setup, alpha=3.0, seed=0)
  assert curves['samples'] == [0, 4, 8] and len(curves['accuracy']) == 3
  assert all(0.0 <= a <= 1.0 for a in curves['accuracy'])
  # First update: the value head is 0.25 everywhere and the untrained policy never
  # answers, so every return is 3 x a Best-of-4 stub advantage, in [0, 3 x 0.2465]:
  # 1/2 (0.25 - G)^2 <= 0.121.
  assert 0.0 < curves['value_loss'][0] < 0.121 and np.all(np.isfinite(curves['kl']))
  assert abs(curves['kl'][0]) < 1e-4  # the first batch is sampled from the reference


def test_samples_to_the_outcome_final_are_read_off_the_mean_curves():
  config = pav_rl_config.get_config()
  config.rl.seeds = (0, 1)
  curves = {('outcome', 0): [0.5, 0.5, 0.6], ('outcome', 1): [0.5, 0.6, 0.6],
            ('pav', 0): [0.5, 0.7, 0.7], ('pav', 1): [0.5, 0.6, 0.5]}
  runs = {key: dict(samples=[0, 64, 128], accuracy=acc, kl=[0.0]) for key, acc in curves.items()}
  results = repro_pav_rl.analyse(config, runs)
  assert results['target'] == pytest.approx(0.6)
  assert results['reach']['outcome'] == dict(mean_curve=128, per_seed=[128, 64])
  assert results['reach']['pav'] == dict(mean_curve=64, per_seed=[64, 64])
  assert results['sample_ratio'] == pytest.approx(2.0)
  assert results['gain'] == pytest.approx(0.0)
  assert 'never' not in repro_pav_rl.report(results)
