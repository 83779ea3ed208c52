"""Relaxed Recursive Transformers in miniature (training/repro_recursive.py): a 6-layer
vanilla on pycorpus -> 3 layers x 2 loops (each init), relaxed ranks, 3-layer scratch,
early-exit post-training. About 15 minutes on 2 CPU cores. Run:

  python -m launch.main --config=configs/repro/relaxed_recursive.py \
      --workdir=workdirs/repro_relaxed_recursive
"""
from ml_collections import config_dict

from configs import base


def get_config():
  config = base.base_config()
  config.job = 'repro_relaxed_recursive'
  config.name = 'repro_relaxed_recursive'
  config.model = base.model_config(embed_dim=64, num_layers=6, num_heads=4, num_kv_heads=2,
                                   mlp_dim=192)
  config.data.seq_len = 64
  config.data.batch_size = 16
  config.train = base.train_config(steps=300, learning_rate=3e-3, warmup_steps=20,
                                   eval_every=100000, eval_batches=8, checkpoint_every=100000,
                                   tensorboard=False, trainable='')
  config.repro = config_dict.ConfigDict(dict(
      layers=6, pretrain_steps=300, uptrain_steps=100, post_steps=50,
      post_learning_rate=3e-4,  # Post-training fine-tunes a trained model: 10x lower lr.
      initializations=('stepwise', 'average', 'lower', 'upper', 'random'), lora_ranks=(4, 16)))
  return config
