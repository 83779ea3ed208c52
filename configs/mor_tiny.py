"""Tiny Mixture-of-Recursions model (expert choice, N_r=3, middle_cycle) on `pycorpus`.

The MoR demo: 1 + 2 + 1 unique layers (the shared pair applied up to 3 times per token),
trained with vanilla_tiny's recipe (a few minutes on 2 CPU cores; the README's demo). Run:

  python -m launch.main --config=configs/mor_tiny.py --workdir=workdirs/mor_tiny

Variants by override: ``--config.model.router=token_choice --config.model.router_func=softmax
--config.model.alpha=1.0`` (token choice), ``--config.model.kv_sharing=True``.
"""
import dataclasses

from configs import base, vanilla_tiny
from model import layers, mor


def mor_model(**overrides):
  """Model fields for name='mor': base.model_config's plus every MoR option at its default."""
  llama_fields = {f.name for f in dataclasses.fields(layers.ModelConfig)}
  options = {f.name: f.default for f in dataclasses.fields(mor.MoRConfig)
             if f.name not in llama_fields}
  return base.model_config(**{**options, **overrides, 'name': 'mor'})


def token_choice(**overrides):
  """The paper's token-choice setting: softmax router, alpha 1, balancing loss, z-loss."""
  return dict(router='token_choice', router_func='softmax', alpha=1.0, z_loss=True,
              **overrides)


def get_config():
  """vanilla_tiny's data, schedule, evaluation and sampling with a MoR model (L=8 unrolled)."""
  config = vanilla_tiny.get_config()
  config.name = 'mor_tiny'
  config.model = mor_model(embed_dim=128, num_layers=8, num_heads=4, num_kv_heads=2,
                           mlp_dim=384, num_recursions=3)
  return config
