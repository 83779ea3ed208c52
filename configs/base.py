"""Shared defaults for pretraining configs; each experiment file overrides what differs."""
from ml_collections import config_dict

from training import sharding
from training.data import default_data_config
from training.tokenizers import default_tokenizer_config


def model_config(**overrides):
  """Llama-style decoder fields (see ``model.layers.ModelConfig``)."""
  cfg = config_dict.ConfigDict(dict(
      name='llama', vocab_size=259, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=4,
      head_dim=0, mlp_dim=768, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
      scan_layers=False, remat=False, dtype='float32', attention_impl='xla', init_std=0.02))
  cfg.update(overrides)
  return cfg


def train_config(**overrides):
  cfg = config_dict.ConfigDict(dict(
      steps=1000, learning_rate=3e-3, schedule='wsd', warmup_steps=100, decay_fraction=0.2,
      min_lr_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
      grad_accum=1, z_loss=0.0, log_every=10, eval_every=100, eval_batches=8,
      checkpoint_every=200, keep_checkpoints=3, async_checkpointing=True, tensorboard=True,
      report_unigram_entropy=False,
      # The global batch is config.data.batch_size; per step each device runs grad_accum
      # micro-batches of micro_batch_per_device sequences (training.budget.plan_batch).
      # grad_accum > 0 fixes the accumulation, else micro_batch_per_device > 0 the
      # micro-batch, else (both 0) the largest micro-batch that fits in memory is used.
      micro_batch_per_device=0,
      # Per-device memory the compiled step must fit in (0: the device's own limit, host
      # RAM over the CPU devices on CPU); peak FLOP/s per device for MFU (0: known devices).
      memory_limit_bytes=0.0, peak_flops_per_device=0.0))
  cfg.update(overrides)
  return cfg


def base_config():
  """A complete pretraining config; experiment files change fields of it."""
  config = config_dict.ConfigDict()
  config.job = 'pretrain'
  config.name = 'base'
  config.seed = 0
  config.dry_run = False
  config.dry_run_devices = 8
  config.distributed = False
  # Resume even though a guarded field (model, data, tokenizer, optimizer) changed; the
  # change is recorded in the workdir's config.json (training.workdir).
  config.allow_config_change = False
  config.model = model_config()
  config.tokenizer = default_tokenizer_config()
  config.data = default_data_config()
  config.train = train_config()
  # After training, continue a prompt with the trained model (0 tokens: skip).
  config.sample = config_dict.ConfigDict(dict(prompt='def ', max_new_tokens=0, temperature=0.8,
                                              top_k=20, greedy=False))
  config.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = [[name, list(axes) if isinstance(axes, tuple) else axes]
                           for name, axes in sharding.DEFAULT_RULES]
  return config
