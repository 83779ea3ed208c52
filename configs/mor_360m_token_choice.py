"""MoR-360M with the token-choice router (softmax over N_r=3 depths, alpha 1, balancing loss
0.1, z-loss 1e-3; PAPERS.md §2). See mor_360m.py for data and commands:

  python -m launch.main --config=configs/mor_360m_token_choice.py --config.dry_run=True
"""
from configs import mor_360m, mor_tiny


def get_config(data_path=None):
  return mor_360m.mor_smollm_config('mor_360m_token_choice', mor_360m.SHAPES_360M, data_path,
                                    num_recursions=3, **mor_tiny.token_choice())
