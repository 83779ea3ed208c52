"""Test-session setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import subprocess
import sys


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows ``flag`` (an unknown XLA flag aborts the process)."""
  probe = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flag))
  return probe.returncode == 0


def _with_flags(flags: str, *extra: str) -> str:
  """``flags`` then each of ``extra`` not already in it (XLA takes a repeated flag's last)."""
  return ' '.join([flags, *(f for f in extra if f not in flags.split())]).strip()


# The suite compiles hundreds of tiny programs, so compile time dominates it. Two CPU-backend
# options that leave XLA's semantics unchanged (the HLO passes still run) compile them faster:
# LLVM optimisation level 0 (about a quarter), and the elemental emitters instead of the MLIR
# fusion emitters (the whole suite, cold cache, 2 cores: 12.5 -> 7.4 min). Production code
# keeps XLA's defaults. Subprocesses (launch.main, notebooks) inherit the flags; xdist workers
# inherit them from the controller, which probed the fusion-emitter flag (it is new in XLA).
_FUSION_EMITTERS = '--xla_cpu_use_fusion_emitters=false'
_flags = _with_flags(os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
                     '--xla_backend_optimization_level=0')
if _FUSION_EMITTERS.split('=')[0] not in _flags and _xla_accepts(_FUSION_EMITTERS):
  _flags = _with_flags(_flags, _FUSION_EMITTERS)
os.environ['XLA_FLAGS'] = _flags
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# absltest helpers (create_tempdir, ...) read absl flags, which pytest never parses.
from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()

# Persistent compilation cache: identical programs (the same tiny model trained by several
# tests, launch.main subprocesses) compile once per run instead of once per test. Every
# program is cached, however quick its compile: the suite compiles thousands of small ones,
# and caching them all took 12% off the CPU time of test_mor + test_train (one run each).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), '.pytest_cache',
                                   'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
