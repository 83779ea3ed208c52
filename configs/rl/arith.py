"""Multi-step arithmetic (``rl/envs/arith.py``): the SFT policy of the PAV reproduction.

A tiny Llama-style policy on the byte tokenizer (digits are single tokens, the newline that
ends a step is one token) with the reserved role tokens:

  python -m launch.main --config=configs/rl/arith.py:sft --workdir=workdirs/arith/sft
  python -m launch.main --config=configs/rl/arith.py:pav --workdir=workdirs/arith/pav \
      --config.verifier.policy_workdir=workdirs/arith/sft     # MC labels + process verifier
  python -m launch.main --config=configs/rl/arith.py:orm --workdir=workdirs/arith/orm \
      --config.verifier.policy_workdir=workdirs/arith/sft \
      --config.verifier.labels_file=workdirs/arith/pav/labels.json  # outcome verifier

The whole reproduction (SFT, Monte Carlo labels, verifiers, search) is
``configs/repro/pav_search.py``.
"""
from configs import base
from rl import episodes, pav, play, rest
from rl.envs import arith


def get_config(stage='sft'):
  if stage not in ('sft',) + pav.KINDS:
    raise ValueError(f"configs/rl/arith.py:{stage}: the stage must be 'sft', 'pav' or 'orm'.")
  config = base.base_config()
  config.job = 'rl_sft' if stage == 'sft' else 'pav_verifier'
  config.name = f'arith_{stage}'
  config.env = arith.default_config()
  config.tokenizer.update(kind='byte',
                          reserved_tokens=episodes.reserved_tokens(arith.ArithEnv.roles))
  config.model = base.model_config(vocab_size=264, embed_dim=128, num_layers=3, num_heads=4,
                                   num_kv_heads=2, mlp_dim=384)
  config.data.seq_len = 112
  config.data.batch_size = 64
  config.sft = rest.default_sft_config()
  config.sft.update(episodes=8000, roles=('assistant',))
  config.rest = rest.default_rest_config()
  config.rest.update(eval_sets=('test',), eval_modes=('sample', 'greedy'),
                     final_eval_episodes=256)
  config.rollout = play.default_rollout_config()
  config.rollout.update(max_new_tokens=80, max_turns=1, batch=256)
  if stage == 'sft':
    config.train = base.train_config(steps=500, learning_rate=3e-3, warmup_steps=50,
                                     eval_every=0, checkpoint_every=500, log_every=50)
  else:
    config.verifier = pav.default_verifier_config()
    config.verifier.kind = stage
    config.train = base.train_config(steps=200, learning_rate=1e-3, warmup_steps=20,
                                     eval_every=0, checkpoint_every=200, log_every=50)
  config.sample.max_new_tokens = 0
  return config
