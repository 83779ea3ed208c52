"""MoR throughput on this machine, side by side in one process (PAPERS.md §2).

(1) Training: step time per token of vanilla (U unique layers), a recursive model and MoR
(expert choice) with the same U = 1 + base_depth + 1 unique layers, N_r = 3 (``middle_cycle``).
(2) Inference, the paper's comparison: MoR N_r = 2, 3, 4 (expert choice, ``middle_cycle`` on
the same L) and MoR-3 with KV sharing served by ``model.mor_engine.MoREngine`` (continuous
depth-wise batching, causal routing) against vanilla (L layers) served by
``model.engine.DepthwiseEngine`` with one loop (continuous sequence-wise batching), at a fixed
batch (slots) and at each model's largest slot count whose parameters + KV cache (float32)
fit one memory cap (vanilla's at ``--cap_slots``). Every model is first trained for
``--train_steps`` on pycorpus (mor_tiny's recipe) so that its routers' depths are learned,
not set (trained models are reused from ``--workdir``). Requests: pycorpus prompts of
``--prompt_len`` bytes, output lengths ~ N(mean, mean/4), no stop tokens; greedy. MoR
engines run with ``exit_lanes`` = each of ``--lane_fractions`` of the slots (the fastest is
kept; 3/4 by default: with mean depths of 1.3-2 recursions, about 1/2-3/4 of the slots leave
per step). Every
timed entry (training step or full serving run) is compiled first, then timed in
``--rounds`` interleaved rounds, keeping each entry's best (this machine's speed drifts). Run:

  python bench/mor_throughput.py --out=/tmp/mor_throughput.json
"""
import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from configs import base, mor_tiny
from model import engine, mor_engine
from model.registry import build_model
from training import data as data_lib
from training import optim, train, trainer


def _model_config(name, shape, **kw):
  cfg = mor_tiny.mor_model(**shape, **kw) if name == 'mor' else base.model_config(**shape)
  if name == 'recursive':
    cfg.update(dict(name='recursive', num_loops=kw['num_loops'], sharing='middle_cycle'))
  return cfg


def best_of_rounds(runs, rounds):
  """{name: best seconds} of ``runs`` ({name: fn}), each compiled first, then timed in
  ``rounds`` interleaved rounds (so slow phases of a shared machine hit every entry)."""
  for fn in runs.values():
    jax.block_until_ready(fn())
  best = {}
  for _ in range(rounds):
    for name, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best.get(name, np.inf), time.perf_counter() - start)
  return best


def train_step_fn(model, batch, seq_len, steps=3):
  """A function running ``steps`` jit-compiled training steps (AdamW, single device)."""
  tcfg = base.train_config(steps=100, warmup_steps=1)
  tx, schedule = optim.make_optimizer(tcfg)
  state = jax.jit(lambda r: jax.tree.map(
      lambda x: x.unbox() if hasattr(x, 'unbox') else x,
      trainer.make_init_fn(model, tx, seq_len)(r),
      is_leaf=lambda x: hasattr(x, 'unbox')))(jax.random.PRNGKey(0))
  step = jax.jit(trainer.make_train_step(model, tx, schedule, tcfg))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, 259)
  data = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)),
          'segment_ids': jnp.ones((batch, seq_len), jnp.int32),
          'loss_mask': jnp.ones((batch, seq_len), jnp.int32)}
  return lambda: [step(state, data)[1]['train/loss'] for _ in range(steps)]


