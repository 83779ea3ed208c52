"""SmolLM-135M shapes (Llama architecture; PAPERS.md §2): 30 layers, d=576, 9 heads, 3 KV heads.

Check the parameter count, FLOPs per token and per-device memory without training:

  python -m launch.main --config=configs/smollm_135m.py --config.dry_run=True

Real runs point the tokenizer at SmolLM's ``tokenizer.json`` and the data at files:
  --config.tokenizer.kind=huggingface --config.tokenizer.path=DIR/tokenizer.json
  --config.data.source=arrayrecord --config.data.paths='DATA/*.array_record'
"""
from configs import base


def smollm_config(name, num_layers, embed_dim, num_heads, num_kv_heads, mlp_dim):
  """A SmolLM-shaped pretraining config (vocab 49152, tied embeddings, bf16, scanned and
  rematerialised layers)."""
  config = base.base_config()
  config.name = name
  config.model = base.model_config(
      vocab_size=49152, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads, mlp_dim=mlp_dim, rope_theta=10000.0, tie_embeddings=True,
      scan_layers=True, remat=True, dtype='bfloat16')
  config.data.seq_len = 2048
  config.data.batch_size = 256
  # The global batch holds on any device count: micro-batch and accumulation are derived
  # from the devices and their memory (training.budget).
  config.train = base.train_config(steps=20000, learning_rate=3e-3, warmup_steps=1000,
                                   grad_accum=0, micro_batch_per_device=0, eval_every=1000,
                                   checkpoint_every=1000)
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config


def get_config():
  return smollm_config('smollm_135m', num_layers=30, embed_dim=576, num_heads=9, num_kv_heads=3,
                       mlp_dim=1536)
