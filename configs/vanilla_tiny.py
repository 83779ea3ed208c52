"""Tiny Llama-style model on the embedded `pycorpus` data: the README's demo.

A few minutes on 2 CPU cores; validation loss falls well below the corpus's byte-level
unigram entropy. Run:

  python -m launch.main --config=configs/vanilla_tiny.py --workdir=workdirs/vanilla_tiny
"""
from configs import base


def get_config():
  config = base.base_config()
  config.name = 'vanilla_tiny'
  config.model = base.model_config(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                   mlp_dim=384)
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.train = base.train_config(steps=400, learning_rate=3e-3, warmup_steps=40,
                                   eval_every=100, eval_batches=16, checkpoint_every=100,
                                   report_unigram_entropy=True)
  config.sample.update(dict(prompt='import os\n\ndef ', max_new_tokens=160))
  return config
