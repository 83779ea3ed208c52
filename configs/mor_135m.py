"""MoR-135M (PAPERS.md §2): SmolLM-135M shapes (30 layers, d=576, 9 heads, 3 KV heads,
ffn 1536), N_r=3, expert choice, middle_cycle: 1 + 9 + 1 unique layers
(base_depth = (30 - 2)//3). See mor_360m.py for the recipe and data options:

  python -m launch.main --config=configs/mor_135m.py --config.dry_run=True
"""
from configs import mor_360m


def get_config(data_path=None):
  return mor_360m.mor_smollm_config(
      'mor_135m', dict(num_layers=30, embed_dim=576, num_heads=9, num_kv_heads=3, mlp_dim=1536),
      data_path, num_recursions=3)
