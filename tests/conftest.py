"""Test-session setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

# The suite compiles hundreds of tiny programs, so compile time dominates it: the CPU
# backend's LLVM optimisation level 0 compiles them about a quarter faster. XLA's semantics
# are unchanged (the HLO passes still run); production code keeps the default level.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
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
