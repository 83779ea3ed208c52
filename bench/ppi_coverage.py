"""Wall time of a 10,000-trial coverage simulation of `ppi_mean_ci`: ours (one vmapped jit)
vs a Python loop over ppi_py, in the same process, on the same simulated data.

  python bench/ppi_coverage.py --trials=10000 --out=bench_ppi_coverage.json
"""
import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.simplefilter('ignore')

import jax  # noqa: E402
import ppi_py  # noqa: E402

from stats.ppi import ppi_mean_ci  # noqa: E402


def _cpu():
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    model = platform.processor() or 'unknown'
  return model, os.cpu_count()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--trials', type=int, default=10_000)
  parser.add_argument('--n', type=int, default=100)
  parser.add_argument('--N', type=int, default=1000)
  parser.add_argument('--alpha', type=float, default=0.1)
  parser.add_argument('--out', default='bench_ppi_coverage.json')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  Y = 1.0 + rng.normal(size=(args.trials, args.n))
  Yhat = Y + 0.8 * rng.normal(size=Y.shape)
  Yhat_u = 1.0 + np.sqrt(1.64) * rng.normal(size=(args.trials, args.N))

  with jax.enable_x64(True):
    fn = jax.jit(jax.vmap(lambda y, yh, yu: ppi_mean_ci(y, yh, yu, args.alpha)))
    start = time.perf_counter()
    lo, hi = jax.block_until_ready(fn(Y, Yhat, Yhat_u))
    with_compile = time.perf_counter() - start
    start = time.perf_counter()
    lo, hi = jax.block_until_ready(fn(Y, Yhat, Yhat_u))
    ours = time.perf_counter() - start
  ours_coverage = float(np.mean((np.asarray(lo) <= 1.0) & (1.0 <= np.asarray(hi))))

  ppi_py.ppi_mean_ci(Y[0], Yhat[0], Yhat_u[0], alpha=args.alpha)  # warm-up
  start = time.perf_counter()
  ref = np.array([np.ravel(ppi_py.ppi_mean_ci(Y[i], Yhat[i], Yhat_u[i], alpha=args.alpha))
                  for i in range(args.trials)])
  loop = time.perf_counter() - start
  ref_coverage = float(np.mean((ref[:, 0] <= 1.0) & (1.0 <= ref[:, 1])))
  max_diff = float(np.max(np.abs(ref - np.stack([lo, hi], 1))))

  model, cores = _cpu()
  result = {
      'trials': args.trials, 'n': args.n, 'N': args.N, 'cpu': model, 'cores': cores,
      'jax': jax.__version__, 'ours_s': ours, 'ours_with_compile_s': with_compile,
      'ppi_py_loop_s': loop, 'speedup': loop / ours, 'speedup_with_compile': loop / with_compile,
      'coverage_ours': ours_coverage, 'coverage_ppi_py': ref_coverage,
      'max_abs_endpoint_diff': max_diff,
  }
  print(f'{args.trials} trials of ppi_mean_ci (n={args.n}, N={args.N}) on {model}, '
        f'{cores} cores')
  print('| implementation | wall time (s) | speed-up vs ppi_py loop |')
  print('|---|---|---|')
  print(f'| ours, vmapped jit (after compile) | {ours:.3f} | {loop / ours:.1f}x |')
  print(f'| ours, vmapped jit (incl. compile) | {with_compile:.3f} | {loop / with_compile:.1f}x |')
  print(f'| ppi_py, Python loop | {loop:.3f} | 1.0x |')
  print(f'coverage: ours {ours_coverage:.4f}, ppi_py {ref_coverage:.4f}; '
        f'max endpoint difference {max_diff:.2e}')
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
