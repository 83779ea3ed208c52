"""Plantain (arXiv:2512.03176) in miniature: SFT then PPO on ``rl/envs/plantain.py``, in the
interleaved (plan-first) format or the think-then-answer baseline.

A tiny Llama-style policy on the byte tokenizer with the reserved role and markup tokens
(``<think>``, ``</think>``, ``<answer>``, ``</answer>`` one token each). The argument is the
stage, with ``_think`` for the baseline format:

  python -m launch.main --config=configs/rl/plantain.py:sft --workdir=workdirs/plantain/sft
  python -m launch.main --config=configs/rl/plantain.py:ppo --workdir=workdirs/plantain/ppo \
      --config.ppo.init_workdir=workdirs/plantain/sft
  python -m launch.main --config=configs/rl/plantain.py:sft_think ...   (and ppo_think)

The whole reproduction (both formats, seeds, TTFR, best-of-N plans, rewind-and-repeat) is
``configs/repro/plantain.py``.
"""
from configs import base
from rl import episodes, play, ppo, rest
from rl.envs import plantain

STAGES = ('sft', 'ppo', 'sft_think', 'ppo_think')


def get_config(stage='sft'):
  if stage not in STAGES:
    raise ValueError(f'configs/rl/plantain.py:{stage}: the stage must be one of {STAGES}.')
  kind, _, fmt = stage.partition('_')
  config = base.base_config()
  config.job = 'rl_sft' if kind == 'sft' else 'rl_ppo'
  config.name = f'plantain_{stage}'
  config.env = plantain.default_config()
  config.env.update(format=fmt or 'interleaved', min_ops=2, max_ops=4, max_rejected=1)
  config.tokenizer.update(kind='byte', reserved_tokens=episodes.reserved_tokens(
      plantain.PlantainEnv.roles, plantain.MARKUP))
  config.model = base.model_config(vocab_size=272, embed_dim=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, mlp_dim=384)
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.sft = rest.default_sft_config()
  config.sft.update(episodes=6000, roles=('assistant',))
  config.rest = rest.default_rest_config()  # the evaluation settings of both jobs
  config.rest.update(eval_sets=('test',), eval_modes=('greedy',), eval_episodes=64,
                     final_eval_episodes=128)
  config.rollout = play.default_rollout_config()
  config.rollout.update(max_new_tokens=88, max_turns=1, batch=256)
  if kind == 'sft':
    config.train = base.train_config(steps=800, learning_rate=3e-3, warmup_steps=50,
                                     eval_every=0, checkpoint_every=800, log_every=50)
  else:
    config.ppo = ppo.default_ppo_config()
    # lam = 1: A_t = R - V_t, so a critic that starts at 0 adds no bias toward late tokens;
    # a small value_coeff keeps the critic's regression (rewards near 2.4 from a head at 0)
    # from dominating the clipped gradient of the shared trunk.
    config.ppo.update(iterations=4, prompts=64, samples_per_prompt=4, epochs=2, lam=1.0,
                      value_coeff=0.05, kl_coeff=0.05)
    config.train = base.train_config(steps=0, learning_rate=3e-5, schedule='constant',
                                     warmup_steps=0, eval_every=0, checkpoint_every=10_000,
                                     log_every=1, weight_decay=0.0)
  config.sample.max_new_tokens = 0
  return config
