"""Train-step throughput and FLOP utilisation against a large matmul on the same device.

  python bench/train_throughput.py [--out=bench_train_throughput.json] [--steps=5]

For each config: tokens/s of the jit-compiled train step (after a warm-up step), the
analytic training FLOPs per token (6N + attention, ``training.budget.analytic_flops_per_token``)
and utilisation = achieved FLOP/s / the FLOP/s of a large float32 matmul measured in the
same process (the practical peak of this device). Prints a table and writes JSON.
"""
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import base, vanilla_tiny
from training import budget, sharding, train, trainer

_OUT = flags.DEFINE_string('out', 'bench_train_throughput.json', 'JSON output path.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps per config.')


def matmul_peak(n=2048, reps=10, dtype=jnp.float32):
  """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def config_50m():
  """A ~50M non-embedding-parameter Llama (d=640, 10 layers, ffn 1728)."""
  config = vanilla_tiny.get_config()
  config.model = base.model_config(embed_dim=640, num_layers=10, num_heads=10, num_kv_heads=10,
                                   mlp_dim=1728)
  config.data.seq_len = 256
  config.data.batch_size = 4
  return config


def measure(name, config, steps):
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx, schedule, abstract, shardings, init, rules = trainer.build_state_fns(config, mesh)
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.model.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           'segment_ids': np.ones((b, t), np.int32), 'loss_mask': np.ones((b, t), np.int32)}
  step = jax.jit(trainer.make_train_step(model, tx, schedule, config.train), donate_argnums=0,
                 out_shardings=(shardings, None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = init(jax.random.PRNGKey(0))
    batch = sharding.shard_batch(batch, mesh)
    state, m = step(state, batch)  # compile + warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - t0
  _, non_emb = train.count_params(abstract['params'])
  tok_s = steps * b * t / elapsed
  flops_tok = budget.analytic_flops_per_token(model.cfg, non_emb, t)
  return {'config': name, 'params_non_embedding': non_emb, 'tokens_per_step': b * t,
          'step_s': elapsed / steps, 'tokens_per_s': tok_s, 'flops_per_token': flops_tok,
          'achieved_flops_per_s': tok_s * flops_tok}


def main(_):
  peak = matmul_peak()
  rows = [measure('vanilla_tiny', vanilla_tiny.get_config(), _STEPS.value),
          measure('llama_50m', config_50m(), _STEPS.value)]
  for r in rows:
    r['utilisation_vs_matmul'] = r['achieved_flops_per_s'] / peak
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), platform.processor()) if platform.system() == 'Linux' else platform.processor()
  device = f'{jax.devices()[0].device_kind} ({cpu}, {jax.device_count()} JAX devices)'
  print(f'device: {device}; matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3 float32)')
  print(f"{'config':14s} {'params':>8s} {'step s':>8s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'util':>6s}")
  for r in rows:
    print(f"{r['config']:14s} {r['params_non_embedding'] / 1e6:7.1f}M {r['step_s']:8.3f} "
          f"{r['tokens_per_s']:10,.0f} {r['achieved_flops_per_s'] / 1e9:9.1f} "
          f"{r['utilisation_vs_matmul']:6.1%}")
  with open(_OUT.value, 'w') as f:
    json.dump({'device': device, 'matmul_peak_flops_per_s': peak, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
