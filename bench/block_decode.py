"""Block Transformer vs vanilla decode throughput at a memory cap (arXiv:2406.02657, §3.3).

The paper's two batch-inference settings, scaled to a CPU by default: prefill-heavy (long
prompt, short output; paper 2048/128, here 512/32) and decode-heavy (short prompt, long
output; paper 128/2048, here 32/512). Random weights and prompts, greedy, no stop tokens,
``model.decode.generate`` (batched prefill, then one cached step per token). Each model runs
at the largest batch whose bytes (parameters + the KV cache of ``init_cache(batch,
prompt + output)``, from ``jax.eval_shape``) fit one memory cap, found by binary search up to
``--max_batch`` (the paper: the largest batch that fits the GPU). The block model's cache
is about L_B times shorter in its block decoder and a few slots long in its token decoder,
so it fits a larger batch.

Models (same width, heads and MLP; ``--num_layers`` = L):
  * ``vanilla``: the ``llama`` family, L layers;
  * ``block_equal``: block decoder L/2 + prefix token decoder L/2 layers (about vanilla's
    parameters);
  * ``block``: L + L layers (about twice vanilla's parameters: the paper's block models need
    2-3x a vanilla model's parameters for its perplexity, and its block and token decoders
    share the parameters equally).
Every model is compiled first, then the models are timed in ``--rounds`` interleaved rounds
per setting (best kept), so all see the same machine load. tokens/s = batch x output tokens
/ the whole call's time (prefill included). Prints the machine and a markdown table; ratios
are against ``vanilla`` in the same run. CPU default, and the paper-scale GPU run:

  python bench/block_decode.py --out=/tmp/block_decode.json
  python bench/block_decode.py --embed_dim=1024 --num_layers=24 --num_heads=16 \\
      --num_kv_heads=16 --vocab_size=50304 --dtype=bfloat16 --cap_mib=70000 \\
      --max_batch=4096 --settings=prefill_heavy=2048/128,decode_heavy=128/2048
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

from bench.mor_throughput import best_of_rounds
from configs import base
from model import decode
from model.registry import build_model

GREEDY = decode.SamplingConfig(greedy=True)
MIB = 2**20


def tree_bytes(tree):
  """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_bytes(model, batch, max_len):
  """Bytes of ``model.init_cache(batch, max_len)``, from its abstract shapes (no allocation)."""
  return tree_bytes(jax.eval_shape(lambda: model.init_cache(batch, max_len)))


def cache_bytes_per_sequence(model, max_len):
  """Cache bytes one more row of ``max_len`` token slots adds (caches are affine in batch)."""
  return cache_bytes(model, 2, max_len) - cache_bytes(model, 1, max_len)


def memory_bytes(model, params, batch, max_len):
  """Bytes of ``params`` plus the KV cache of ``batch`` rows of ``max_len`` token slots."""
  return tree_bytes(params) + cache_bytes(model, batch, max_len)


def max_batch_under_cap(bytes_of_batch, cap, max_batch):
  """Largest batch in [1, max_batch] with ``bytes_of_batch(batch) <= cap`` (binary search;
  ``bytes_of_batch`` must be non-decreasing). Raises ValueError if batch 1 does not fit."""
  if max_batch < 1:
    raise ValueError(f'max_batch={max_batch} must be >= 1.')
  if bytes_of_batch(1) > cap:
    raise ValueError(f'cap={cap} bytes is below the {bytes_of_batch(1)} bytes of batch 1.')
  lo, hi = 1, max_batch  # bytes_of_batch(lo) <= cap; the answer lies in [lo, hi].
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if bytes_of_batch(mid) <= cap:
      lo = mid
    else:
      hi = mid - 1
  return lo


def bench_models(embed_dim, num_layers, num_heads, num_kv_heads, mlp_dim, vocab_size, dtype,
                 block_len, expansion_ratio):
  """{name: model ConfigDict} of the three benchmarked models (module docstring)."""
  shape = dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
               mlp_dim=mlp_dim, vocab_size=vocab_size, dtype=dtype)
  models = {'vanilla': base.model_config(**shape, num_layers=num_layers)}
  for name, depth in (('block_equal', max(1, num_layers // 2)), ('block', num_layers)):
    models[name] = base.model_config(name='block', **shape, num_layers=depth)
    models[name].update(dict(block_len=block_len, block_layers=depth, token_layers=depth,
                             token_decoder='prefix', expansion_ratio=expansion_ratio,
                             predict_first_block=True))
  return models


def init_variables(model, block_len, seed=0):
  """Randomly initialised variables of ``model`` (unboxed); ``block_len`` tokens trace it."""
  tokens = jnp.zeros((1, block_len), jnp.int32)
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens))


def throughput(models, prompt_len, new_tokens, cap, max_batch, rounds, seed=0):
  """Greedy decode throughput of each model at its largest batch under ``cap`` bytes.

  Args:
    models: {name: (model, variables)}; variables as ``model.decode.generate`` takes them.
    prompt_len, new_tokens: prompt and output tokens per row (no stop tokens).
    cap: memory cap in bytes (parameters + KV cache).
    max_batch: the largest batch tried.
    rounds: interleaved timing rounds (best kept), after one compiling call per model.
    seed: seed of the random prompts.

  Returns:
    {name: {'batch', 'memory_bytes', 'cache_bytes_per_sequence', 'params', 'seconds',
    'tokens_per_s'}}.
  """
  max_len = prompt_len + new_tokens
  runs, rows = {}, {}
  for name, (model, variables) in models.items():
    try:
      batch = max_batch_under_cap(lambda b: memory_bytes(model, variables, b, max_len), cap,
                                  max_batch)
    except ValueError as e:
      raise ValueError(f'{name}: {e}') from None
    prompts = np.random.default_rng(seed).integers(
        3, model.cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    runs[name] = (lambda m=model, v=variables, p=prompts: decode.generate(
        m, v, p, new_tokens, GREEDY, jax.random.key(seed)).tokens)
    rows[name] = {'batch': batch, 'memory_bytes': memory_bytes(model, variables, batch, max_len),
                  'cache_bytes_per_sequence': cache_bytes_per_sequence(model, max_len),
                  'params': sum(x.size for x in jax.tree.leaves(variables))}
  for name, seconds in best_of_rounds(runs, rounds).items():
    rows[name].update(seconds=seconds, tokens_per_s=rows[name]['batch'] * new_tokens / seconds)
  return rows


def machine():
  """The JAX device and, on Linux, the CPU model and core count."""
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), '') if platform.system() == 'Linux' else ''
  return (f'{jax.devices()[0].device_kind} ({cpu or platform.processor()}, '
          f'{os.cpu_count()} cores), JAX {jax.__version__}')


