"""Shared helpers for tests: tiny configs that compile and run in seconds on a CPU."""
from configs import vanilla_tiny


def tiny_config(**model_overrides):
  """vanilla_tiny shrunk: 2 layers, d=32, GQA, seq 32, batch 8, few pycorpus documents."""
  config = vanilla_tiny.get_config()
  model = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  model.update(model_overrides)
  config.model.update(model)
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.max_docs = 40
  config.data.shuffle_buffer = 16
  config.train.update(dict(steps=4, warmup_steps=1, log_every=1, eval_every=0, eval_batches=2,
                           checkpoint_every=2, async_checkpointing=False, tensorboard=False))
  return config
