"""Single entry point: ``python -m launch.main --config=configs/X.py --workdir=DIR``.

The config's ``job`` field picks what runs; every job is a function
``fn(config, workdir)`` looked up by name in ``JOBS`` (imported lazily, so a job's
dependencies load only when it runs). Overrides use ml_collections syntax, e.g.
``--config.train.steps=100``. A bad config (an unknown field, a value that cannot run)
is reported as one line naming the field, with the nearest valid names, and exit status 1.
"""
import importlib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from model.config_errors import ConfigError, unknown_fields

JOBS = {
    'pretrain': 'training.train:train_and_evaluate',
    'uptrain': 'training.uptrain:uptrain',
    'repro_relaxed_recursive': 'training.repro_recursive:run',
    'repro_mor_isoflop': 'training.repro_mor:run',
    'repro_block': 'training.repro_block:run',
    'ppi_eval': 'stats.jobs:ppi_eval',
    'repro_stratppi': 'stats.repro:stratppi',
    'repro_cost_optimal': 'stats.repro:cost_optimal',
    'rl_sft': 'rl.rest:sft',
    'rl_rest': 'rl.rest:rest',
    'rl_ppo': 'rl.ppo:ppo',
    'repro_clarify': 'rl.repro_clarify:run',
    'repro_collab': 'rl.repro_collab:run',
    'repro_pav_toy': 'rl.repro_pav_toy:run',
    'repro_pessimism': 'rl.repro_pessimism:run',
    'pav_verifier': 'rl.pav:train_verifier',
    'repro_pav_search': 'rl.repro_pav_search:run',
    'repro_pav_rl': 'rl.repro_pav_rl:run',
    'repro_plantain': 'rl.repro_plantain:run',
}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or e.g. gs://) for checkpoints, '
                                'metrics and outputs.')
# Multi-process runs (config.distributed=True). Left unset, JAX detects them on TPU pods and
# SLURM; set them to run several processes on one machine (with
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo on CPUs) or on an unsupported cluster.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')


def get_job(name):
  """Returns the job function registered under ``name``."""
  if name not in JOBS:
    raise ValueError(f'config.job={name!r} is not a known job; choose one of {sorted(JOBS)}.')
  module_name, fn_name = JOBS[name].split(':')
  return getattr(importlib.import_module(module_name), fn_name)


def _fake_cpu_devices(count):
  """Asks XLA for ``count`` CPU devices (a dry run's stand-in for the target mesh).

  Only effective before JAX's backend starts; harmless on GPU/TPU hosts, where the real
  devices are used.
  """
  flag = f'--xla_force_host_platform_device_count={count}'
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


class _QuietLibraries:
  """Drops INFO records from JAX/Orbax/grain internals; ours and all warnings stay."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'jax', 'grain', 'flax'))
    return record.levelno > 20 or not noisy


def _override_error(argv, error):
  """One line for a failed ``--config.a.b=value``: the unknown field and its nearest names."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is not None and os.path.isfile(path.split(':')[0]):
    spec = importlib.util.spec_from_file_location('_user_config', path.split(':')[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
      if not arg.startswith('--config.'):
        continue
      node, where = config, 'config'
      for key in arg[len('--config.'):].split('=', 1)[0].split('.'):
        if not hasattr(node, 'keys') or key not in node:
          known = list(node.keys()) if hasattr(node, 'keys') else []
          return str(unknown_fields(where, [key], known))
        node, where = node[key], f'{where}.{key}'
  return ' '.join(str(error).split())


def parse_flags(argv):
  """absl's flag parsing, with a bad ``--config...`` flag reported as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f'Error: {_override_error(argv, e)}')


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=configs/X.py is required.')
  job = get_job(config.get('job', 'pretrain'))
  workdir = _WORKDIR.value or os.path.join('workdirs', config.get('name', config.get('job', 'run')))
  if config.get('dry_run', False) and config.get('dry_run_devices', 0):
    _fake_cpu_devices(config.dry_run_devices)
  if config.get('distributed', False):
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('job=%s workdir=%s', config.get('job'), workdir)
  try:
    job(config, workdir)
  except ConfigError as e:
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
