"""MoR throughput on this machine, side by side in one process (PAPERS.md §2).

(1) Training: step time per token of vanilla (U unique layers), a recursive model and MoR
(expert choice) with the same U = 1 + base_depth + 1 unique layers, N_r = 3 (``middle_cycle``).
(2) Inference: tokens/s of plain batched ``model.decode.generate`` (greedy; the depth-wise
batching engine of ``model.engine`` does not serve MoR) for vanilla (L layers) and MoR
N_r = 2, 3, 4 built on the same L, at a fixed batch and at each model's largest batch whose
parameters + KV cache (float32) fit one memory cap (vanilla's at ``--cap_batch``). MoR decodes
with causal routing (router logit >= 0); its decode step masks rather than skips tokens that
left, so compute per step is that of all recursions: speed-ups can only come from memory
(KV sharing keeps 1/N_r of the shared layers' cache). Weights are random. Run:

  python bench/mor_throughput.py --out=/tmp/mor_throughput.json
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import base, mor_tiny
from model import decode
from model.registry import build_model
from training import optim, train


def _model(name, shape, **kw):
  cfg = mor_tiny.mor_model(**shape, **kw) if name == 'mor' else base.model_config(**shape)
  if name == 'recursive':
    cfg.update(dict(name='recursive', num_loops=kw['num_loops'], sharing='middle_cycle'))
  return build_model(cfg)


def _timed(fn, repeats):
  fn()  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def train_step_time(model, batch, seq_len, repeats):
  """Seconds per token of one jit-compiled training step (AdamW, single device)."""
  tcfg = base.train_config(steps=100, warmup_steps=1)
  tx, schedule = optim.make_optimizer(tcfg)
  state = jax.jit(lambda r: jax.tree.map(
      lambda x: x.unbox() if hasattr(x, 'unbox') else x,
      train.make_init_fn(model, tx, seq_len)(r),
      is_leaf=lambda x: hasattr(x, 'unbox')))(jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(model, tx, schedule, tcfg))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, 259)
  data = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)),
          'segment_ids': jnp.ones((batch, seq_len), jnp.int32),
          'loss_mask': jnp.ones((batch, seq_len), jnp.int32)}
  return _timed(lambda: step(state, data)[1]['train/loss'], repeats) / (batch * seq_len)


def memory_bytes(model, params, batch, max_len):
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
  return 4 * (sum(x.size for x in jax.tree.leaves(params)) +
              sum(x.size for x in jax.tree.leaves(cache)))


def decode_tokens_per_s(model, params, batch, prompt_len, new_tokens, repeats):
  prompts = jax.random.randint(jax.random.PRNGKey(2), (batch, prompt_len), 3, 259)
  run = lambda: decode.generate(model, params, prompts, new_tokens,
                                decode.SamplingConfig(greedy=True), jax.random.PRNGKey(0)).tokens
  return batch * new_tokens / _timed(run, repeats)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--embed_dim', type=int, default=128)
  parser.add_argument('--num_layers', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--train_batch', type=int, default=8)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--cap_batch', type=int, default=32)
  parser.add_argument('--max_batch', type=int, default=256)
  parser.add_argument('--prompt_len', type=int, default=32)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  shape = dict(embed_dim=args.embed_dim, num_heads=4, num_kv_heads=2,
               mlp_dim=3 * args.embed_dim)
  result = {'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0]}',
            'args': vars(args), 'train': [], 'decode': []}

  # (1) Training at equal unique parameters: U = 1 + base_depth + 1 unique layers.
  unique = 2 + (args.num_layers - 2) // 3
  train_models = {
      f'vanilla_L{unique}': _model('llama', dict(shape, num_layers=unique)),
      'recursive_3': _model('recursive', dict(shape, num_layers=args.num_layers), num_loops=3),
      'mor_expert_3': _model('mor', dict(shape, num_layers=args.num_layers), num_recursions=3),
  }
  for name, model in train_models.items():
    s = train_step_time(model, args.train_batch, args.seq_len, args.repeats)
    result['train'].append({'model': name, 'us_per_token': s * 1e6})
    print(f'train {name:>14}: {s * 1e6:8.2f} us/token', flush=True)

  # (2) Decoding: vanilla L vs MoR-N_r on the same L.
  max_len = args.prompt_len + args.new_tokens
  decode_models = {f'vanilla_L{args.num_layers}':
                   _model('llama', dict(shape, num_layers=args.num_layers))}
  for n in (2, 3, 4):
    decode_models[f'mor_{n}'] = _model('mor', dict(shape, num_layers=args.num_layers),
                                       num_recursions=n)
  decode_models['mor_3_kv_share'] = _model('mor', dict(shape, num_layers=args.num_layers),
                                           num_recursions=3, kv_sharing=True)
  cap = None
  for name, model in decode_models.items():
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((1, 8), jnp.int32))['params']
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params,
                          is_leaf=lambda x: hasattr(x, 'unbox'))
    cap = cap or memory_bytes(model, params, args.cap_batch, max_len)
    fits = [b for b in range(1, args.max_batch + 1)
            if memory_bytes(model, params, b, max_len) <= cap]
    row = {'model': name, 'fixed_batch': args.batch,
           'tok_s_fixed': decode_tokens_per_s(model, params, args.batch, args.prompt_len,
                                              args.new_tokens, args.repeats),
           'max_batch': fits[-1]}
    row['tok_s_max'] = decode_tokens_per_s(model, params, row['max_batch'], args.prompt_len,
                                           args.new_tokens, args.repeats)
    result['decode'].append(row)
    print(f"decode {name:>14}: batch {args.batch}: {row['tok_s_fixed']:9.1f} tok/s; "
          f"max batch {row['max_batch']}: {row['tok_s_max']:9.1f} tok/s", flush=True)
  base_row = result['decode'][0]
  for row in result['decode']:
    row['speedup_fixed'] = row['tok_s_fixed'] / base_row['tok_s_fixed']
    row['speedup_max'] = row['tok_s_max'] / base_row['tok_s_max']
  result['memory_cap_bytes'] = cap
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
