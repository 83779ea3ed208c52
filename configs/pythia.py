"""Pythia-shaped vanilla baselines (Biderman et al. 2023) for the Block Transformer paper
(arXiv:2406.02657 §3.1), whose vanilla models are Pythia's architecture trained with the
authors' settings (their ``conf/trainer/vanilla_*.yaml``). The config argument picks the size:

  python -m launch.main --config=configs/pythia.py:70m --config.dry_run=True

GPT-NeoX layers (``model.layer_style='gpt_neox'``: parallel residual, LayerNorm eps 1e-5,
biases, rotary on 25% of each head's dims), vocabulary 50304, untied embeddings, 2048-token
sequences, bf16, remat, scanned layers. Parameter counts from the dry run (``embedder``:
token embedding and LM head; everything else is non-embedding, final LayerNorm included):

  | config | layers | d    | heads | mlp  | non-embedding | total       |
  |--------|--------|------|-------|------|---------------|-------------|
  | 70m    | 6      | 512  | 8     | 2048 | 18,915,328    | 70,426,624  |
  | 160m   | 12     | 768  | 12    | 3072 | 85,056,000    | 162,322,944 |
  | 410m   | 24     | 1024 | 16    | 4096 | 302,311,424   | 405,334,016 |

Both columns equal Pythia's published counts (Biderman et al. 2023, model table) exactly.

Real runs point the tokenizer at Pythia's (GPT-NeoX-20B) ``tokenizer.json`` and the data at
files, as ``configs/smollm_135m.py`` describes.
"""
from configs import base

# Pythia's shapes (layers, width, heads, MLP width) and the authors' learning rate per size.
SIZES = {'70m': (6, 512, 8, 2048, 1e-3), '160m': (12, 768, 12, 3072, 6e-4),
         '410m': (24, 1024, 16, 4096, 3e-4)}


def neox_model_config(**overrides):
  """Pythia's shared model choices (module docstring); ``overrides`` set the shape."""
  return base.model_config(
      vocab_size=50304, tie_embeddings=False, layer_style='gpt_neox', rotary_pct=0.25,
      rope_theta=10000.0, norm_eps=1e-5, dtype='bfloat16', remat=True, scan_layers=True,
      **overrides)


def neox_pretraining(config, learning_rate, batch_size=256, steps=572_000, warmup_steps=3000):
  """The authors' optimisation (their yaml): AdamW b2 0.95, weight decay 0.1, 2048-token
  sequences, global batch ``batch_size``; cosine decay to 10% (Pythia's schedule)."""
  config.data.seq_len = 2048
  config.data.batch_size = batch_size
  config.train = base.train_config(
      steps=steps, learning_rate=learning_rate, schedule='cosine', min_lr_ratio=0.1,
      warmup_steps=warmup_steps, weight_decay=0.1, b1=0.9, b2=0.95, grad_accum=0,
      eval_every=10_000, checkpoint_every=10_000)
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config


def get_config(size='70m'):
  if size not in SIZES:
    raise ValueError(f'configs/pythia.py:{size}: the size must be one of {sorted(SIZES)}.')
  num_layers, embed_dim, num_heads, mlp_dim, learning_rate = SIZES[size]
  config = base.base_config()
  config.name = f'pythia_{size}'
  config.model = neox_model_config(embed_dim=embed_dim, num_layers=num_layers,
                                   num_heads=num_heads, num_kv_heads=num_heads, mlp_dim=mlp_dim)
  return neox_pretraining(config, learning_rate)
