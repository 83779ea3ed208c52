"""Uptrain a pretrained vanilla_tiny (4 layers, d=128) into a Block Transformer
(arXiv:2406.02657): the authors' ``partition`` split (block decoder <- layers 0-1, token
decoder <- layers 2-3, embedding, LM head and final norm), an identity-initialised prefix
projection (2 prefix vectors), blocks of 4 bytes with block-aligned packing, distillation
from the original model (``training.uptrain``, ``model.block_conversion``). Run after
vanilla_tiny:

  python -m launch.main --config=configs/vanilla_tiny.py --workdir=workdirs/vanilla_tiny
  python -m launch.main --config=configs/block_uptrain_tiny.py \\
      --workdir=workdirs/block_uptrain_tiny --config.uptrain.source=workdirs/vanilla_tiny

The model's shapes come from the source; ``config.model`` sets the block options only.
"""
from ml_collections import config_dict

from configs import base, block_tiny


def get_config():
  config = block_tiny.get_config()  # the block options and block-aligned data
  config.job = 'uptrain'
  config.name = 'block_uptrain_tiny'
  config.model.update(dict(num_layers=4))
  config.uptrain = config_dict.ConfigDict(dict(
      source='workdirs/vanilla_tiny', layer_split='partition', distill=1.0))
  config.train = base.train_config(steps=200, learning_rate=1e-3, warmup_steps=20,
                                   eval_every=100, eval_batches=16, checkpoint_every=100,
                                   report_unigram_entropy=True)
  config.sample.max_new_tokens = 0
  return config
