"""Tiny Block Transformer (arXiv:2406.02657) on the embedded `pycorpus` data.

A block decoder over blocks of 4 bytes and a prefix token decoder (2 prefix vectors), 2
layers each, d=128, trained like `configs/vanilla_tiny.py` with block-aligned packing (every
document starts at a block boundary). Run:

  python -m launch.main --config=configs/block_tiny.py --workdir=workdirs/block_tiny
"""
from configs import base


def get_config():
  config = base.base_config()
  config.name = 'block_tiny'
  config.model = base.model_config(name='block', embed_dim=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, mlp_dim=384)
  config.model.update(dict(block_len=4, block_layers=2, token_layers=2, token_embed_dim=0,
                           token_decoder='prefix', expansion_ratio=2,
                           predict_first_block=True))
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.block_len = 4
  config.train = base.train_config(steps=400, learning_rate=3e-3, warmup_steps=40,
                                   eval_every=100, eval_batches=16, checkpoint_every=100,
                                   report_unigram_entropy=True)
  return config
