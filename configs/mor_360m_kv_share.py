"""MoR-360M (expert choice, N_r=3) with recursive KV sharing: every recursion reuses the keys
and values of recursion 1 (PAPERS.md §2). See mor_360m.py for data and commands:

  python -m launch.main --config=configs/mor_360m_kv_share.py --config.dry_run=True
"""
from configs import mor_360m


def get_config(data_path=None):
  return mor_360m.mor_smollm_config('mor_360m_kv_share', mor_360m.SHAPES_360M, data_path,
                                    num_recursions=3, kv_sharing=True)