def trained(name, model_config, steps, workdir):
  """Variables of ``model_config`` after ``steps`` of mor_tiny's recipe (resumed if there)."""
  config = mor_tiny.get_config()
  config.model = model_config
  config.train.update(steps=steps, warmup_steps=max(1, steps // 10), eval_every=steps,
                      eval_batches=2, checkpoint_every=steps, async_checkpointing=False,
                      tensorboard=False, report_unigram_entropy=False)
  config.sample.max_new_tokens = 0
  state = train.train_and_evaluate(config, os.path.join(workdir, name))['state']
  return jax.device_get(train.model_variables(state))


def memory_bytes(model, variables, slots, max_len):
  cache = jax.eval_shape(lambda: model.init_cache(slots, max_len))
  return 4 * (sum(x.size for x in jax.tree.leaves(variables)) +
              sum(x.size for x in jax.tree.leaves(cache)))


class Served:
  """An engine compiled by a warm-up run; calling it serves all requests and keeps stats."""

  def __init__(self, eng, requests):
    self.eng, self.requests, self.stats = eng, requests, None
    eng.run(requests[:eng.num_slots])

  def __call__(self):
    _, stats = self.eng.run(self.requests)
    if self.stats is None or stats['tokens_per_s'] > self.stats['tokens_per_s']:
      self.stats = stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--embed_dim', type=int, default=128)
  parser.add_argument('--num_layers', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--train_batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--lane_fractions', default='0.75')
  parser.add_argument('--train_steps', type=int, default=120)
  parser.add_argument('--workdir', default='/tmp/mor_throughput')
  parser.add_argument('--requests', type=int, default=160)
  parser.add_argument('--prompt_len', type=int, default=32)
  parser.add_argument('--mean_output', type=int, default=64)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--cap_slots', type=int, default=32)
  parser.add_argument('--slots', default='8,16,24,32,40,48,64,80,96')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  shape = dict(embed_dim=args.embed_dim, num_heads=4, num_kv_heads=2,
               mlp_dim=3 * args.embed_dim)
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), platform.processor())
  result = {'machine': {'cpu': cpu, 'cores': os.cpu_count(), 'jax': jax.__version__,
                        'backend': jax.default_backend()},
            'args': vars(args), 'train': [], 'decode': []}

  # (1) Training at equal unique parameters: U = 1 + base_depth + 1 unique layers.
  unique = 2 + (args.num_layers - 2) // 3
  train_models = {
      f'vanilla_L{unique}': _model_config('llama', dict(shape, num_layers=unique)),
      'recursive_3': _model_config('recursive', dict(shape, num_layers=args.num_layers),
                                   num_loops=3),
      'mor_expert_3': _model_config('mor', dict(shape, num_layers=args.num_layers),
                                    num_recursions=3),
  }
  steps = 3
  seconds = best_of_rounds({name: train_step_fn(build_model(c), args.train_batch, args.seq_len,
                                                steps)
                            for name, c in train_models.items()}, args.rounds)
  for name, s in seconds.items():
    us = s / (steps * args.train_batch * args.seq_len) * 1e6
    result['train'].append({'model': name, 'us_per_token': us})
    print(f'train {name:>14}: {us:8.2f} us/token', flush=True)

  # (2) Serving: vanilla L (continuous sequence-wise) vs MoR-N_r (continuous depth-wise).
  layers = dict(shape, num_layers=args.num_layers)
  serve_models = {f'vanilla_L{args.num_layers}': _model_config('llama', layers)}
  for n in (2, 3, 4):
    serve_models[f'mor_expert_{n}'] = _model_config('mor', layers, num_recursions=n)
  serve_models['mor_kv_share_3'] = _model_config('mor', layers, num_recursions=3,
                                                 kv_sharing=True)
  rng = np.random.default_rng(0)
  corpus = ''.join(t for _, t in zip(range(50), data_lib.document_texts(
      mor_tiny.get_config().data, 'validation'))).encode()
  starts = rng.integers(0, len(corpus) - args.prompt_len, args.requests)
  lengths = np.clip(np.round(rng.normal(args.mean_output, args.mean_output / 4,
                                        args.requests)), 1, 2 * args.mean_output).astype(int)
  requests = [engine.Request([b + 3 for b in corpus[s:s + args.prompt_len]], int(n))
              for s, n in zip(starts, lengths)]
  max_len = args.prompt_len + int(lengths.max())
  slot_options = [int(s) for s in args.slots.split(',')]
  cap, runs, rows = None, {}, []
  for name, model_config in serve_models.items():
    model = build_model(model_config)
    variables = trained(name, model_config, args.train_steps, args.workdir)
    cap = cap or memory_bytes(model, variables, args.cap_slots, max_len)
    max_slots = max(s for s in slot_options if memory_bytes(model, variables, s, max_len) <= cap)
    rows.append({'model': name,
                 'params': sum(x.size for x in jax.tree.leaves(variables['params']))})
    for key, slots in (('fixed', args.batch), ('max', max_slots)):
      rows[-1][key] = {'slots': slots,
                       'memory_bytes': memory_bytes(model, variables, slots, max_len)}
      if name.startswith('vanilla'):
        runs[name, key, None] = Served(engine.DepthwiseEngine(
            engine.single_loop(model.cfg), variables['params'], slots, max_len), requests)
      else:
        fractions = [float(f) for f in args.lane_fractions.split(',')]
        for lanes in sorted({math.ceil(slots * f) for f in fractions}):
          runs[name, key, lanes] = Served(mor_engine.MoREngine(
              model.cfg, variables, slots, max_len, exit_lanes=lanes), requests)
  best_of_rounds(runs, args.rounds)
  for row in rows:
    for key in ('fixed', 'max'):
      (_, _, lanes), run = max(((k, r) for k, r in runs.items() if k[:2] == (row['model'], key)),
                               key=lambda kr: kr[1].stats['tokens_per_s'])
      row[key].update(run.stats, exit_lanes=lanes)
      print(f"serve {row['model']:>14} {key:>5}: slots {row[key]['slots']:3d} lanes {lanes} "
            f"{row[key]['tokens_per_s']:9.1f} tok/s, exits per depth "
            f"{row[key]['exits_per_depth']}", flush=True)
  result['decode'] = rows
  base_row = result['decode'][0]
  for row in result['decode']:
    for key in ('fixed', 'max'):
      row[key]['speedup'] = row[key]['tokens_per_s'] / base_row[key]['tokens_per_s']
    print(f"{row['model']:>14}: x{row['fixed']['speedup']:.2f} at {args.batch} slots, "
          f"x{row['max']['speedup']:.2f} at {row['max']['slots']} slots (max under the cap)")
  result['memory_cap_bytes'] = cap
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
