"""Block Transformer vs vanilla at equal loss (arXiv:2406.02657, Fig. 1 and §3.2) in miniature.

Every model of ``config.variants`` (``llama`` and ``block`` families) trains on
``config.base``'s data for the same steps (so the same tokens) in its own sub-workdir
(``train_and_evaluate`` resumes there; a finished run is only re-evaluated). Then every
trained model's decode throughput is measured side by side with
``bench.block_decode.throughput`` (``config.throughput``: prompt and output lengths, one
memory cap, each model at its largest batch under it). Each family gives a curve of
validation loss against throughput; the throughput ratio at matched loss is each block
model's throughput over the vanilla curve's throughput interpolated at the block model's
loss (``throughput_at_loss``; outside the vanilla curve's loss range there is no match).
Writes ``block_isoloss.{md,json,png}`` into the workdir.
"""
import copy
import json
import math
import os
import time

import jax
import numpy as np

from bench import block_decode
from model.registry import build_model
from training import train


def throughput_at_loss(losses, throughputs, loss):
  """A family's throughput at ``loss``: linear in log throughput between the two models whose
  losses bracket ``loss``; NaN outside ``[min(losses), max(losses)]`` (no extrapolation)."""
  losses, throughputs = np.asarray(losses, float), np.asarray(throughputs, float)
  if losses.ndim != 1 or losses.shape != throughputs.shape or not losses.size:
    raise ValueError(f'losses {losses.shape} and throughputs {throughputs.shape} must be '
                     'non-empty vectors of one length.')
  if np.any(throughputs <= 0):
    raise ValueError(f'throughputs {throughputs.tolist()} must be > 0.')
  order = np.argsort(losses)
  losses, throughputs = losses[order], throughputs[order]
  if not losses[0] <= loss <= losses[-1]:
    return math.nan
  return float(np.exp(np.interp(loss, losses, np.log(throughputs))))


def run(config, workdir):
  """The ``repro_block`` job (module docstring); returns the table's rows."""
  os.makedirs(workdir, exist_ok=True)
  tokens_per_step = config.base.data.batch_size * config.base.data.seq_len
  rows, models = [], {}
  for name, model_config in config.variants.items():
    run_config = copy.deepcopy(config.base)
    run_config.unlock()
    run_config.model = copy.deepcopy(model_config)
    run_config.name = name
    run_config.seed = config.seed
    run_config.sample.max_new_tokens = 0
    # Block models need block-aligned packing; vanilla keeps plain packing.
    run_config.data.block_len = model_config.block_len if model_config.name == 'block' else 0
    start = time.time()
    result = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    total, non_emb = train.count_params(result['state']['params'])
    models[name] = (build_model(run_config.model),
                    jax.device_get(train.model_variables(result['state'])))
    rows.append({'model': name, 'family': model_config.name, 'params': int(total),
                 'params_non_embedding': int(non_emb), 'val_loss': float(result['eval/loss']),
                 'steps': int(result['step']), 'tokens': int(result['step']) * tokens_per_step,
                 'train_time_s': round(time.time() - start, 1)})
  rows.sort(key=lambda r: (r['family'] != 'llama', r['params']))  # ConfigDicts sort their keys.
  t = config.throughput
  measured = block_decode.throughput(models, t.prompt_len, t.new_tokens,
                                     t.cap_mib * block_decode.MIB, t.max_batch, t.rounds)
  for row in rows:
    row.update({k: measured[row['model']][k]
                for k in ('batch', 'cache_bytes_per_sequence', 'memory_bytes', 'tokens_per_s')})
  vanilla = [r for r in rows if r['family'] == 'llama']
  for row in rows:
    if row['family'] == 'block':
      at = throughput_at_loss([r['val_loss'] for r in vanilla],
                              [r['tokens_per_s'] for r in vanilla], row['val_loss'])
      matched = not math.isnan(at)  # None: the block model's loss is off the vanilla curve.
      row.update(vanilla_tokens_per_s_at_loss=at if matched else None,
                 ratio_at_matched_loss=row['tokens_per_s'] / at if matched else None)
  summary = {'seed': config.seed, 'throughput': t.to_dict(), 'machine': block_decode.machine(),
             'rows': rows}
  with open(os.path.join(workdir, 'block_isoloss.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  _write_table(workdir, rows, t)
  _plot(workdir, rows, t)
  return rows


def _write_table(workdir, rows, t):
  columns = {  # heading: (row key, format)
      'model': ('model', '{}'), 'params': ('params', '{:,}'), 'val loss': ('val_loss', '{:.4f}'),
      'train tokens': ('tokens', '{:,}'), 'train s': ('train_time_s', '{:.0f}'),
      'batch': ('batch', '{}'), 'cache KiB / sequence': ('cache_bytes_per_sequence', '{:,.0f}'),
      'tokens/s': ('tokens_per_s', '{:,.0f}'),
      'vanilla tokens/s at this loss': ('vanilla_tokens_per_s_at_loss', '{:,.0f}'),
      'ratio at matched loss': ('ratio_at_matched_loss', '{:.2f}x')}
  cell = lambda r, key, f: '—' if r.get(key) is None else f.format(
      r[key] / 1024 if key == 'cache_bytes_per_sequence' else r[key])
  lines = [f'Decode throughput: prompt {t.prompt_len}, {t.new_tokens} new tokens, greedy; '
           f'memory cap {t.cap_mib:g} MiB (parameters + KV cache), batch <= {t.max_batch}. '
           "Matched loss: the vanilla curve's throughput interpolated (log-linear) at each "
           "block model's validation loss.", '',
           '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r, *spec) for spec in columns.values()) + ' |' for r in rows]
  text = '\n'.join(lines)
  with open(os.path.join(workdir, 'block_isoloss.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


def _plot(workdir, rows, t):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for family, label in (('llama', 'vanilla'), ('block', 'Block Transformer (L_B=4)')):
    fam = sorted((r for r in rows if r['family'] == family), key=lambda r: r['tokens_per_s'])
    ax.plot([r['tokens_per_s'] for r in fam], [r['val_loss'] for r in fam], 'o-', label=label)
    for r in fam:
      ax.annotate(f"{r['params'] / 1e6:.2f}M, b={r['batch']}", (r['tokens_per_s'], r['val_loss']),
                  textcoords='offset points', xytext=(4, 4), fontsize=7)
  ax.set_xscale('log')
  ax.set_xlabel(f'decode throughput (tokens/s; prompt {t.prompt_len}, output {t.new_tokens}, '
                f'cap {t.cap_mib:g} MiB)')
  ax.set_ylabel('validation loss (nats/byte)')
  ax.set_title('Loss vs decode throughput (pycorpus, equal training tokens)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'block_isoloss.png'), dpi=120)
  plt.close(fig)
