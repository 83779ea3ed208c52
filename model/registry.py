"""Model families looked up by ``config.model.name``.

A family is a Linen module class with a ``cfg`` field and a config dataclass with
``from_config``; registering a new one is one entry here.
"""
from model import block_transformer, layers, llama, mor, recursive

FAMILIES = {
    'block': (block_transformer.BlockTransformer, block_transformer.BlockConfig),
    'llama': (llama.Llama, layers.ModelConfig),
    'mor': (mor.MoR, mor.MoRConfig),
    'recursive': (recursive.Recursive, recursive.RecursiveConfig),
}


def build_model(model_config):
  """Returns the Linen module for ``model_config`` (a ConfigDict with a ``name`` field)."""
  name = model_config.get('name', 'llama')
  if name not in FAMILIES:
    raise ValueError(f'config.model.name={name!r} is not a registered model family; '
                     f'choose one of {sorted(FAMILIES)}.')
  module_cls, config_cls = FAMILIES[name]
  return module_cls(config_cls.from_config(model_config))
