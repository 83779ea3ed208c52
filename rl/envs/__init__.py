"""Environment registry: ``make_env(config)`` builds the env named by ``config.name``."""
from ml_collections import config_dict

from model.config_errors import ConfigError
from rl.envs import arith
from rl.envs import base
from rl.envs import clarify
from rl.envs import collab
from rl.envs import plantain

ENVS = {'arith': arith.ArithEnv, 'clarify': clarify.ClarifyEnv, 'collab': collab.CollabEnv,
        'plantain': plantain.PlantainEnv}


def make_env(env_config: config_dict.ConfigDict) -> base.Env:
  """The registered env ``env_config.name``, built from ``env_config``; a bad field is a
  ``ConfigError`` naming it (``launch.main`` prints it as one line)."""
  name = env_config.get('name')
  if name not in ENVS:
    raise ConfigError(f'config.env.name={name!r} is not a known env ({", ".join(ENVS)}).')
  try:
    return ENVS[name](env_config)
  except ValueError as e:
    raise ConfigError(f'config.env ({name}): {e}') from None
