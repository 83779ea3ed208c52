"""MoR-360M (PAPERS.md §2): SmolLM-360M shapes, N_r=3, expert choice, middle_cycle.

1 + 10 + 1 unique layers: about 118M non-embedding parameters (the paper's 118M). Recipe:
AdamW (0.9, 0.95), weight decay 0.1, lr 3e-3 warmup-stable-decay (last 20% decay), batch
1024 sequences of 2048 tokens (micro-batch and accumulation derived from the devices and
their memory), bf16, remat. Check it without training:

  python -m launch.main --config=configs/mor_360m.py --config.dry_run=True

Train on your own ArrayRecord or Parquet files (a `text` column; chosen by the glob's
extension; pycorpus when no path is given):

  python -m launch.main --config=configs/mor_360m.py:'DATA/*.array_record' --workdir=DIR \
      --config.tokenizer.kind=huggingface --config.tokenizer.path=SMOLLM/tokenizer.json
  python -m launch.main --config=configs/mor_360m.py:'DATA/*.parquet' --workdir=DIR ...

Variants: configs/mor_360m_token_choice.py, configs/mor_360m_kv_share.py, or e.g.
``--config.model.num_recursions=2`` (MoR-2, 1 + 15 + 1 layers).
"""
from configs import mor_tiny
from configs.smollm_135m import smollm_config


def mor_smollm_config(name, shapes, data_path=None, **mor_options):
  """A SmolLM-shaped MoR pretraining config with the MoR paper's recipe."""
  config = smollm_config(name, **shapes)
  config.model = mor_tiny.mor_model(**{**config.model.to_dict(), **mor_options})
  config.data.batch_size = 1024
  if data_path:
    config.data.source = 'parquet' if data_path.endswith('.parquet') else 'arrayrecord'
    config.data.paths = data_path
  # About 16.5e18 FLOPs for the 360M vanilla baseline: ~7.5B tokens, 3600 steps of 2M tokens.
  config.train.update(steps=3600, warmup_steps=360, learning_rate=3e-3,
                      schedule='wsd', decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95)
  return config


SHAPES_360M = dict(num_layers=32, embed_dim=960, num_heads=15, num_kv_heads=5, mlp_dim=2560)


def get_config(data_path=None):
  return mor_smollm_config('mor_360m', SHAPES_360M, data_path, num_recursions=3)
