"""Uptrain a pretrained vanilla_tiny (4 layers) into a Relaxed Recursive Transformer:
2 shared layers x 2 loops, average init, SVD-initialised LoRA of rank 16, per-loop norms,
distillation from the original model (PAPERS.md §1). Run after vanilla_tiny:

  python -m launch.main --config=configs/vanilla_tiny.py --workdir=workdirs/vanilla_tiny
  python -m launch.main --config=configs/recursive_tiny.py --workdir=workdirs/recursive_tiny \
      --config.uptrain.source=workdirs/vanilla_tiny

A Hugging Face SmolLM directory works as the source too (set config.tokenizer to match).
"""
from ml_collections import config_dict

from configs import base


def recursive_model_config(**overrides):
  """``base.model_config`` plus the recursive family's fields (model.recursive)."""
  cfg = base.model_config(name='recursive', num_loops=2, sharing='cycle', ln_share=False,
                          lora_rank=16, lora_ranks={}, early_exit='none', exit_distill=0.0)
  cfg.update(overrides)
  return cfg


def get_config():
  config = base.base_config()
  config.job = 'uptrain'
  config.name = 'recursive_tiny'
  config.model = recursive_model_config(embed_dim=128, num_layers=4, num_heads=4,
                                        num_kv_heads=2, mlp_dim=384)
  config.uptrain = config_dict.ConfigDict(dict(
      source='workdirs/vanilla_tiny', initialization='average', stepwise='ends', distill=1.0))
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.train = base.train_config(steps=200, learning_rate=1e-3, warmup_steps=20,
                                   eval_every=100, eval_batches=16, checkpoint_every=100,
                                   trainable='')
  return config
