"""Steerable clarification (arXiv:2512.04068) in miniature: SFT, then ReST with self-play.

A tiny Llama-style policy, a SentencePiece tokenizer (digits split, so unseen cost values
are spelled with known tokens) with the reserved role tokens, the ``clarify`` environment.
The config argument picks the stage:

  python -m launch.main --config=configs/rl/clarify.py:sft --workdir=workdirs/clarify/sft
  python -m launch.main --config=configs/rl/clarify.py:rest --workdir=workdirs/clarify/rest \
      --config.rest.init_workdir=workdirs/clarify/sft
  python -m launch.main --config=configs/rl/clarify.py:single --workdir=workdirs/clarify/single \
      --config.rest.init_workdir=workdirs/clarify/sft     # ReST at one cost (baseline)

The whole reproduction (all stages, seeds, baselines, table and plots) is
``configs/repro/clarify.py``.
"""
from configs import base
from rl import episodes, play, rest
from rl.envs import clarify


def get_config(stage='sft'):
  if stage not in ('sft', 'rest', 'single'):
    raise ValueError(f"configs/rl/clarify.py:{stage}: the stage must be 'sft', 'rest' or "
                     "'single'.")
  config = base.base_config()
  config.job = 'rl_sft' if stage == 'sft' else 'rl_rest'
  config.name = f'clarify_{stage}'
  config.env = clarify.default_config()
  config.env.reward = 'expected'  # same expectation as the outcome, without the guessing luck
  if stage == 'single':
    config.env.single_cost = (0.3, 0.05)  # the middle of the training ranges
  config.tokenizer.update(kind='sentencepiece', vocab_size=512, split_digits=True,
                          reserved_tokens=episodes.reserved_tokens(clarify.ClarifyEnv.roles))
  config.model = base.model_config(vocab_size=512, embed_dim=128, num_layers=3, num_heads=4,
                                   num_kv_heads=2, mlp_dim=384)
  config.data.seq_len = 80
  config.data.batch_size = 64
  config.sft = rest.default_sft_config()
  config.rest = rest.default_rest_config()
  config.rollout = play.default_rollout_config()
  if stage == 'sft':
    config.train = base.train_config(steps=800, learning_rate=3e-3, warmup_steps=50,
                                     eval_every=0, checkpoint_every=400, log_every=50)
  else:
    config.rest.update(iterations=6, prompts=512, samples_per_prompt=8, max_per_prompt=1,
                       thresholds=(-1.0,), steps_per_improve=80)
    config.train = base.train_config(steps=0, learning_rate=1e-3, schedule='constant',
                                     warmup_steps=0, eval_every=0, checkpoint_every=10_000,
                                     log_every=50, weight_decay=0.0)
  config.sample.max_new_tokens = 0
  return config
