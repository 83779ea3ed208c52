"""Throughput of continuous depth-wise batching (arXiv:2410.20672, §3.5, Table K) on this machine.

Three servers in one process, all ``model.engine.DepthwiseEngine`` (greedy): (a) vanilla
with static batching, (b) vanilla with continuous sequence-wise batching, (c) the
recursive B=2 model converted from it (stepwise) with depth-wise batching and confidence
early exit. A queue of requests with fixed-length prompts and output lengths drawn from
a normal distribution; each server at its best slot count among ``--slots`` whose memory
(parameters + KV cache, float32) fits the cap (by default, vanilla's memory at
``--cap_slots`` slots). Weights are random unless ``--source`` names a trained workdir;
with random weights the exit threshold is calibrated to the ``--exit_quantile`` of loop-1
confidences on random tokens (so the exit rate is set, not earned). Run:

  python bench/depthwise_batching.py --out=/tmp/depthwise.json
"""
import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from model import conversion, engine, recursive
from model.layers import ModelConfig
from model.llama import Llama


def memory_bytes(cfg, params, slots, max_len):
  cache = 2 * cfg.num_layers * slots * max_len * cfg.num_kv_heads * cfg.dims_per_head * 4
  return sum(x.size * 4 for x in jax.tree.leaves(params)) + cache


def best(name, cfg, params, requests, slot_options, cap, max_len, **kwargs):
  """Best tokens/s among slot counts under the cap (each compiled by a warm-up run)."""
  results = []
  for slots in slot_options:
    mem = memory_bytes(cfg, params, slots, max_len)
    if mem > cap:
      continue
    eng = engine.DepthwiseEngine(cfg, params, slots, max_len, **kwargs)
    eng.run(requests[:slots])  # Compile.
    _, stats = eng.run(requests)
    results.append(dict(stats, slots=slots, memory_bytes=mem))
    print(f'{name:>28s} slots={slots:3d} {stats["tokens_per_s"]:9.1f} tok/s  '
          f'steps={stats["steps"]} exit_rate={stats["early_exit_rate"]:.2f}', flush=True)
  return max(results, key=lambda r: r['tokens_per_s'])


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--embed_dim', type=int, default=256)
  p.add_argument('--mlp_dim', type=int, default=768)
  p.add_argument('--requests', type=int, default=48)
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--mean_output', type=int, default=32)
  p.add_argument('--slots', default='4,8,16,24,32')
  p.add_argument('--cap_slots', type=int, default=16)
  p.add_argument('--exit_quantile', type=float, default=0.5)
  p.add_argument('--source', default='')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='')
  args = p.parse_args()

  if args.source:
    from training.uptrain import load_source  # pylint: disable=g-import-not-at-top
    vcfg, vparams = load_source(args.source)
  else:
    vcfg = ModelConfig(vocab_size=259, embed_dim=args.embed_dim, num_layers=args.layers,
                       num_heads=4, num_kv_heads=2, mlp_dim=args.mlp_dim)
    vparams = nn.meta.unbox(Llama(vcfg).init(jax.random.PRNGKey(args.seed),
                                             jnp.zeros((1, 4), jnp.int32))['params'])
  rcfg = conversion.recursive_config(vcfg, 2)
  rparams = jax.tree.map(jnp.asarray, conversion.convert_params(vparams, vcfg, rcfg, 'stepwise'))
  rng = np.random.default_rng(args.seed)
  lengths = np.clip(np.round(rng.normal(args.mean_output, args.mean_output / 4,
                                        args.requests)), 1, 2 * args.mean_output).astype(int)
  requests = [engine.Request(rng.integers(1, vcfg.vocab_size, args.prompt_len).tolist(), int(n))
              for n in lengths]
  max_len = args.prompt_len + int(lengths.max())

  tokens = jnp.asarray(rng.integers(1, vcfg.vocab_size, (8, 64)))
  _, aux = recursive.Recursive(rcfg).apply({'params': rparams}, tokens, return_exits=True)
  conf = jnp.max(jax.nn.softmax(aux['exit_logits'][0], axis=-1), axis=-1)
  threshold = float(jnp.quantile(conf, 1 - args.exit_quantile))

  slots = [int(s) for s in args.slots.split(',')]
  cap = memory_bytes(vcfg, vparams, args.cap_slots, max_len)
  a = best('(a) vanilla static', engine.single_loop(vcfg), vparams, requests, slots, cap,
           max_len, static_batching=True)
  b = best('(b) vanilla continuous', engine.single_loop(vcfg), vparams, requests, slots, cap,
           max_len)
  c = best('(c) recursive B=2 depth-wise', rcfg, rparams, requests, slots, cap, max_len,
           exit_threshold=threshold)
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), platform.processor())
  report = {'machine': {'cpu': cpu, 'cores': os.cpu_count(), 'jax': jax.__version__,
                        'backend': jax.default_backend()},
            'args': vars(args), 'memory_cap_bytes': cap, 'exit_threshold': threshold,
            'vanilla_static': a, 'vanilla_continuous': b, 'recursive_depthwise': c,
            'ratio_c_over_a': c['tokens_per_s'] / a['tokens_per_s'],
            'ratio_c_over_b': c['tokens_per_s'] / b['tokens_per_s']}
  print(f"\n(c)/(a) = x{report['ratio_c_over_a']:.2f}   (c)/(b) = x{report['ratio_c_over_b']:.2f}"
        f"   exit rate {c['early_exit_rate']:.2f}   (paper: x2.66, x1.88)   {cpu}, "
        f'{os.cpu_count()} cores')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main()
