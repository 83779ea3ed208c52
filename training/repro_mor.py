"""MoR's isoFLOP comparison (PAPERS.md §2, the paper's Table 3 at 360M) in miniature.

Every variant trains on pycorpus for the same training-FLOP budget (so cheaper models see
more tokens), then reports validation NLL, unique non-embedding parameters and wall time.
FLOPs per token are ``budget.analytic_flops_per_token``, counted as the paper does: 6 x the
weights each token passes through (recursive: every loop; MoR: capacity-weighted recursions,
``MoRConfig.flops_per_token``) plus attention (PaLM App. B), quadratic in capacity for
recursion-wise caching, linear with KV sharing. Token choice is counted with the balanced
depth split (N_r - r)/N_r; our token-choice implementation masks rather than skips inactive
tokens, so its wall time is that of the full recursive model.
"""
import copy
import json
import os
import time

import jax
import jax.numpy as jnp

from model.registry import build_model
from training import budget, train


def train_flops_per_token(model, seq_len):
  """Training FLOPs per token of a built model (see module doc)."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))
  _, non_emb = train.count_params(params['params'])
  return budget.analytic_flops_per_token(model.cfg, non_emb, seq_len)


def run(config, workdir):
  """Trains every model of ``config.variants`` (name -> model config) at ``config.flop_budget``; writes table + PNG."""
  os.makedirs(workdir, exist_ok=True)
  tokens_per_step = config.base.data.batch_size * config.base.data.seq_len
  rows = []
  for name, model_config in config.variants.items():
    run_config = copy.deepcopy(config.base)
    run_config.unlock()
    run_config.model = copy.deepcopy(model_config)
    run_config.name = name
    model = build_model(run_config.model)
    flops = train_flops_per_token(model, run_config.data.seq_len)
    steps = max(1, int(config.flop_budget / (flops * tokens_per_step)))
    run_config.train.update(steps=steps, warmup_steps=max(1, steps // 10), eval_every=steps,
                            checkpoint_every=steps)
    start = time.time()
    result = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    _, unique = train.count_params(result['state']['params'])
    causal = result.get('eval/loss_causal_routing')  # expert choice, routed as decoding
    rows.append({'model': name, 'val_nll': float(result['eval/loss']),
                 'val_nll_causal_routing': '' if causal is None else float(causal),
                 'unique_params_non_embedding': int(unique), 'train_flops_per_token': flops,
                 'steps': steps, 'tokens': steps * tokens_per_step,
                 'train_time_s': round(time.time() - start, 1)})
  _write_table(workdir, rows, config.flop_budget)
  _plot(workdir, rows)
  return rows


def _write_table(workdir, rows, budget):
  columns = ('model', 'val_nll', 'val_nll_causal_routing', 'unique_params_non_embedding',
             'tokens', 'steps', 'train_time_s')
  fmt = lambda x: f'{x:.4f}' if isinstance(x, float) else str(x)
  lines = [f'Training budget {budget:.3g} FLOPs per model.', '',
           '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r[c]) for c in columns) + ' |' for r in rows]
  with open(os.path.join(workdir, 'mor_isoflop.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, 'mor_isoflop.json'), 'w') as f:
    json.dump({'flop_budget': budget, 'rows': rows}, f, indent=1)
  print('\n'.join(lines))


def _plot(workdir, rows):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  names = [r['model'] for r in rows]
  left.bar(names, [r['val_nll'] for r in rows], color='tab:blue')
  left.set_ylim(min(r['val_nll'] for r in rows) * 0.98, max(r['val_nll'] for r in rows) * 1.01)
  left.set_ylabel('validation NLL (nats/token)')
  left.tick_params(axis='x', rotation=30)
  for r in rows:
    right.scatter(r['unique_params_non_embedding'] / 1e6, r['val_nll'])
    right.annotate(r['model'], (r['unique_params_non_embedding'] / 1e6, r['val_nll']),
                   fontsize=8)
  right.set_xlabel('unique non-embedding parameters (M)')
  right.set_ylabel('validation NLL')
  fig.suptitle('MoR isoFLOP comparison (pycorpus, equal training FLOPs)')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'mor_isoflop.png'), dpi=120)
  plt.close(fig)
