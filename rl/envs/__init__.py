"""Environment registry: ``make_env(config)`` builds the env named by ``config.name``."""
from ml_collections import config_dict

from rl.envs import base
from rl.envs import clarify

ENVS = {'clarify': clarify.ClarifyEnv}


def make_env(env_config: config_dict.ConfigDict) -> base.Env:
  """The registered env ``env_config.name``, built from ``env_config``."""
  name = env_config.get('name')
  if name not in ENVS:
    raise ValueError(f'env_config.name={name!r} is not a known env ({", ".join(ENVS)}).')
  return ENVS[name](env_config)
