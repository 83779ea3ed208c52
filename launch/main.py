"""Single entry point: ``python -m launch.main --config=configs/X.py --workdir=DIR``.

The config's ``job`` field picks what runs; every job is a function
``fn(config, workdir)`` looked up by name in ``JOBS`` (imported lazily, so a job's
dependencies load only when it runs). Overrides use ml_collections syntax, e.g.
``--config.train.steps=100``; an unknown field is rejected by ``config_flags``.
"""
import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

JOBS = {
    'pretrain': 'training.train:train_and_evaluate',
    'ppi_eval': 'stats.jobs:ppi_eval',
    'repro_stratppi': 'stats.repro:stratppi',
    'repro_cost_optimal': 'stats.repro:cost_optimal',
}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')


def get_job(name):
  """Returns the job function registered under ``name``."""
  if name not in JOBS:
    raise ValueError(f'config.job={name!r} is not a known job; choose one of {sorted(JOBS)}.')
  module_name, fn_name = JOBS[name].split(':')
  return getattr(importlib.import_module(module_name), fn_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=configs/X.py is required.')
  job = get_job(config.get('job', 'pretrain'))
  workdir = _WORKDIR.value or os.path.join('workdirs', config.get('name', config.get('job', 'run')))
  if config.get('distributed', False):
    import jax
    jax.distributed.initialize()
  logging.info('job=%s workdir=%s', config.get('job'), workdir)
  job(config, workdir)


if __name__ == '__main__':
  app.run(main)
