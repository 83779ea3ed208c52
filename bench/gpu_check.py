"""Summarises the runs of ``bench/gpu_check.sh``: per workdir, tokens/s, step time and MFU
(medians over the logged windows after the first, which holds the first step's warm-up),
the device's peak memory in use, the batch plan and the memory estimate; then MoR's time per
token against the vanilla model's (the first run is the baseline). Writes gpu_check.json
and gpu_check.md under --out.

  python bench/gpu_check.py --out=gpu_check gpu_check/smollm_360m gpu_check/mor_360m
"""
import json
import os
import statistics

from absl import app, flags

_OUT = flags.DEFINE_string('out', 'gpu_check', 'Directory for gpu_check.json / .md.')
# Targets (docs/BENCHMARKS.md): MFU of the vanilla 360M model on an H100, and MoR-360M's time
# per token relative to it (the MoR paper: fewer FLOPs and less wall time at equal budget).
MFU_TARGET, TIME_RATIO_TARGET = 0.45, 0.8


def summarise(workdir):
  """One run's numbers from its metrics.jsonl and summary.json."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if 'train/tokens_per_s' in line]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  timed = records[1:] or records  # the first window includes the first step's warm-up
  median = lambda key: (statistics.median(r[key] for r in timed)
                        if timed and all(key in r for r in timed) else None)
  peaks = [r['train/peak_bytes_in_use'] for r in records if 'train/peak_bytes_in_use' in r]
  return {'run': os.path.basename(os.path.normpath(workdir)), 'steps': summary['step'],
          'tokens_per_s': median('train/tokens_per_s'),
          'step_time_s': median('train/step_time_s'), 'mfu': median('train/mfu'),
          'peak_bytes_in_use': max(peaks) if peaks else None,
          'final_loss': records[-1].get('train/loss') if records else None,
          **{k: summary['plan'][k] for k in ('micro_batch_per_device', 'accum',
                                               'estimate_bytes', 'limit_bytes')}}


def _fmt(value, spec, suffix=''):
  return 'n/a' if value is None else format(value, spec) + suffix


def main(argv):
  import jax  # pylint: disable=g-import-not-at-top  # after the runs: the device is free
  device = jax.devices()[0]
  runs = [summarise(w) for w in argv[1:]]
  base = runs[0]
  for run in runs[1:]:
    run['time_per_token_vs_' + base['run']] = base['tokens_per_s'] / run['tokens_per_s']
  result = {'device_kind': device.device_kind, 'platform': device.platform,
            'devices': jax.device_count(), 'jax': jax.__version__, 'runs': runs,
            'targets': {'mfu_vanilla': MFU_TARGET, 'mor_time_per_token_ratio': TIME_RATIO_TARGET}}
  lines = [f'Device: {device.device_kind} x {jax.device_count()} (JAX {jax.__version__})', '',
           '| run | micro-batch x accum | step (s) | tokens/s | MFU | peak memory (GiB) | '
           'estimate (GiB) | time/token vs first |', '|---|---|---|---|---|---|---|---|']
  for run in runs:
    ratio = run.get('time_per_token_vs_' + base['run'], 1.0)
    gib = lambda b: None if b is None else b / 2**30
    lines.append(
        f"| {run['run']} | {run['micro_batch_per_device']} x {run['accum']} | "
        f"{_fmt(run['step_time_s'], '.3f')} | {_fmt(run['tokens_per_s'], ',.0f')} | "
        f"{_fmt(run['mfu'] and 100 * run['mfu'], '.1f', '%')} | "
        f"{_fmt(gib(run['peak_bytes_in_use']), '.1f')} | {_fmt(gib(run['estimate_bytes']), '.1f')}"
        f" | {ratio:.2f} |")
  lines += ['', f'Targets: MFU >= {MFU_TARGET:.0%} for {base["run"]} on an H100; time per '
            f'token of the MoR run <= {TIME_RATIO_TARGET}x {base["run"]}\'s.']
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'gpu_check.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(_OUT.value, 'gpu_check.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
