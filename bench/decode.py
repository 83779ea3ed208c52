"""Decoding throughput: ``model.decode.generate`` (KV cache) against naive re-computation.

  python bench/decode.py [--out=bench_decode.json] [--new_tokens=256] [--batch=4] [--rounds=2]

For each config (the 50M Llama of ``bench/train_throughput.py`` and the tiny vanilla, MoR
and recursive models, randomly initialised), greedy-decodes ``new_tokens`` tokens after a
``prompt_len``-token prompt for ``batch`` rows (RL rollouts sample batches; a cached step
reads the weights once for all rows, so the gain grows with the batch) in two ways:

* ``generate``: one jit-compiled call (batched prefill, then one cached step per token);
* naive: every step re-runs the jit-compiled full forward pass over the whole prefix (its
  length rounded up to a multiple of ``bucket`` so that only a few shapes compile; the
  padding sits after the prefix, so causal attention ignores it) and takes the argmax.

Both are compiled before timing; the two are timed alternately, ``rounds`` times, and each
keeps its best round, so both see the same machine load. Reports tokens/s of each, their
ratio, and whether the two produced the same tokens. MoR uses ``causal_routing`` so that
its full forward pass routes as cached decoding does.

Also reports, per family, XLA's cost analysis of one cached decode step of a small model
with a long cache (as tests/test_decode.py): bytes accessed / the bytes its attention layers
read from the cache (one read of a layer's keys+values per layer application). Prints
tables and writes JSON.
"""
import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench.train_throughput import config_50m
from configs import mor_tiny, recursive_tiny, vanilla_tiny
from model import decode, kv_cache
from model.layers import ModelConfig
from model.llama import Llama
from model.mor import MoR, MoRConfig
from model.recursive import Recursive, RecursiveConfig
from model.registry import build_model

GREEDY = decode.SamplingConfig(greedy=True)


def configs():
  """(name, model ConfigDict) of every benchmarked model."""
  mor = mor_tiny.get_config().model
  mor.causal_routing = True
  return [('llama_50m', config_50m().model), ('vanilla_tiny', vanilla_tiny.get_config().model),
          ('mor_tiny', mor), ('recursive_tiny', recursive_tiny.get_config().model)]


def cache_read_ratios(batch=2, max_len=2048):
  """{family: decode-step bytes accessed / bytes of one cache read per layer application}."""
  shapes = dict(vocab_size=64, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=64,
                mlp_dim=64)
  models = {'llama': Llama(ModelConfig(**shapes, num_layers=3)),
            'llama_scan': Llama(ModelConfig(**shapes, num_layers=3, scan_layers=True)),
            'recursive': Recursive(RecursiveConfig(**shapes, num_layers=4, num_loops=2)),
            'mor': MoR(MoRConfig(**shapes, num_layers=4, num_recursions=2)),
            'mor_kv_sharing': MoR(MoRConfig(**shapes, num_layers=4, num_recursions=2,
                                            kv_sharing=True))}
  ratios = {}
  for name, model in models.items():
    step_bytes, layer_bytes = kv_cache.decode_step_bytes(model, batch, max_len)
    ratios[name] = step_bytes / (model.cfg.num_layers * layer_bytes)
  return ratios


def naive_decoder(model, variables, prompts, new_tokens, bucket):
  """Greedy decoding by full forward passes over the padded prefix; returns tokens [B, N]."""
  forward = jax.jit(lambda tokens: model.apply(variables, tokens)[0])
  batch, prompt_len = prompts.shape

  def run():
    buf = np.zeros((batch, -(-(prompt_len + new_tokens) // bucket) * bucket), np.int32)
    buf[:, :prompt_len] = prompts
    for n in range(prompt_len, prompt_len + new_tokens):
      logits = forward(jnp.asarray(buf[:, :-(-n // bucket) * bucket]))
      buf[:, n] = np.asarray(jnp.argmax(logits[:, n - 1], axis=-1))
    return buf[:, prompt_len:prompt_len + new_tokens]
  return run


def measure(name, model_config, new_tokens, prompt_len, batch, rounds, bucket):
  model = build_model(model_config)
  prompts = np.random.default_rng(0).integers(3, model_config.vocab_size,
                                              (batch, prompt_len)).astype(np.int32)
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.asarray(prompts)))
  ours = lambda: np.asarray(decode.generate(model, variables, prompts, new_tokens, GREEDY,
                                            jax.random.key(0)).tokens)
  naive = naive_decoder(model, variables, prompts, new_tokens, bucket)
  same = bool(np.array_equal(ours(), naive()))  # Also compiles every shape both use.
  best = {'generate': np.inf, 'naive': np.inf}
  for _ in range(rounds):
    for key, fn in (('naive', naive), ('generate', ours)):
      start = time.perf_counter()
      fn()
      best[key] = min(best[key], time.perf_counter() - start)
  tokens = batch * new_tokens
  return {'config': name, 'batch': batch, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'generate_s': best['generate'], 'naive_s': best['naive'],
          'generate_tokens_per_s': tokens / best['generate'],
          'naive_tokens_per_s': tokens / best['naive'],
          'speedup': best['naive'] / best['generate'], 'same_tokens': same}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='bench_decode.json', help='JSON output path.')
  parser.add_argument('--new_tokens', type=int, default=256, help='Tokens generated per row.')
  parser.add_argument('--prompt_len', type=int, default=16, help='Prompt tokens per row.')
  parser.add_argument('--batch', type=int, default=4, help='Rows decoded together.')
  parser.add_argument('--rounds', type=int, default=2, help='Interleaved rounds (best kept).')
  parser.add_argument('--bucket', type=int, default=64,
                      help='Naive prefix lengths are padded to multiples of this.')
  args = parser.parse_args()
  ratios = cache_read_ratios()
  rows = [measure(name, cfg, args.new_tokens, args.prompt_len, args.batch, args.rounds,
                  args.bucket) for name, cfg in configs()]
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), '') if platform.system() == 'Linux' else ''
  device = f'{jax.devices()[0].device_kind} ({cpu or platform.processor()})'
  print(f'device: {device}; best of {args.rounds} interleaved rounds')
  print(f"{'config':15s} {'generate tok/s':>15s} {'naive tok/s':>12s} {'speedup':>8s} "
        f"{'same tokens':>11s}")
  for r in rows:
    print(f"{r['config']:15s} {r['generate_tokens_per_s']:15,.1f} "
          f"{r['naive_tokens_per_s']:12,.1f} {r['speedup']:7.1f}x {str(r['same_tokens']):>11s}")
  print('decode step bytes accessed / one cache read per layer application (XLA cost '
        'analysis; 2 rows x 2048 slots):')
  print('  ' + ', '.join(f'{name} {ratio:.2f}' for name, ratio in ratios.items()))
  with open(args.out, 'w') as f:
    json.dump({'device': device, 'rounds': args.rounds, 'bucket': args.bucket, 'rows': rows,
               'step_bytes_over_cache_read': ratios}, f, indent=2)


if __name__ == '__main__':
  main()
