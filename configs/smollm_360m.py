"""SmolLM-360M shapes (PAPERS.md §2): 32 layers, d=960, 15 heads, 5 KV heads, ffn 2560.

  python -m launch.main --config=configs/smollm_360m.py --config.dry_run=True

prints about 362M parameters (315M without the tied embedding). See smollm_135m.py for
pointing a real run at a tokenizer and data files.
"""
from configs.smollm_135m import smollm_config


def get_config():
  return smollm_config('smollm_360m', num_layers=32, embed_dim=960, num_heads=15, num_kv_heads=5,
                       mlp_dim=2560)
