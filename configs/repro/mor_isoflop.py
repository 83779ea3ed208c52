"""MoR isoFLOP comparison in miniature (PAPERS.md §2; the paper's 360M table).

Vanilla (8 layers), recursive N_r=3 (middle_cycle, 1+2+1 unique layers), MoR expert choice
N_r=2 (1+3+1) and N_r=3 (1+2+1), token choice N_r=3, KV sharing N_r=3, each trained on
pycorpus for the same training FLOPs; writes mor_isoflop.{md,json,png} into the workdir:

  python -m launch.main --config=configs/repro/mor_isoflop.py --workdir=workdirs/repro_mor
"""
import ml_collections

from configs import base, mor_tiny


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'repro_mor_isoflop'
  config.seed = 0
  pretrain = base.base_config()
  pretrain.data.seq_len = 128
  pretrain.data.batch_size = 16
  pretrain.train = base.train_config(learning_rate=3e-3, eval_batches=8,
                                     async_checkpointing=False, tensorboard=False, log_every=20)
  config.base = pretrain
  # About 125 vanilla steps of 2048 tokens: the six models train in ~10 minutes on 2 cores.
  config.flop_budget = 2.0e12
  shape = dict(embed_dim=128, num_layers=8, num_heads=4, num_kv_heads=2, mlp_dim=384)
  recursive = base.model_config(**shape)
  recursive.update(dict(name='recursive', num_loops=3, sharing='middle_cycle'))
  config.variants = ml_collections.ConfigDict({  # full model configs
      'vanilla': base.model_config(**shape),
      'recursive_3': recursive,
      'mor_expert_2': mor_tiny.mor_model(**shape, num_recursions=2),
      'mor_expert_3': mor_tiny.mor_model(**shape, num_recursions=3),
      'mor_token_3': mor_tiny.mor_model(**shape, **mor_tiny.token_choice(num_recursions=3)),
      'mor_kv_share_3': mor_tiny.mor_model(**shape, num_recursions=3, kv_sharing=True),
  })
  return config