def parse_settings(text):
  """'name=prompt/output,...' -> {name: (prompt_len, new_tokens)}."""
  settings = {}
  for item in text.split(','):
    try:
      name, lengths = item.split('=')
      prompt_len, new_tokens = (int(n) for n in lengths.split('/'))
    except ValueError:
      raise ValueError(f'--settings item {item!r} is not name=prompt/output') from None
    if prompt_len < 1 or new_tokens < 1:
      raise ValueError(f'--settings item {item!r}: lengths must be >= 1.')
    settings[name] = (prompt_len, new_tokens)
  return settings


def markdown(results, baseline='vanilla'):
  """Markdown table of ``{setting: throughput(...) rows}``; ratios against ``baseline``."""
  lines = ['| setting | model | params | batch | cache MiB / sequence | memory MiB | tokens/s '
           f'| vs {baseline} |', '|---|---|---|---|---|---|---|---|']
  for setting, rows in results.items():
    for name, r in rows.items():
      ratio = r['tokens_per_s'] / rows[baseline]['tokens_per_s']
      lines.append(f"| {setting} | {name} | {r['params'] / 1e6:.2f}M | {r['batch']} | "
                   f"{r['cache_bytes_per_sequence'] / MIB:.3f} | {r['memory_bytes'] / MIB:.1f} | "
                   f"{r['tokens_per_s']:,.0f} | {ratio:.2f}x |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--embed_dim', type=int, default=256)
  parser.add_argument('--num_layers', type=int, default=4, help="Vanilla's depth L.")
  parser.add_argument('--num_heads', type=int, default=4)
  parser.add_argument('--num_kv_heads', type=int, default=4)
  parser.add_argument('--mlp_dim', type=int, default=0, help='0: 3 x embed_dim.')
  parser.add_argument('--vocab_size', type=int, default=259)
  parser.add_argument('--dtype', default='float32', help='Compute (and cache) dtype.')
  parser.add_argument('--block_len', type=int, default=4, help='L_B.')
  parser.add_argument('--expansion_ratio', type=int, default=2, help='Prefix vectors.')
  parser.add_argument('--settings', default='prefill_heavy=512/32,decode_heavy=32/512',
                      help='name=prompt/output tokens, comma-separated.')
  parser.add_argument('--cap_mib', type=float, default=0,
                      help="Memory cap (MiB); 0: vanilla's bytes at --cap_batch rows of the "
                           'longest setting.')
  parser.add_argument('--cap_batch', type=int, default=32)
  parser.add_argument('--max_batch', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--out', default='', help='JSON output path.')
  args = parser.parse_args()
  settings = parse_settings(args.settings)
  configs = bench_models(args.embed_dim, args.num_layers, args.num_heads, args.num_kv_heads,
                         args.mlp_dim or 3 * args.embed_dim, args.vocab_size, args.dtype,
                         args.block_len, args.expansion_ratio)
  models = {}
  for name, config in configs.items():
    model = build_model(config)
    models[name] = (model, init_variables(model, args.block_len))
  longest = max(p + n for p, n in settings.values())
  cap = (args.cap_mib * MIB if args.cap_mib else
         memory_bytes(*models['vanilla'], args.cap_batch, longest))
  results = {setting: throughput(models, p, n, cap, args.max_batch, args.rounds)
             for setting, (p, n) in settings.items()}
  print(f'machine: {machine()}')
  print(f'memory cap {cap / MIB:.1f} MiB, max batch {args.max_batch}, best of {args.rounds} '
        'interleaved rounds; settings (prompt/output): ' +
        ', '.join(f'{k} {p}/{n}' for k, (p, n) in settings.items()))
  print(markdown(results))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'machine': machine(), 'args': vars(args), 'cap_bytes': cap,
                 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
